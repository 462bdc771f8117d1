"""A training stage interrupted on Ray Train resumes from its last checkpoint when re-run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

import penni
from penni.models import build_model
from pipeline.config.loading import load_config, to_dict
from pipeline.stages.functions import retrain_training
from pipeline.training.distributed import TrainJob, run_training

pytestmark = pytest.mark.timeout(600)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def ray_with_fault(tmp_path):
    marker = tmp_path / "failed-once"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=3, object_store_memory=200_000_000, include_dashboard=None,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                                       "PENNI_FAIL_ONCE": f"retrain:1:{marker}"}})
    yield marker
    ray.shutdown()


def test_interrupted_ray_train_stage_resumes_from_its_checkpoint(ray_with_fault, tmp_path):
    marker = ray_with_fault
    cfg = load_config("tiny", ["retrain.epochs=3", "data.train_subset=256", "data.val_subset=64"])
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5)
    penni.save(model, tmp_path / "in.safetensors")
    job = TrainJob(stage="retrain", config=to_dict(cfg), input_model=str(tmp_path / "in.safetensors"),
                   training=retrain_training(cfg.retrain))
    kwargs = dict(use_ray=True, run_name="retrain-resume", storage=(str(tmp_path / "train"), None), num_workers=2,
                  use_gpu=False, cpus_per_worker=1, max_failures=0, local_dir=tmp_path / "work")
    with pytest.raises(Exception, match="injected failure"):
        run_training(job, **kwargs)
    assert marker.exists()
    checkpoint_dir, result = run_training(job, **kwargs)
    assert result["start_epoch"] == 1  # epoch 0 came from the checkpoint, not from training again
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    assert [h["phase"] for h in result["history"]] == ["coefficients", "basis", "coefficients"]  # the schedule resumes too
    assert (checkpoint_dir / "model.safetensors").exists()
    assert "PENNI_FAIL_ONCE" not in os.environ  # the fault lives only in the Ray workers
