"""Bad data, storage and tracking fail before anything starts, or at run time, with one clear line.

Real Fashion-MNIST (Debian package dataset-fashion-mnist) and small ImageFolder trees written here
with PIL; the runtime case runs the real pipeline on Ray in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli.launch import preflight
from pipeline.cli.runner import main, parse_args, resolve_config

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "workflows" / "full_pipeline.py"


def _tree(root: Path, classes: int, per_class: int = 6, size: int = 24) -> Path:
    """An ImageFolder tree root/{train,val}/class<c>/<i>.jpg of random RGB images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.jpg")
    return root


def _imagefolder_args(storage: Path, root: Path, classes: int, *extra: str) -> list[str]:
    sets = ["data.dataset=imagefolder", f"data.root={root}", "data.image_size=16", "data.train_subset=null",
            "data.val_subset=null", "data.test_subset=null", "data.val_fraction=0.25", "data.batch_size=4",
            "model.in_channels=3", f"model.num_classes={classes}"]
    args = ["--config", "tiny", "--storage", str(storage)]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _fails_in_one_line(capsys, args: list[str], storage: Path, *expected: str) -> str:
    """main(args) exits 2 with a single line on stderr that holds ``expected``; nothing is written."""
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not storage.exists() or not any(storage.iterdir())
    return lines[0]


