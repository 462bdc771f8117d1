"""Tests for pipeline/config/loading.py: loading, validation, overrides, fingerprints."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
from pydantic import BaseModel

from pipeline.config import loading as C
from pipeline.config.loading import ConfigError, dump_yaml, flatten, load_config, to_dict
from pipeline.config.schema import FinetuneConfig, PipelineConfig, TrainConfig
from pipeline.stages.fingerprints import section_fingerprint
from pipeline.stages.table import STAGE_DEPENDENCIES, STAGES

SHIPPED = ["quickstart", "tiny", "fashion_vgg16", "fashion_resnet18", "imagenet_resnet50"]


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    path = C.CONFIG_DIR / f"{name}.yaml"
    assert path.is_file()
    by_name = load_config(name)
    by_path = load_config(str(path))
    assert by_name == by_path
    assert by_name.name == name
    # round trip through dump_yaml/JSON
    json.dumps(to_dict(by_name))


def test_shipped_configs_are_package_data_found_from_any_directory(tmp_path):
    assert C.CONFIG_DIR == Path(C.__file__).resolve().parent / "presets"
    code = "from pipeline.config import load_config; print(load_config('tiny').name)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "tiny"
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["package-data"]["pipeline"] == ["config/presets/*.yaml"]
    scripts = project["project"]["scripts"]
    assert set(scripts) == {"penni-pipeline", "penni-sweep"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_no_unlisted_shipped_configs():
    assert sorted(C.available_configs()) == sorted(SHIPPED)


def test_defaults_equal_quickstart():
    assert load_config() == PipelineConfig()
    assert load_config(None) == load_config("quickstart")
    cfg = PipelineConfig()
    assert cfg.model.arch == "fashion_cnn"
    assert (cfg.baseline.epochs, cfg.retrain.epochs, cfg.finetune.epochs) == (5, 5, 10)
    assert isinstance(cfg.finetune, TrainConfig)


def test_partial_section_keeps_section_defaults(tmp_path):
    # finetune.epochs given, finetune.lr must stay at the *finetune* default, not TrainConfig's
    p = _write(tmp_path, "finetune:\n  epochs: 7\nshrink:\n")
    cfg = load_config(p)
    assert cfg.finetune.epochs == 7
    assert cfg.finetune.lr == PipelineConfig().finetune.lr == 0.02
    assert cfg.shrink.enabled is True
    assert load_config(_write(tmp_path, "", "empty.yaml")) == PipelineConfig()


def test_shipped_imagenet_values():
    cfg = load_config("imagenet_resnet50")
    assert cfg.model.arch == "torchvision.models:resnet50"
    assert cfg.model.num_classes == 1000 and cfg.model.in_channels == 3
    assert cfg.baseline.epochs == 0
    assert cfg.data.dataset == "parquet" and cfg.data.image_size == 224
    assert cfg.ray.num_workers == 8 and cfg.ray.use_gpu is True
    assert cfg.retrain.l1 == 5e-5 and cfg.retrain.start_with == "joint"
    assert cfg.retrain.include_pointwise and cfg.prune.include_pointwise
    assert cfg.retrain.amp == "auto" and cfg.retrain.channels_last == "auto"


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(
        "quickstart",
        [
            "retrain.l1=5e-5",
            "decompose.exclude=[conv1]",
            "ray.address=null",
            "ray.use_gpu=true",
            "ray.cpus_per_worker=2",  # int accepted by a float field
            "decompose.d={conv1: 3, features.3: 2}",
            "model.kwargs.width=32",
            "baseline.amp=off",  # not YAML 1.1's False
            "name=my-run_1.b",
        ],
    )
    assert cfg.retrain.l1 == 5e-5 and isinstance(cfg.retrain.l1, float)
    assert cfg.decompose.exclude == ["conv1"]
    assert cfg.ray.address is None and cfg.ray.use_gpu is True
    assert cfg.ray.cpus_per_worker == 2.0 and isinstance(cfg.ray.cpus_per_worker, float)
    assert cfg.decompose.d == {"conv1": 3, "features.3": 2}
    assert cfg.model.kwargs == {"width": 32}
    assert cfg.baseline.amp == "off"
    assert cfg.name == "my-run_1.b"


def test_yaml_scientific_notation_is_float(tmp_path):
    cfg = load_config(_write(tmp_path, "retrain:\n  l1: 1e-4\n  lr: 1\n"))
    assert cfg.retrain.l1 == 1e-4
    assert cfg.retrain.lr == 1.0 and isinstance(cfg.retrain.lr, float)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=1.5", "data.batch_size"),
        ("data.batch_size=true", "data.batch_size"),
        ("data.batch_size='128'", "data.batch_size"),
        ("seed=1.0", "seed"),
        ("ray.use_gpu=1", "ray.use_gpu"),
        ("ray.use_gpu=yes", "ray.use_gpu"),
        ("retrain.lr=abc", "retrain.lr"),
        ("retrain.lr=true", "retrain.lr"),
        ("retrain.lr=0", "retrain.lr"),
        ("retrain.l1=-1e-4", "retrain.l1"),
        ("retrain.start_with=both", "retrain.start_with"),
        ("retrain.alternate_every=0", "retrain.alternate_every"),
        ("baseline.epochs=-1", "baseline.epochs"),
        ("baseline.optimizer=adam", "baseline.optimizer"),
        ("baseline.amp=fp16", "baseline.amp"),
        ("baseline.channels_last=maybe", "baseline.channels_last"),
        ("baseline.milestones=[0.8, 0.4]", "baseline.milestones"),
        ("baseline.milestones=[0.5, 1.0]", "baseline.milestones"),
        ("data.val_fraction=0", "data.val_fraction"),
        ("data.val_fraction=1", "data.val_fraction"),
        ("data.dataset=cifar10", "data.dataset"),
        ("ray.num_workers=0", "ray.num_workers"),
        ("prune.s=0", "prune.s"),
        ("prune.rule=sparsity", "prune.target"),
        ("name=has space", "name"),
        ("name=a/b", "name"),
        ("decompose.d=0", "decompose.d"),
        ("decompose.d=2.5", "decompose.d"),
        ("decompose.d={conv1: 0}", "decompose.d"),
        ("decompose.d={conv1: 1.5}", "decompose.d"),
        ("decompose.exclude=conv1", "decompose.exclude"),
        ("evaluate.latency_batch_sizes=[0]", "evaluate.latency_batch_sizes"),
        ("shrink.enabled=null", "shrink.enabled"),
        ("data.dataset=parquet", "data.root"),
        ("data.loader=dali", "data.loader"),
        ("data.augment=heavy", "data.augment"),
        ("data.hflip=maybe", "data.hflip"),
        ("data.normalize=yes", "data.normalize"),
        ("finetune.distill=1", "finetune.distill"),
        ("finetune.distill_temperature=0", "finetune.distill_temperature"),
        ("finetune.distill_weight=1.5", "finetune.distill_weight"),
        ("finetune.distill_weight=-0.1", "finetune.distill_weight"),
        ("sweep.d=[]", "sweep.d"),
        ("sweep.d=[0, 3]", "sweep.d"),
        ("sweep.l1=[1e-3, 1e-5]", "sweep.l1"),
        ("sweep.l1=[1e-3]", "sweep.l1"),
        ("sweep.l1=[0, 1e-3]", "sweep.l1"),
        ("sweep.channel_target=[1.0]", "sweep.channel_target"),
        ("sweep.num_samples=0", "sweep.num_samples"),
        ("sweep.max_concurrent_trials=0", "sweep.max_concurrent_trials"),
        ("sweep.scheduler=hyperband", "sweep.scheduler"),
        ("sweep.objective=accuracy", "sweep.objective"),
        ("sweep.select=best", "sweep.select"),
        ("sweep.max_top1_drop=-1", "sweep.max_top1_drop"),
        ("sweep.max_macs=0", "sweep.max_macs"),
    ],
)
def test_bad_values_rejected(override, key):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert len(exc.value.errors) == 1, exc.value.errors
    assert exc.value.errors[0].startswith(f"{key}"), exc.value.errors
    assert isinstance(exc.value, ValueError)


def test_new_keys_defaults_and_overrides():
    cfg = PipelineConfig()
    assert (cfg.data.loader, cfg.data.augment, cfg.data.hflip, cfg.data.normalize) == ("auto", "auto", "auto", "auto")
    assert (cfg.finetune.distill, cfg.finetune.distill_temperature, cfg.finetune.distill_weight) == (False, 4.0, 0.5)
    assert isinstance(cfg.finetune, FinetuneConfig) and not hasattr(cfg.retrain, "distill")
    assert cfg.sweep.d == [3, 5] and cfg.sweep.l1 == [1e-5, 1e-3] and cfg.sweep.prune_s is None
    assert (cfg.sweep.num_samples, cfg.sweep.scheduler, cfg.sweep.select) == (4, "asha", "fewest_macs_within")
    changed = load_config(None, ["data.loader=ray_data", "data.normalize=none", "finetune.distill=true",
                                 "finetune.distill_weight=1", "sweep.prune_s=[1.0, 1.5]", "sweep.max_macs=1e6"])
    assert changed.data.loader == "ray_data" and changed.data.normalize == "none"
    assert changed.finetune.distill is True and changed.finetune.distill_weight == 1.0
    assert changed.sweep.prune_s == [1.0, 1.5] and changed.sweep.max_macs == 1e6
    with pytest.raises(ConfigError, match="retrain.distill"):
        load_config(None, ["retrain.distill=true"])  # distillation is a fine-tuning option only


def test_sweep_section_never_enters_fingerprints():
    base = load_config()
    other = load_config(None, ["sweep.d=[2]", "sweep.num_samples=9", "sweep.scheduler=none", "sweep.in_process=true"])
    for stage in STAGES:
        assert section_fingerprint(base, stage) == section_fingerprint(other, stage), stage
    assert section_fingerprint(base, "finetune") != section_fingerprint(
        load_config(None, ["finetune.distill=true"]), "finetune")
    assert section_fingerprint(base, "baseline") != section_fingerprint(
        load_config(None, ["data.hflip=false"]), "baseline")


def test_sparsity_with_target_ok():
    cfg = load_config(None, ["prune.rule=sparsity", "prune.target=0.9"])
    assert cfg.prune.target == 0.9
    with pytest.raises(ConfigError, match="prune.target"):
        load_config(None, ["prune.rule=sparsity", "prune.target=1.5"])


@pytest.mark.parametrize(
    "written, parsed",
    [
        ("std", ["std"]),
        ("sparsity", ["sparsity"]),
        ("channels", ["channels"]),
        ("channels+std", ["channels", "std"]),
        ("channels+sparsity", ["channels", "sparsity"]),
        ("[channels, std]", ["channels", "std"]),
        ("[sparsity]", ["sparsity"]),
        ("[std, channels]", ["channels", "std"]),  # channels first: the order the prune stage runs them in
    ],
)
def test_prune_rule_is_a_list_of_rule_names(written, parsed):
    cfg = load_config(None, [f"prune.rule={written}", "prune.target=0.5"])
    assert cfg.prune.rule == parsed
    assert cfg.prune.channels == ("channels" in parsed)
    assert cfg.prune.element_rule == next((r for r in parsed if r != "channels"), None)
    # dumped (and fingerprinted) as the "+"-joined string configs always held, and loaded back the same
    assert cfg.prune.model_dump()["rule"] == cfg.prune.model_dump(mode="json")["rule"] == "+".join(parsed)
    assert PipelineConfig.model_validate(cfg.model_dump()) == cfg


def test_prune_rule_as_a_list_or_the_old_string_has_one_fingerprint(tmp_path):
    as_list = load_config(_write(tmp_path, "prune:\n  rule: [channels, std]\n"))
    as_string = load_config(_write(tmp_path, "prune:\n  rule: channels+std\n", "old.yaml"))
    assert as_list == as_string == load_config(None)  # channels+std is the default
    assert section_fingerprint(as_list, "prune") == section_fingerprint(as_string, "prune")


@pytest.mark.parametrize(
    "written, problem",
    [
        ("channel", "unknown rule 'channel'"),
        ("channels+l1", "unknown rule 'l1'"),
        ("[channels, 3]", "unknown rule 3"),
        ("std+sparsity", "'std' and 'sparsity' do not combine"),
        ("channels+channels", "names 'channels' twice"),
        ("[]", "must name a rule or a list of rules"),
        ("5", "must name a rule or a list of rules"),
    ],
)
def test_bad_prune_rule_names_the_allowed_values(written, problem):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"prune.rule={written}"])
    (error,) = exc.value.errors
    assert error.startswith(f"prune.rule: {problem}; use 'channels', 'std' or 'sparsity'"), error


def test_torchvision_arch_has_one_spelling():
    old = load_config(None, ["model.arch=torchvision:resnet18"])
    new = load_config(None, ["model.arch=torchvision.models:resnet18"])
    assert old.model.arch == new.model.arch == "torchvision.models:resnet18"
    assert load_config(None, ["model.arch=vgg16"]).model.arch == "vgg16"


def test_unknown_yaml_key_names_full_key(tmp_path):
    p = _write(tmp_path, "retrain:\n  epochs: 2\n  l2: 0.1\nstages: [baseline]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "retrain.l2" in msg and "retrain.l1" in msg  # key and suggestion
    assert "stages" in msg
    assert str(p) in msg
    assert len(exc.value.errors) == 2


def test_unknown_override_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["data.batchsize=64"])
    (err,) = exc.value.errors
    assert err.startswith("data.batchsize")
    assert "data.batch_size" in err  # difflib suggestion
    with pytest.raises(ConfigError, match="retrain.lr.x"):
        load_config(None, ["retrain.lr.x=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["retrain.lr"])


def test_multiple_errors_reported_together(tmp_path):
    p = _write(
        tmp_path,
        """
        seed: 1.5
        data:
          batch_size: 0
          colour: red
        ray:
          use_gpu: "yes"
        """,
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p, ["retrain.l1=-1", "nosuch.key=1"])
    errors = exc.value.errors
    keys = [e.split(":")[0].split(" ")[0] for e in errors]
    for k in ["seed", "data.batch_size", "data.colour", "ray.use_gpu", "retrain.l1", "nosuch"]:
        assert any(x.startswith(k) for x in keys), (k, errors)
    assert len(errors) == 6
    # one problem per line
    lines = [line for line in str(exc.value).splitlines() if line.startswith("  - ")]
    assert len(lines) == 6


def test_duplicate_yaml_key_rejected(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key"):
        load_config(_write(tmp_path, "seed: 1\nseed: 2\n"))


def test_missing_config_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="quickstart"):  # lists available names
        load_config("no_such_config")
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_fingerprint_dependencies():
    base = load_config()
    changed = load_config(None, ["finetune.epochs=9"])
    assert section_fingerprint(base, "finetune") != section_fingerprint(changed, "finetune")
    for stage in ["baseline", "decompose", "retrain", "prune", "shrink", "evaluate", "report"]:
        assert section_fingerprint(base, stage) == section_fingerprint(changed, stage), stage

    # values that must not invalidate the baseline
    for ov in ["ray.address=auto", "ray.num_workers=4", "tracking.uri=http://x:5000",
               "name=other", "storage=/tmp/elsewhere", "ray.in_process=true"]:
        other = load_config(None, [ov])
        assert section_fingerprint(base, "baseline") == section_fingerprint(other, "baseline"), ov
    # values that must
    for ov in ["seed=1", "ray.use_gpu=true", "data.batch_size=64", "model.kwargs.width=8",
               "baseline.lr=0.1"]:
        other = load_config(None, [ov])
        assert section_fingerprint(base, "baseline") != section_fingerprint(other, "baseline"), ov
    assert section_fingerprint(base, "retrain") != section_fingerprint(
        load_config(None, ["data.train_subset=100"]), "retrain"
    )
    assert section_fingerprint(base, "decompose") != section_fingerprint(
        load_config(None, ["decompose.d=4"]), "decompose"
    )
    # int vs float spelling of the same value is the same config
    assert section_fingerprint(base, "retrain") == section_fingerprint(
        load_config(None, ["retrain.l1=0.003"]), "retrain"
    )
    fps = {section_fingerprint(base, s) for s in STAGES}
    assert len(fps) == len(STAGES)
    assert all(len(f) == 64 and int(f, 16) >= 0 for f in fps)
    with pytest.raises(ValueError):
        section_fingerprint(base, "nope")


def test_stages_constant():
    assert STAGES == ("baseline", "decompose", "retrain", "prune", "finetune", "shrink",
                      "evaluate", "report")
    assert set(STAGE_DEPENDENCIES) == set(STAGES)


@pytest.mark.parametrize("name", SHIPPED)
def test_flatten_is_mlflow_safe(name):
    cfg = load_config(name)
    flat = flatten(cfg)
    assert flat["retrain.l1"] == cfg.retrain.l1
    assert flat["decompose.exclude"] == json.dumps(cfg.decompose.exclude)
    assert "model.kwargs" in flat and "baseline.checkpoint" in flat
    for k, v in flat.items():
        assert isinstance(k, str) and k and len(k) <= 250
        assert type(v) in (str, int, float, bool), (k, v)
        assert len(str(v)) <= 500
    assert len(flat) == len(set(flat))


def test_to_dict_and_dump_yaml_round_trip(tmp_path):
    cfg = load_config("imagenet_resnet50", ["decompose.d={layer1.0.conv2: 3}", "baseline.amp=off"])
    d = to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    p = tmp_path / "dumped.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(p) == cfg
    assert C.from_dict(d) == cfg
    assert C.apply_overrides(cfg, ["seed=3"]).seed == 3 and cfg.seed == 0


def test_section_defaults_are_not_shared():
    a, b = PipelineConfig(), PipelineConfig()
    a.decompose.exclude.append("conv1")
    a.model.kwargs["x"] = 1
    assert b.decompose.exclude == [] and b.model.kwargs == {}
    assert isinstance(a.retrain, BaseModel) and isinstance(a.retrain, TrainConfig)


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=1.5", "seed: input should be a valid integer; got 1.5 (float). Write a whole number"),
        ("ray.use_gpu=yes", "ray.use_gpu: input should be a valid boolean; got 'yes' (str). Write true or false."),
        ("baseline.channels_last=1", "baseline.channels_last: input should be 'auto', true or false; got 1 (int)"),
        ("decompose.d={conv1: 0}", "decompose.d['conv1']: input should be greater than or equal to 1; got 0"),
        ("decompose.d={7: 2}", "decompose.d: keys must be strings, got key 7 (int)."),
        ("decompose.d=2.5", "decompose.d: input should be an int >= 1 or a mapping"),
        ("decompose.exclude=conv1", "decompose.exclude: input should be a valid list; got 'conv1' (str). Write it as"),
        ("evaluate.latency_batch_sizes=[1, 0]", "evaluate.latency_batch_sizes[1]: input should be greater than or"),
        ("data=5", "data: expected a mapping of the options of section 'data', got 5 (int)."),
        ("ray.cpus_per_worker=.inf", "ray.cpus_per_worker: input should be a finite number; got inf"),
        ("model.kwargs={a: .nan}", "model.kwargs: must be JSON-serializable"),
        ("name=a/b", "name: must match [A-Za-z0-9_.-]+"),
        ("prune.rule=sparsity", "prune.target: required when prune.rule is 'sparsity'; got null."),
        ("finetune.milestones=[0.8, 0.4]", "finetune.milestones: must be strictly ascending"),
        ("decompose.d.conv1=3", "decompose.d.conv1: unknown key; 'decompose.d' is a value, not a section."),
    ],
)
def test_error_messages_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert [e[: len(message)] for e in exc.value.errors] == [message], exc.value.errors


def test_every_cross_field_problem_of_a_section_is_reported(tmp_path):
    p = _write(tmp_path, "retrain:\n  milestones: [0.8, 0.4]\n  momentum: 0\nbaseline:\n  lr_schedule: multistep\n"
                         "  milestones: []\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert sorted(e.split(":")[0] for e in exc.value.errors) == [
        "baseline.milestones", "retrain.milestones", "retrain.nesterov"]
    assert "Set retrain.nesterov=false" in str(exc.value)  # the hint names the section it is in


def test_section_override_as_mapping_merges_and_strict_types_hold():
    cfg = load_config(None, ["retrain={l1: 1e-4}", "shrink=", "ray.cpus_per_worker=2"])
    assert cfg.retrain.l1 == 1e-4 and cfg.retrain.lr == PipelineConfig().retrain.lr  # merged, not replaced
    assert cfg.shrink == PipelineConfig().shrink  # an empty section means its defaults
    assert load_config(None, ["model.kwargs={a: 1}", "model.kwargs={b: 2}"]).model.kwargs == {"b": 2}
    with pytest.raises(ConfigError, match="decompose.d"):
        load_config(None, ["decompose.d=true"])  # a bool is not an int here


def test_fingerprints_are_deterministic_across_processes():
    code = ("from pipeline.config import load_config; from pipeline.stages.fingerprints import section_fingerprint; "
            "from pipeline.stages.table import STAGES; "
            "c = load_config('tiny'); print(' '.join(section_fingerprint(c, s) for s in STAGES))")
    root = Path(__file__).resolve().parents[2]
    runs = [subprocess.run([sys.executable, "-c", code], check=True, cwd=root, capture_output=True, text=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")]
    cfg = load_config("tiny")
    assert runs[0] == runs[1] == " ".join(section_fingerprint(cfg, s) for s in STAGES) + "\n"


def test_import_is_light():
    code = (
        "import sys, pipeline.config as c; c.load_config(); "
        "bad = [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
