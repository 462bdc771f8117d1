"""SIGKILL or SIGTERM of the driver during each training stage: the re-run resumes and ends where an uninterrupted
run ends.

One storage is interrupted three times in a row: SIGKILL during ``baseline``, then (re-run) SIGTERM (what Kubernetes,
Slurm and systemd send) during ``retrain``, then (re-run) SIGTERM during ``finetune``, each time once Ray Train has
recorded the stage's first checkpoint; a last re-run finishes. Each re-run must resume the stage interrupted before
it, and each SIGTERM must be a clean stop (exit 143, no lock, no traceback, the MLflow run KILLED, no process left).
The last run's ``evaluation.json`` (latency excepted) and the published weights of every training stage must equal
those of an uninterrupted run of the same command, exactly: two gloo workers on CPU are bit-reproducible (a two-way
all-reduce is one commutative addition; data order, augmentation and initialization are seeded per epoch and rank;
optimizer, LR schedule and best-so-far model come back from the checkpoint). Training stages run 3 epochs instead
of tiny's 1, so that a signal lands between two checkpoints of the stage. (One storage, five driver starts: each
start with Ray costs ~a minute of CI; the resume after a SIGKILL and after a SIGTERM is the same code path, and the
in-process variants of both signals are ``test_resume.py`` and ``test_signals.py``.)

Every process of an interrupted driver (its Ray node included) is killed before the re-run, and at the end.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import penni
from tests.helpers import assert_stopped_cleanly, has_train_checkpoint, without_timings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
REPO_ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ("baseline.epochs=3", "retrain.epochs=3", "finetune.epochs=3")
TRAINING = ("baseline", "retrain", "finetune")


def _command(storage: Path) -> list[str]:
    args = [sys.executable, str(REPO_ROOT / "workflows" / "full_pipeline.py"), "--config", "tiny",
            "--storage", str(storage)]
    for item in OVERRIDES:
        args += ["--set", item]
    return args


def _env() -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "PYTHONUNBUFFERED": "1"}  # what a killed driver printed is in its log
    env.pop("RAY_ADDRESS", None)
    return env


def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(pid: int) -> set[int]:
    parents: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        stat = _proc_stat(int(entry))
        if stat:
            parents.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _in_session(sid: int) -> set[int]:
    """Processes of the session ``sid`` (the driver is started as a session leader)."""
    pids = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        stat = _proc_stat(int(entry))
        if stat and int(stat[4]) == sid and stat[0] != "Z":
            pids.add(int(entry))
    return pids


def _kill_tree(driver: subprocess.Popen, known: set[int]) -> None:
    """SIGKILL the driver, then every process it left (its descendants and its session)."""
    if driver.poll() is None:
        driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = {p for p in (known | _in_session(driver.pid)) if (_proc_stat(p) or ["Z"])[0] != "Z"}
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes of the killed driver survive: {sorted(alive)}")


def _run_driver(storage: Path, log: Path, stop_when: Callable[[], bool], poll: float) -> subprocess.Popen:
    """Start the pipeline in its own session; return once it exits or ``stop_when()`` holds (600 s at most),
    with the driver still running in the latter case. Its processes are recorded on ``driver.known``."""
    with open(log, "w") as out:
        driver = subprocess.Popen(_command(storage), cwd=REPO_ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    driver.known = set()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None and not stop_when():
        driver.known |= _descendants(driver.pid)
        time.sleep(poll)
    driver.known |= _descendants(driver.pid) if driver.poll() is None else set()
    return driver


def _run_and_kill_during(storage: Path, stage: str, log: Path) -> str:
    """Start the pipeline; SIGKILL its driver once ``stage`` has a checkpoint but no manifest yet."""
    root = storage / "tiny"
    driver = _run_driver(storage, log, lambda: has_train_checkpoint(root, stage), poll=0.05)
    try:
        assert driver.poll() is None, f"the pipeline ended before {stage} checkpointed:\n{log.read_text()[-3000:]}"
        os.kill(driver.pid, signal.SIGKILL)
        assert not (root / stage / "manifest.json").exists(), f"killed too late: {stage} had already finished"
    finally:
        _kill_tree(driver, driver.known)
    return log.read_text()


def _run_and_terminate_during(storage: Path, stage: str, log: Path) -> str:
    """Start the pipeline; SIGTERM its driver once ``stage`` has a Ray Train checkpoint: it must stop cleanly (exit
    143 with the resume hint, no traceback, no lock, the stage unpublished, the MLflow run KILLED, no process left)."""
    root = storage / "tiny"
    driver = _run_driver(storage, log, lambda: has_train_checkpoint(root, stage), poll=0.05)
    try:
        assert driver.poll() is None, f"the pipeline ended before {stage} checkpointed:\n{log.read_text()[-3000:]}"
        os.kill(driver.pid, signal.SIGTERM)
        assert_stopped_cleanly(driver, log, root, stage, _in_session)
    finally:
        _kill_tree(driver, driver.known)
    return log.read_text()


def _run_to_end(storage: Path, log: Path) -> str:
    driver = _run_driver(storage, log, lambda: False, poll=0.5)
    try:
        assert driver.poll() == 0, log.read_text()[-3000:]
    finally:
        _kill_tree(driver, driver.known)
    return log.read_text()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return penni.load(path).state_dict()


def test_driver_killed_or_terminated_in_each_training_stage_resumes_to_the_same_result(tmp_path):
    reference = tmp_path / "uninterrupted"
    _run_to_end(reference, tmp_path / "uninterrupted.log")

    interrupted = tmp_path / "interrupted"
    _run_and_kill_during(interrupted, "baseline", tmp_path / "killed-in-baseline.log")
    outputs = [_run_and_terminate_during(interrupted, stage, tmp_path / f"terminated-in-{stage}.log")
               for stage in ("retrain", "finetune")]
    outputs.append(_run_to_end(interrupted, tmp_path / "after-interruptions.log"))
    for stage, rerun in zip(TRAINING, outputs):
        assert f"[{stage}] resuming from epoch" in rerun, f"{stage} was not resumed:\n{rerun[-3000:]}"
        assert "warning: discarding checkpoint" not in rerun

    for stage in (*TRAINING, "shrink"):  # stage by stage first, so a difference names where it began
        a = _tensors(reference / "tiny" / stage / "model.safetensors")
        b = _tensors(interrupted / "tiny" / stage / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    want = json.loads((reference / "tiny" / "evaluate" / "evaluation.json").read_text())
    got = json.loads((interrupted / "tiny" / "evaluate" / "evaluation.json").read_text())
    assert without_timings(got) == without_timings(want)
