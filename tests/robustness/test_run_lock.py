"""One process at a time per run name: the lock file, stale takeover, object-store leases, and two
real pipeline processes started at once with the same run name."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.stages.table import STAGES
from pipeline.storage import lock as L
from pipeline.storage.lock import RunLock, RunLockedError
from pipeline.storage.run_store import RunStore

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "workflows" / "full_pipeline.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(store: RunStore, **holder) -> Path:
    path = Path(store.root) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00",
                                "since_epoch": time.time(), "token": "old", **holder}))
    return path


def test_second_holder_is_refused_with_the_holders_pid_host_and_time(tmp_path):
    store = RunStore(str(tmp_path), "exp")
    first = RunLock(store).acquire()
    holder = json.loads((tmp_path / "exp" / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunLockedError) as err:
        RunLock(RunStore(str(tmp_path), "exp")).acquire()
    assert str(err.value).startswith(
        f"run 'exp' is already running (pid {os.getpid()} on {socket.gethostname()} since {holder['since']})")
    RunLock(RunStore(str(tmp_path), "other")).acquire().release()  # other run names are independent
    first.release()
    assert not (tmp_path / "exp" / ".lock").exists()
    with RunLock(store) as again:
        assert again.held


def test_an_empty_lock_file_is_named_with_its_age_then_taken_over(tmp_path):
    store = RunStore(str(tmp_path), "exp")
    path = Path(store.root) / ".lock"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # what a full disk left behind before the lock was written atomically
    with pytest.raises(RunLockedError) as err:
        RunLock(store).acquire()
    assert "empty or unreadable lock file" in str(err.value) and str(path) in str(err.value)
    old = time.time() - 2 * L.EMPTY_LOCK_GRACE_S
    os.utime(path, (old, old))
    warnings = []
    with RunLock(store, warn=warnings.append) as lock:
        assert lock.held and json.loads(path.read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and "empty or unreadable" in warnings[0]


def test_a_lock_that_cannot_be_written_leaves_no_lock_file(tmp_path):
    """Writes fail (a file-size limit of 0 bytes: the same EFBIG/ENOSPC path as a full disk): the run is refused
    as a storage problem, and no lock file is left for the next run to trip on."""
    code = (f"import resource, signal, sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from pipeline.storage.lock import RunLock\nfrom pipeline.storage.run_store import RunStore, StorageError\n"
            f"store = RunStore({str(tmp_path)!r}, 'exp')\nimport os; os.makedirs(store.root, exist_ok=True)\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
            "try:\n    RunLock(store).acquire()\nexcept StorageError as e:\n    print('refused:', e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "cannot write the lock file" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == []
    with RunLock(RunStore(str(tmp_path), "exp")) as lock:  # space is back: the next run just starts
        assert lock.held


def test_lock_of_a_sigkilled_process_is_taken_over_with_one_warning(tmp_path):
    code = (f"import os, sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from pipeline.storage import RunStore; from pipeline.storage.lock import RunLock\n"
            f"RunLock(RunStore({str(tmp_path)!r}, 'exp')).acquire(); print('held', flush=True)\n"
            "import time; time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    store = RunStore(str(tmp_path), "exp")
    with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
        RunLock(store).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    warnings: list[str] = []
    lock = RunLock(store, warn=warnings.append).acquire()
    assert lock.held and len(warnings) == 1
    assert f"took over the stale lock of run 'exp' (pid {holder.pid} " in warnings[0]
    assert json.loads((tmp_path / "exp" / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_only_one_of_two_takeovers_of_a_stale_lock_wins(tmp_path):
    store = RunStore(str(tmp_path), "exp")
    _write_lock(store, pid=_dead_pid())
    first = RunLock(store, warn=lambda line: None).acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} "):
        RunLock(store, warn=lambda line: None).acquire()
    first.release()


def test_a_live_or_foreign_holder_is_never_taken_over(tmp_path):
    store = RunStore(str(tmp_path), "exp")
    _write_lock(store, pid=os.getpid())  # alive, started before the lock was written
    with pytest.raises(RunLockedError):
        RunLock(store).acquire()
    _write_lock(store, pid=_dead_pid(), host="another-host.example")  # liveness unknowable
    with pytest.raises(RunLockedError, match="on another-host.example since"):
        RunLock(store).acquire()


def test_waiting_acquire_gets_the_lock_when_the_holder_releases(tmp_path):
    import threading

    store = RunStore(str(tmp_path), "exp")
    first = RunLock(store).acquire()
    threading.Timer(1.5, first.release).start()
    second = RunLock(store).acquire(wait=30)
    assert second.held
    second.release()


def test_object_store_lease_excludes_then_expires(monkeypatch):
    import pyarrow.fs as pafs

    monkeypatch.setattr(L, "READ_BACK_S", 0.05)
    fs = pafs._MockFileSystem()
    first = RunLock(RunStore("/bucket/runs", "exp", filesystem=fs)).acquire()
    with pytest.raises(RunLockedError, match="already running"):
        RunLock(RunStore("/bucket/runs", "exp", filesystem=fs)).acquire()
    first.release()
    assert fs.get_file_info("/bucket/runs/exp/.lock").type == pafs.FileType.NotFound
    other = RunStore("/bucket/runs", "exp", filesystem=fs)
    with fs.open_output_stream("/bucket/runs/exp/.lock") as f:  # a lease whose holder stopped renewing
        f.write(json.dumps({"host": "h", "pid": 1, "since": "then", "token": "old",
                            "expires_epoch": time.time() - 1}).encode())
    warnings: list[str] = []
    lock = RunLock(other, warn=warnings.append).acquire()
    assert lock.held and len(warnings) == 1 and "stale lease" in warnings[0]
    lock.release()


def _pipeline(storage: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), "--config", "tiny", "--run-name", "X",
                             "--storage", str(storage), "--in-process", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=storage)


def test_two_concurrent_runs_of_one_name_then_a_stale_lock(tmp_path):
    """Two processes with the same run name: one exits 2 with the lock line, the other finishes with
    verified manifests. Then a lock left by a dead process is taken over by the next run."""
    first = _pipeline(tmp_path)
    lock_file = tmp_path / "X" / ".lock"
    deadline = time.monotonic() + 300
    while not lock_file.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = _pipeline(tmp_path)
    out2, err2 = second.communicate(timeout=600)
    out1, err1 = first.communicate(timeout=900)
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 2, (out2 + err2)[-3000:]
    lines = [line for line in err2.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: run 'X' is already running (pid {first.pid} on "), err2
    store = RunStore(str(tmp_path), "X")
    assert [store.verify(s) for s in STAGES] == [None] * len(STAGES)  # every file has its recorded sha256
    assert not lock_file.exists()
    manifests = {s: store.read_manifest(s) for s in STAGES}

    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "earlier",
                                     "since_epoch": time.time() - 60, "token": "old"}))
    third = _pipeline(tmp_path)
    out3, err3 = third.communicate(timeout=600)
    assert third.returncode == 0, (out3 + err3)[-3000:]
    assert sum("took over the stale lock of run 'X'" in line for line in (out3 + err3).splitlines()) == 1
    assert {s: store.read_manifest(s) for s in STAGES} == manifests  # every stage skipped, none committed again
    assert not lock_file.exists()
