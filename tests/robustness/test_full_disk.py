"""A full disk is one line naming the storage, and the re-run after freeing space finishes.

The disk is a real small tmpfs (mounting needs root, as on CI and in containers; elsewhere the tmpfs tests are
skipped with that reason); ``/dev/full`` gives a real ENOSPC anywhere."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.launch import failure_line

pytestmark = pytest.mark.timeout(900)
REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """Write a filler file until only about ``leave_bytes`` are free."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as f:
        f.truncate(0)
        remaining = max(0, free - leave_bytes)
        while remaining > 0:
            chunk = min(remaining, 1 << 20)
            f.write(b"\0" * chunk)
            remaining -= chunk
    return filler


def test_enospc_is_named_as_storage_with_its_path():
    try:
        with open("/dev/full", "wb") as f:
            f.write(b"x")
            f.flush()
    except OSError as err:
        wrapped = RuntimeError("stage commit failed")
        wrapped.__cause__ = err
        line = failure_line(wrapped, where="/runs/exp")
    assert line.startswith("storage: no space left on device at /runs/exp (No space left on device)"), line


def test_mlflow_on_a_full_disk_is_named_as_storage_not_sqlalchemy(tmp_path):
    import mlflow

    with small_disk(tmp_path / "disk", "3m") as disk:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{disk / 'mlflow.db'}")
        run = client.create_run(client.create_experiment("full"))
        _fill(disk, 0)
        with pytest.raises(Exception) as err:  # whatever MLflow raises on SQLITE_FULL
            for i in range(10_000):
                client.log_param(run.info.run_id, f"p{i}", "v" * 200)
        line = failure_line(err.value)
    assert line.startswith("storage: no space left on device"), line
    assert "autoflush" not in line


def test_a_run_on_a_full_disk_fails_in_one_line_and_the_rerun_finishes(tmp_path):
    command = [sys.executable, str(REPO / "workflows" / "full_pipeline.py"), "--config", "tiny", "--set",
               "ray.in_process=true"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    with small_disk(tmp_path / "disk", "64m") as disk:
        command += ["--storage", str(disk / "runs")]
        filler = _fill(disk, 600_000)  # room for the lock and the baseline, not for the whole run
        first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
        assert first.returncode != 0, first.stdout[-2000:]
        assert len(errors) == 1 and errors[0].startswith("error: storage: no space left on device"), first.stderr[-3000:]
        assert not (disk / "runs" / "tiny" / ".lock").exists(), "the lock was left behind"
        filler.unlink()
        rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
        assert (disk / "runs" / "tiny" / "report" / "manifest.json").exists()
