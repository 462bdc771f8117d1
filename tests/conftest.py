"""Shared test setup: quiet, fast, private Ray; MLflow over SQLite in temporary directories."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray instance for one test module (never attaches to a running cluster)."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, object_store_memory=300_000_000, include_dashboard=None,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT),
                                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
    yield ray
    ray.shutdown()
