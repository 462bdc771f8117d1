"""End-to-end pipeline on real Ray (2 CPU workers), real MLflow (SQLite) and real Fashion-MNIST."""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest

from pipeline.cli.runner import main
from pipeline.stages import table as stage_table
from pipeline.stages.table import STAGES
from pipeline.tracking.runs import read_runs

pytestmark = pytest.mark.timeout(900)


def _manifests(root: Path) -> dict[str, dict]:
    return {s: json.loads((root / s / "manifest.json").read_text()) for s in STAGES}


def _run(storage: Path, *extra: str) -> int:
    return main(["--config", "tiny", "--storage", str(storage), *extra])


@pytest.fixture(scope="module")
def first_run(tiny_ray_run, local_ray):
    """The session's tiny Ray run (tests/conftest.py); the re-runs below run in this process on ``local_ray``."""
    storage, _ = tiny_ray_run
    return storage, storage / "tiny"


def test_every_stage_committed_with_outputs(first_run):
    _, root = first_run
    manifests = _manifests(root)
    assert set(manifests) == set(STAGES)
    for stage in ("baseline", "decompose", "retrain", "prune", "finetune", "shrink"):
        assert "model.safetensors" in manifests[stage]["files"], stage
    report = root / "report"
    for name in ("structure.md", "coefficients.png", "reconstructed_weights.png", "learning_curves.png", "summary.md"):
        assert (report / name).stat().st_size > 0, name
    ev = json.loads((root / "evaluate" / "evaluation.json").read_text())["summary"]
    assert 0.0 < ev["compressed_test_top1"] <= 1.0
    assert ev["sparse_macs_reduction_pct"] > 30.0  # d=5 + pruning on 3x3 convs
    assert manifests["shrink"]["metrics"]["max_relative_output_change"] < 1e-5


def test_every_stage_writes_what_the_stage_table_says(first_run):
    _, root = first_run
    for entry in stage_table.STAGE_TABLE:
        files = set(_manifests(root)[entry.name]["files"])
        for pattern in entry.writes:
            assert fnmatch.filter(files, pattern), (entry.name, pattern)
        unlisted = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in entry.writes + entry.may_write)]
        assert not unlisted, (entry.name, unlisted)


def test_the_stage_table_is_the_one_list_of_stages():
    from pipeline.config import loading as config
    from pipeline.stages import functions as stages
    from pipeline.stages.fingerprints import stage_fingerprints

    assert stage_table.TRAINING_STAGES == ("baseline", "retrain", "finetune")
    for entry in stage_table.STAGE_TABLE:
        assert stage_table.stage_function(entry.name) is getattr(stages, f"run_{entry.name}")
        assert f"| {entry.name} |" in stage_table.markdown_table()
    assert list(stage_fingerprints(config.load_config("tiny"))) == list(stage_table.STAGES)
    with pytest.raises(ValueError, match="unknown stage 'nope'; expected one of baseline, decompose"):
        stage_table.stage("nope")


def test_mlflow_holds_parent_children_epochs_and_artifacts(first_run):
    from mlflow.tracking import MlflowClient

    _, root = first_run
    state = json.loads((root / "pipeline.json").read_text())
    uri, parent = state["tracking_uri"], state["mlflow_parent_run_id"]
    client = MlflowClient(uri)
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.params["retrain.l1"]
    assert "test/top1" in parent_run.data.metrics  # MLflow names: pipeline/tracking/metric_names.py
    runs = read_runs(uri, "penni", parent)
    by_stage = {r["stage"]: r for r in runs}
    assert set(by_stage) == set(STAGES)
    assert all(r["status"] == "FINISHED" for r in runs)
    retrain = by_stage["retrain"]
    history = client.get_metric_history(retrain["run_id"], "val/top1")
    assert [m.step for m in history] == [0]  # tiny: one epoch, logged per epoch by rank 0
    assert client.get_metric_history(retrain["run_id"], "sparsity/coefficients")
    artifacts = {a.path for a in client.list_artifacts(by_stage["report"]["run_id"])}
    assert {"structure.md", "coefficients.png", "learning_curves.png"} <= artifacts
    assert {"model.safetensors"} <= {a.path for a in client.list_artifacts(by_stage["shrink"]["run_id"])}


def test_rerun_skips_everything_then_reruns_only_downstream_of_a_change(first_run):
    storage, root = first_run
    before = {s: m["created"] for s, m in _manifests(root).items()}
    assert _run(storage) == 0
    assert {s: m["created"] for s, m in _manifests(root).items()} == before
    assert _run(storage, "--set", "finetune.epochs=2") == 0
    after = {s: m["created"] for s, m in _manifests(root).items()}
    upstream = ("baseline", "decompose", "retrain", "prune")
    assert all(after[s] == before[s] for s in upstream)
    assert all(after[s] != before[s] for s in STAGES if s not in upstream)
    assert _manifests(root)["finetune"]["metrics"]["epochs"] == 2


def test_bad_config_fails_before_anything_starts(tmp_path, capsys):
    assert main(["--config", "tiny", "--storage", str(tmp_path), "--set", "retrain.l2=1"]) == 2
    err = capsys.readouterr().err
    assert "retrain.l2" in err
    assert not any(tmp_path.iterdir())


def test_pipeline_runs_on_parquet_shards_of_a_generated_image_tree(tmp_path):
    """The ImageNet code path (Parquet shards of encoded JPEG/PNG, RGB, RandomResizedCrop) end to
    end, in-process, on a few real image files written here."""
    import numpy as np
    from PIL import Image

    from pipeline.data.shards import write_parquet_shards

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 4)):
        for c in range(3):
            folder = tmp_path / "tree" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) // (c + 1), "RGB")
                img.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    write_parquet_shards(tmp_path / "tree", tmp_path / "shards", rows_per_shard=10)
    overrides = ["data.dataset=parquet", f"data.root={tmp_path / 'shards'}", "data.image_size=32",
                 "data.train_subset=null", "data.val_subset=null", "data.test_subset=null", "data.val_fraction=0.25",
                 "data.batch_size=8", "model.in_channels=3", "model.num_classes=3", "tracking.experiment=parquet"]
    args = ["--config", "tiny", "--storage", str(tmp_path / "runs"), "--in-process"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    ev = json.loads((tmp_path / "runs" / "tiny" / "evaluate" / "evaluation.json").read_text())
    assert ev["models"]["compressed"]["test_top5"] == 1.0  # 3 classes: top-5 covers all


def test_missing_files_and_unknown_models_fail_before_anything_starts(tmp_path, capsys):
    storage = tmp_path / "runs"
    for override, expected in (("model.weights=/nonexistent/resnet50.pth", "model.weights"),
                               ("model.arch=resnet9000", "unknown model arch"),
                               ("baseline.checkpoint=/nonexistent/model.safetensors", "baseline.checkpoint")):
        assert main(["--config", "tiny", "--storage", str(storage), "--set", override]) == 2
        assert expected in capsys.readouterr().err
    assert not storage.exists()
