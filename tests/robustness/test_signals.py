"""SIGTERM (what Kubernetes, Slurm and systemd send) stops a run as cleanly as Ctrl-C: exit 143 with the resume
hint, no lock left, the stage not published, the MLflow parent run ended as KILLED, no process of the run left
behind; and after a SIGTERM in retrain and another in fine-tuning, the re-run ends with the same
``evaluation.json`` (timings aside) as an uninterrupted run. With Ray (each signal once Ray Train has a checkpoint
of the stage) and in-process.

Before ``pipeline.cli.launch.stop_cleanly_on_sigterm``, Ray's own handler made the driver exit mid-call and it
aborted (exit 134)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import has_train_checkpoint, without_timings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO_ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ("baseline.epochs=1", "retrain.epochs=3", "finetune.epochs=3")


def _command(storage: Path, extra: tuple[str, ...]) -> list[str]:
    args = [sys.executable, str(REPO_ROOT / "workflows" / "full_pipeline.py"), "--config", "tiny",
            "--storage", str(storage)]
    for item in OVERRIDES + extra:
        args += ["--set", item]
    return args


def _env() -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    return env


def _session_alive(sid: int) -> set[int]:
    """Live (non-zombie) processes of session ``sid``: the driver is started as a session leader."""
    alive = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[4]) == sid and stat[0] != "Z":
            alive.add(int(entry))
    return alive


BEFORE = {"retrain": "decompose", "finetune": "prune"}  # the stage each signalled stage starts after


def _in_stage(root: Path, stage: str, use_ray: bool) -> bool:
    """``stage`` is running: with Ray, once Ray Train recorded a checkpoint of it; in-process, once it started."""
    if not (root / BEFORE[stage] / "manifest.json").exists():
        return False
    return has_train_checkpoint(root, stage) if use_ray else True


def _kill_session(sid: int) -> None:
    for pid in _session_alive(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _parent_run_status(root: Path) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("penni")
    runs = client.search_runs([experiment.experiment_id], "tags.`penni.role` = 'pipeline'")
    assert len(runs) == 1, f"expected one pipeline run, found {len(runs)}"
    return runs[0].info.status


def _terminate_during(stage: str, storage: Path, extra: tuple[str, ...], use_ray: bool, log: Path) -> None:
    """Start the run, SIGTERM its driver while ``stage`` runs, and check that it stopped cleanly."""
    root = storage / "tiny"
    with open(log, "w") as out:
        driver = subprocess.Popen(_command(storage, extra), cwd=REPO_ROOT, env=_env(), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and driver.poll() is None and not _in_stage(root, stage, use_ray):
            time.sleep(0.1)
        assert driver.poll() is None, f"the run ended before {stage}:\n{log.read_text()[-3000:]}"
        os.kill(driver.pid, signal.SIGTERM)
        code = driver.wait(timeout=120)
        text = log.read_text()
        assert code == 143, f"exit {code}:\n{text[-3000:]}"
        assert "interrupted: re-run the same command to resume" in text
        assert "Traceback" not in text, text[-3000:]
        assert not (root / ".lock").exists(), "the lock was left behind"
        assert not (root / stage / "manifest.json").exists(), f"{stage} was published although it was stopped"
        deadline = time.monotonic() + 60
        while _session_alive(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _session_alive(driver.pid), "processes of the stopped run are still alive"
        assert _parent_run_status(root) == "KILLED"
    finally:
        if driver.poll() is None:
            driver.kill()
        _kill_session(driver.pid)


def _run_to_end(storage: Path, extra: tuple[str, ...]) -> dict:
    """The run to its end; its ``evaluation.json`` without timings."""
    done = subprocess.run(_command(storage, extra), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600, start_new_session=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return without_timings(json.loads((storage / "tiny" / "evaluate" / "evaluation.json").read_text()))


@pytest.mark.parametrize("use_ray", [True, False], ids=["ray", "in_process"])
def test_sigterm_in_retrain_and_finetune_stops_cleanly_and_the_rerun_matches_an_uninterrupted_run(tmp_path, use_ray):
    extra = () if use_ray else ("ray.in_process=true",)
    want = _run_to_end(tmp_path / "uninterrupted", extra)
    storage = tmp_path / "runs"
    for stage in ("retrain", "finetune"):
        _terminate_during(stage, storage, extra, use_ray, tmp_path / f"terminated-in-{stage}.log")
    assert _run_to_end(storage, extra) == want
