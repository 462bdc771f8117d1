"""SIGTERM (what Kubernetes, Slurm and systemd send) stops a run as cleanly as Ctrl-C: exit 143 with the resume
hint, no lock left, the stage not published, the MLflow parent run ended as KILLED, no process of the run left
behind; and after a SIGTERM in retrain and another in fine-tuning, the re-run ends with the same
``evaluation.json`` (timings aside) as an uninterrupted run. In-process here; with Ray (each signal once Ray Train
has a checkpoint of the stage) in ``test_kill_resume.py``, next to its SIGKILLs.

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

from tests.helpers import assert_stopped_cleanly, has_train_checkpoint, without_timings

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
        assert_stopped_cleanly(driver, log, root, stage, _session_alive)
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


def test_sigterm_in_retrain_and_finetune_stops_cleanly_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    """In-process; with Ray, the same checks run in tests/robustness/test_kill_resume.py (sharing its
    uninterrupted reference run, which keeps the suite short)."""
    use_ray, extra = False, ("ray.in_process=true",)
    want = _run_to_end(tmp_path / "uninterrupted", extra)
    storage = tmp_path / "runs"
    for stage in ("retrain", "finetune"):
        _terminate_during(stage, storage, extra, use_ray, tmp_path / f"terminated-in-{stage}.log")
    assert _run_to_end(storage, extra) == want


def test_sigterm_waits_until_a_database_call_has_returned():
    """Inside SQLAlchemy or MLflow (an SQLite cursor open), the stop is delivered once the call has returned, so
    no half-closed cursor prints a traceback; elsewhere it is immediate."""
    from pipeline.cli import launch

    namespace = {"__name__": "sqlalchemy.engine.fake", "time": time, "os": os, "signal": signal}
    exec("def fetch(log):\n    os.kill(os.getpid(), signal.SIGTERM)\n    deadline = time.monotonic() + 0.3\n"
         "    while time.monotonic() < deadline:\n        pass\n    log.append('returned')\n", namespace)
    previous = signal.getsignal(signal.SIGTERM)
    log = []
    try:
        launch.stop_cleanly_on_sigterm()
        with pytest.raises(launch.Terminated):
            namespace["fetch"](log)
            time.sleep(5)  # the deferred signal arrives within DEFER_STEP_S
        assert log == ["returned"]
        launch.stop_cleanly_on_sigterm()
        with pytest.raises(launch.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            log.append("not interrupted")
        assert log == ["returned"]
    finally:
        signal.signal(signal.SIGTERM, previous)
        launch._SIGTERM_RECEIVED.clear()
        launch._DEFERRED.clear()
