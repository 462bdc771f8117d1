"""Shared test setup: quiet, fast, private Ray; MLflow over SQLite in temporary directories; a marker per folder.

The folders are the test layers: ``penni/`` (pure PyTorch), ``pipeline/`` (no Ray), ``integration/`` (Ray, MLflow,
S3, browser, jobs) and ``robustness/`` (hostile files, bad inputs, kill and resume). Each test gets its folder's
name as a marker, so ``-m "penni or pipeline"`` selects the fast layers from anywhere."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
LAYERS = ("penni", "pipeline", "integration", "robustness")
sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(autouse=True)
def no_leaked_tracking_uri():
    """``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` for subprocesses: undo it after each test,
    or every later run started as a subprocess would track into that test's (deleted) database."""
    yield
    if "MLFLOW_TRACKING_URI" in os.environ:
        import mlflow

        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


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


@pytest.fixture(scope="session")
def tiny_ray_run(tmp_path_factory):
    """One run of the tiny pipeline on Ray (2 Train workers) as a user runs it: ``workflows/full_pipeline.py
    --config tiny`` in its own process, output through a pipe, while another Ray (this process's) runs on the
    machine. Returns ``(storage, stdout and stderr merged)``. Shared to keep the suite short: test_console reads
    what it printed, test_pipeline what it wrote (and then re-runs into the same storage)."""
    import subprocess

    import ray

    work = tmp_path_factory.mktemp("tiny_ray_run")
    ours = not ray.is_initialized()
    if ours:
        ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run([sys.executable, str(REPO_ROOT / "workflows" / "full_pipeline.py"), "--config", "tiny",
                               "--storage", str(work / "runs")], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=850)
    finally:
        if ours:
            ray.shutdown()
    assert done.returncode == 0, done.stdout[-4000:]
    return work / "runs", done.stdout


def pytest_collection_modifyitems(config, items):
    """Mark each test with its folder's layer (``penni``, ``pipeline``, ``integration``, ``robustness``)."""
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        if parts and parts[0] in LAYERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