def test_empty_data_root_is_an_error_not_the_system_copy(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    storage = tmp_path / "runs"
    _fails_in_one_line(capsys, ["--config", "tiny", "--storage", str(storage), "--set", f"data.root={tmp_path / 'empty'}"],
                       storage, "data.root", str(tmp_path / "empty"), "does not hold Fashion-MNIST")


def test_fashion_mnist_class_count_must_match_the_model(tmp_path, capsys):
    storage = tmp_path / "runs"
    _fails_in_one_line(capsys, ["--config", "tiny", "--storage", str(storage), "--set", "model.num_classes=7"],
                       storage, "10 classes", "model.num_classes=7")


def test_imagefolder_with_one_class_fails_naming_both_counts(tmp_path, capsys):
    root = _tree(tmp_path / "tree", classes=1)
    storage = tmp_path / "runs"
    _fails_in_one_line(capsys, _imagefolder_args(storage, root, 10), storage, "1 class ", "model.num_classes=10")


def test_empty_class_folder_is_named(tmp_path, capsys):
    root = _tree(tmp_path / "tree", classes=3)
    (root / "train" / "class9").mkdir()
    storage = tmp_path / "runs"
    _fails_in_one_line(capsys, _imagefolder_args(storage, root, 4), storage, str(root / "train" / "class9"), "no images")


def test_undecodable_image_is_named_before_anything_starts(tmp_path, capsys):
    root = _tree(tmp_path / "tree", classes=3)
    bad = root / "train" / "class1" / "2.jpg"
    bad.write_bytes(b"\x00 this is not a JPEG " * 20)
    storage = tmp_path / "runs"
    _fails_in_one_line(capsys, _imagefolder_args(storage, root, 3), storage, "cannot decode", str(bad))


def test_undecodable_image_in_parquet_shards_is_named(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.shards import write_parquet_shards

    root = _tree(tmp_path / "tree", classes=3)
    shards = tmp_path / "shards"
    write_parquet_shards(root, shards, rows_per_shard=100)
    shard = next((shards / "train").glob("*.parquet"))
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[4] = b"garbage" * 10
    meta = table.schema.metadata
    table = table.set_column(0, "image", pa.array(images, pa.binary())).replace_schema_metadata(meta)
    pq.write_table(table, shard)
    storage = tmp_path / "runs"
    args = _imagefolder_args(storage, shards, 3)
    args[args.index("data.dataset=imagefolder")] = "data.dataset=parquet"
    _fails_in_one_line(capsys, args, storage, "cannot decode", f"row 4 of row group 0 of {shard}")


def test_storage_that_is_a_regular_file_is_named_as_storage(tmp_path, capsys):
    storage = tmp_path / "a-file"
    storage.write_text("not a directory")
    assert main(["--config", "tiny", "--storage", str(storage)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: storage") and str(storage) in lines[0], lines
    assert "mlflow" not in lines[0].lower()
    assert storage.read_text() == "not a directory"


def test_unreachable_tracking_server_fails_in_preflight_in_one_line(tmp_path):
    cfg = resolve_config(parse_args(["--config", "tiny", "--storage", str(tmp_path / "runs")]))
    started = time.monotonic()
    problems = preflight(cfg, "http://127.0.0.1:9")
    assert time.monotonic() - started < 15  # MLflow's own retries take minutes
    assert problems and problems[0].startswith("tracking:") and "http://127.0.0.1:9" in problems[0]

    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "tiny", "--storage", str(tmp_path / "runs"),
                           "--tracking-uri", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unreachable" in lines[0] and "http://127.0.0.1:9" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()


def test_image_that_breaks_at_training_time_is_one_line_and_not_retried(tmp_path):
    """Truncated JPEGs pass the header check; the Ray Train worker that decodes one fails. The
    driver names the file in one line, the stage is not retried, and the traceback goes to a log.
    Every image of one class is truncated, so that the validation split (decoded in full every
    epoch) holds some."""
    root = _tree(tmp_path / "tree", classes=3, size=64)
    bad = sorted((root / "train" / "class0").glob("*.jpg"))
    for path in bad:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    storage = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    # ImageNet statistics: with data.normalize=auto the pre-run statistics sample decodes images and would
    # stop at a truncated one before training (exit 2); this test is about the training-time path
    args = _imagefolder_args(storage, root, 3, "--set", "data.normalize=imagenet")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=800, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert proc.stdout.startswith("penni pipeline 'tiny'")  # past the checks: it failed while training
    assert "[baseline] done" not in proc.stdout and "Traceback" not in out
    assert "retry" not in out.lower(), out[-3000:]
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: data:"), proc.stderr[-3000:]
    assert any(f"cannot decode the image {path} " in errors[0] for path in bad), errors[0]
    logs = list((storage / "tiny" / "logs").glob("error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in proc.stderr and "Traceback" in logs[0].read_text()


def _nested_anchors(levels: int, width: int = 9) -> str:
    """A "billion laughs" YAML: each level a list of ``width`` aliases of the level below (width**levels values)."""
    lines = ["    l0: &l0 [" + ", ".join(['"x"'] * width) + "]"]
    lines += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_a_yaml_bomb_is_refused_in_one_line_before_it_expands(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("name: bomb\nmodel:\n  kwargs:\n    nested:\n" + _nested_anchors(9).replace("    l", "      l"))
    assert bomb.stat().st_size < 1000
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(bomb)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    problems = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert problems == [problems[0]] and problems[0].startswith("  - model.kwargs.nested: YAML anchors and aliases")
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert time.perf_counter() - started < 60  # a process start; the check itself is linear in the distinct nodes


def test_a_few_anchors_still_load_and_an_alias_bomb_in_set_is_named(tmp_path):
    from pipeline.config.loading import ConfigError, load_config

    shared = tmp_path / "shared.yaml"
    shared.write_text("name: shared\nbaseline: &train {lr: 0.03, epochs: 2}\nfinetune: *train\n")
    cfg = load_config(shared)
    assert (cfg.finetune.lr, cfg.finetune.epochs) == (0.03, 2)
    levels = [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 8)]
    value = "[&l0 [1,2,3,4,5,6,7,8,9], " + ", ".join(levels) + "]"
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"model.kwargs={{x: {value}}}"])
    assert "model.kwargs.x: YAML anchors and aliases expand" in str(err.value)


RUNAWAY = [  # (override, the key named, the limits override that lets a user mean it)
    ("baseline.epochs=1000000000000", "baseline.epochs", "limits.max_epochs=1000000000000"),
    ("finetune.epochs=20000", "finetune.epochs", "limits.max_epochs=20000"),
    ("compress.step_epochs=50000", "compress.step_epochs", "limits.max_epochs=50000"),
    ("data.image_size=5000", "data.image_size", "limits.max_image_size=5000"),
    ("data.loader_workers=5000", "data.loader_workers", "limits.max_loader_workers=5000"),
    ("evaluate.latency_repeats=1000000000", "evaluate.latency_repeats", "limits.max_repeats=1000000000"),
    ("sweep.num_samples=10000000", "sweep.num_samples", "limits.max_repeats=10000000"),
    ("data.synthetic_size=1000000000000", "data.synthetic_size", "limits.max_synthetic_examples=1000000000000"),
]


@pytest.mark.parametrize("override,key,allow", RUNAWAY, ids=[r[1] for r in RUNAWAY])
def test_values_that_can_only_fail_later_are_refused_unless_the_limit_is_raised(override, key, allow):
    from pipeline.config.loading import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert len(err.value.errors) == 1 and err.value.errors[0].startswith(f"{key}: "), err.value.errors
    assert f"--set {allow.split('=')[0]}=" in err.value.errors[0]
    small_batches = ["data.batch_size=1", "data.eval_batch_size=1", "prune.latency_batch_sizes=[1]",
                     "evaluate.latency_batch_sizes=[1]"]  # so that a 5000-pixel image fits in this machine
    load_config("tiny", [override, allow, *small_batches])


def test_a_batch_larger_than_memory_is_refused_with_its_size_before_anything_starts(tmp_path):
    from pipeline.config.loading import ConfigError, load_config
    from pipeline.config.schema import _machine_memory

    memory = _machine_memory()
    batch = int(memory // (4 * 3 * 224 * 224)) + 1  # one float32 batch of 3x224x224 larger than this machine
    sets = ["model.in_channels=3", "data.image_size=224"]
    for key in ("data.batch_size", "data.eval_batch_size", "prune.latency_batch_sizes", "evaluate.latency_batch_sizes"):
        value = f"[1, {batch}]" if key.endswith("sizes") else str(batch)
        with pytest.raises(ConfigError) as err:
            load_config("tiny", [*sets, f"{key}={value}"])
        assert len(err.value.errors) == 1 and err.value.errors[0].startswith(key), err.value.errors
        assert "GiB before any activation" in err.value.errors[0]
    load_config("tiny", [*sets, f"data.batch_size={batch // 8}", "limits.max_batch_memory=0.5"])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "tiny", "--storage", str(tmp_path / "runs"),
                           "--set", "data.image_size=100000"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "data.image_size: 100,000 is more than" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()
