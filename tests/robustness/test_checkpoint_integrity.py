"""Training checkpoints are verified before they are resumed from, and a run that cannot train fails.

Real Ray (2 CPU workers), real MLflow (SQLite), real Fashion-MNIST: the pipeline runs as the user
runs it (``workflows/full_pipeline.py`` in a subprocess, so the Ray workers' lines reach its output).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import penni
from penni.models import build_model
from pipeline.config.loading import load_config, to_dict
from pipeline.stages.fingerprints import stage_fingerprints
from pipeline.stages.functions import retrain_training
from pipeline.stages.table import TRAINING_STAGES
from pipeline.storage.run_store import RunStore
from pipeline.training.checkpoints import CHECKSUMS_FILE, checkpoint_problem
from pipeline.training.distributed import TrainJob, run_training
from pipeline.training.loop import NonFiniteLossError, TrainingError, check_trainable

pytestmark = pytest.mark.timeout(900)
REPO_ROOT = Path(__file__).resolve().parents[2]
WARNING = "warning: discarding checkpoint"


def _pipeline(storage: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``full_pipeline.py --config tiny`` as a user runs it; output is stdout and stderr together."""
    args = [sys.executable, str(REPO_ROOT / "workflows" / "full_pipeline.py"), "--config", "tiny",
            "--storage", str(storage)]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return penni.load(path).state_dict()


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _checkpoints(root: Path, stage: str) -> list[Path]:
    """Every Ray Train checkpoint directory of ``stage``, oldest first (names are timestamps)."""
    return sorted((p for p in (root / "_train").glob(f"{stage}-*/checkpoint_*") if p.is_dir()), key=lambda p: p.name)


def _corrupt(path: Path) -> None:
    """Overwrite the last 256 bytes (tensor data) with 0xFF: NaN float32 values, same file size."""
    data = bytearray(path.read_bytes())
    data[-256:] = b"\xff" * 256
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    storage = tmp_path_factory.mktemp("integrity")
    done = _pipeline(storage)
    assert done.returncode == 0, done.stdout[-3000:]
    root = storage / "tiny"
    for name in ("finetune", "evaluate"):
        shutil.copytree(root / name, storage / f"first-{name}")
    return storage, root


def test_corrupt_training_checkpoint_is_discarded_not_published(finished_run):
    storage, root = finished_run
    (checkpoint,) = _checkpoints(root, "finetune")  # tiny: one epoch, one checkpoint
    assert checkpoint_problem(checkpoint) is None
    _corrupt(checkpoint / "best.safetensors")
    assert "best.safetensors" in checkpoint_problem(checkpoint)
    (root / "finetune" / "manifest.json").unlink()

    rerun = _pipeline(storage)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    # Ray 2.60 echoes each line a Ray Train worker prints twice, verbatim: count distinct lines (a second
    # rank printing it too would carry another pid)
    warnings = sorted({line for line in rerun.stdout.splitlines() if WARNING in line})
    assert len(warnings) == 1, warnings
    assert checkpoint.name in warnings[0] and "best.safetensors" in warnings[0]
    assert "resuming from epoch" not in rerun.stdout  # no good checkpoint left: trained again from prune's output
    # the published model is the one training from the stage input gives (training is deterministic)
    assert _same_tensors(_tensors(root / "finetune" / "model.safetensors"),
                         _tensors(storage / "first-finetune" / "model.safetensors"))
    before = json.loads((storage / "first-evaluate" / "evaluation.json").read_text())["models"]["compressed"]
    after = json.loads((root / "evaluate" / "evaluation.json").read_text())["models"]["compressed"]
    assert math.isfinite(after["test_loss"])
    assert (after["test_loss"], after["test_top1"]) == (before["test_loss"], before["test_top1"])


def test_changed_finetune_input_is_never_resumed_into(finished_run):
    storage, root = finished_run
    cfg = load_config("tiny", [f"storage={json.dumps(str(storage))}"])
    old_runs = {p.name for p in (root / "_train").glob("finetune-*")}
    old_model = _tensors(root / "finetune" / "model.safetensors")
    # prune's output changes content under the same fingerprint (as a re-run that came out differently would)
    changed = storage / "changed-prune"
    shutil.copytree(root / "prune", changed)
    (changed / "manifest.json").unlink()
    model = penni.load(changed / "model.safetensors")
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    penni.save(model, changed / "model.safetensors")
    store = RunStore(str(storage), "tiny")
    metrics = json.loads((root / "prune" / "manifest.json").read_text())["metrics"]
    store.commit_stage("prune", changed, stage_fingerprints(cfg)["prune"], metrics)
    (root / "finetune" / "manifest.json").unlink()

    rerun = _pipeline(storage)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "[prune] up to date" in rerun.stdout  # the changed content was accepted as prune's output
    assert "[finetune] resuming from epoch" not in rerun.stdout
    new_runs = {p.name for p in (root / "_train").glob("finetune-*")} - old_runs
    assert len(new_runs) == 1, new_runs  # a training run of its own, keyed by the new input's content
    assert not _same_tensors(_tensors(root / "finetune" / "model.safetensors"), old_model)


def test_zero_batch_epoch_fails_with_one_line_and_no_retry(tmp_path):
    done = _pipeline(tmp_path, "data.train_subset=100")
    assert done.returncode != 0
    message = "data.train_subset=100 gives 0 batches of 64 per worker with 2 workers"
    lines = [line for line in done.stdout.splitlines() if message in line]
    assert lines, done.stdout[-3000:]
    assert "lower data.batch_size" in lines[0] and "raise data.train_subset" in lines[0]
    assert "retry" not in done.stdout
    assert not (tmp_path / "tiny" / "baseline" / "manifest.json").exists()


def test_check_trainable_names_the_setting_to_change():
    cfg = load_config("tiny", ["data.train_subset=100"])
    with pytest.raises(TrainingError, match=r"^data.train_subset=100 gives 0 batches of 64 per worker with 2 workers: "
                                            r"lower data.batch_size.* or raise data.train_subset$"):
        check_trainable(cfg, 100, TRAINING_STAGES)
    assert isinstance(TrainingError("x"), ValueError)  # stage retries leave ValueErrors alone
    check_trainable(cfg, 128, TRAINING_STAGES)  # 64 per worker: one batch each
    check_trainable(cfg, 100, TRAINING_STAGES, num_workers=1)  # in one process: one batch of 64


# ---------------------------------------------------------------------------------------------
# the loop itself (in-process world and Ray Train world): an older good checkpoint is resumed from


def _retrain_job(tmp_path: Path, epochs: int) -> TrainJob:
    cfg = load_config("tiny", [f"retrain.epochs={epochs}", "data.train_subset=256", "data.val_subset=64"])
    torch.manual_seed(0)
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5)
    penni.save(model, tmp_path / "in.safetensors")
    return TrainJob(stage="retrain", config=to_dict(cfg), input_model=str(tmp_path / "in.safetensors"),
                    training=retrain_training(cfg.retrain))


def _train_kwargs(tmp_path: Path, use_ray: bool) -> dict:
    return dict(use_ray=use_ray, run_name="retrain-integrity", storage=(str(tmp_path / "train"), None),
                num_workers=2, use_gpu=False, cpus_per_worker=1, max_failures=0, local_dir=tmp_path / "work")


def test_in_process_world_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    job, kwargs = _retrain_job(tmp_path, epochs=2), _train_kwargs(tmp_path, use_ray=False)
    final, _ = run_training(job, **kwargs)
    reference = _tensors(final / "model.safetensors")
    assert json.loads((final / CHECKSUMS_FILE).read_text())["sha256"].keys() >= {"model.safetensors", "train_state.pt"}
    _corrupt(final / "model.safetensors")
    capsys.readouterr()
    final, result = run_training(job, **kwargs)
    out = capsys.readouterr().out
    assert result["start_epoch"] == 1  # resumed from the good epoch-0 checkpoint, not from scratch
    assert [line for line in out.splitlines() if WARNING in line] == [
        f"[retrain] {WARNING} {kwargs['local_dir'] / 'retrain-integrity' / 'latest'}: model.safetensors does not "
        f"match its sha256; resuming from checkpoint {kwargs['local_dir'] / 'retrain-integrity' / 'previous'}"]
    assert _same_tensors(_tensors(final / "model.safetensors"), reference)


def test_ray_train_world_falls_back_to_an_older_checkpoint(local_ray, tmp_path):
    job, kwargs = _retrain_job(tmp_path, epochs=2), _train_kwargs(tmp_path, use_ray=True)
    final, _ = run_training(job, **kwargs)
    reference = _tensors(final / "model.safetensors")
    checkpoints = sorted(p for p in (tmp_path / "train" / "retrain-integrity").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # CheckpointConfig(num_to_keep=2)
    _corrupt(checkpoints[-1] / "model.safetensors")
    final, result = run_training(job, **kwargs)
    assert result["start_epoch"] == 1  # the corrupt latest was passed over for the epoch-0 checkpoint
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    assert _same_tensors(_tensors(final / "model.safetensors"), reference)
    assert checkpoint_problem(final) is None


def test_non_finite_loss_fails_naming_what_to_lower(tmp_path):
    job = _retrain_job(tmp_path, epochs=1)
    job.config["retrain"]["lr"] = 1e12
    with pytest.raises(NonFiniteLossError, match=r"^\[retrain\] loss became (nan|inf|-inf) at epoch 0 step \d+: "
                                                 r"lower retrain.lr \(now 1e\+12\) or retrain.l1 \(now 0.0001\)$"):
        run_training(job, **_train_kwargs(tmp_path, use_ray=False))
    assert isinstance(NonFiniteLossError("x"), ValueError)  # not retried by the stage retries
