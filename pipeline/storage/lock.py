"""One process at a time per run: an exclusive lock file ``<storage>/<run>/.lock``.

The lock holds JSON ``{"host", "pid", "since", "token"}`` of its holder.

* Local storage: the lock is created with ``os.open(O_CREAT | O_EXCL)``, which is atomic on a local
  filesystem (and on NFSv3+), so two processes can never both hold it. A lock whose holder was on
  this host and is no longer alive (killed, even with SIGKILL) is stale: the next run takes it over
  with one warning line. Takeovers are serialised by ``flock`` on ``.lock.takeover`` and re-check
  the lock file, so two processes can never both take over one stale lock. A lock of another
  host is never taken over (its liveness cannot be checked): remove it by hand when that process
  is gone.
* Object stores (``s3://``, ``gs://`` ... through ``pyarrow.fs``): pyarrow offers no conditional
  write, so the lock is a lease: an object with an expiry that the holder renews in a background
  thread; a lease that has expired is stale. After writing its lease a process waits briefly and
  reads it back, and only holds the lock if its own token is still there. This is weaker than the
  local lock: two processes starting within the read-back delay on an eventually consistent store
  could both believe they hold it, and a holder paused for longer than the lease loses it.

This module never imports ray or mlflow.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from .canonical import json_bytes

LOCK_NAME = ".lock"
LEASE_S = 120.0            # lifetime of an object-store lease; renewed every LEASE_S / 4
READ_BACK_S = 2.0          # object stores: how long to wait before reading our lease back
POLL_S = 1.0               # how often a waiting acquire retries
EMPTY_LOCK_GRACE_S = 10.0  # an empty or unreadable lock file older than this has no live writer


class RunLockedError(RuntimeError):
    """Another live process holds the run's lock; the message names it."""


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (signal 0 checks without signalling;
    a zombie, killed but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _process_start_epoch(pid: int) -> float | None:
    """When process ``pid`` started (Linux /proc), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _pid_reused(pid: int, since_epoch: float) -> bool:
    """True when the live process with ``pid`` started after the lock was taken (not its holder)."""
    started = _process_start_epoch(pid)
    return started is not None and since_epoch > 0 and started > since_epoch + 2.0


class RunLock:
    """Exclusive lock of one run name: ``with RunLock(store): ...`` or ``acquire()``/``release()``.

    ``store`` is a :class:`pipeline.storage.RunStore`.
    """

    def __init__(self, store: Any, *, warn: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.run_name = store.run_name
        self.path = store._p(LOCK_NAME)
        self._local = store.is_local
        self._warn = warn or (lambda line: print(f"warning: {line}", flush=True))
        self._token: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ---------------------------------------------------------------- public API

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self, wait: float | None = 0.0) -> "RunLock":
        """Take the lock (taking over a stale one). ``wait``: seconds to wait for a live holder to
        finish (None: for ever) before raising :class:`RunLockedError`."""
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                self._try_acquire()
                return self
            except RunLockedError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                time.sleep(POLL_S)

    def release(self) -> None:
        """Remove the lock if it is still ours (never one that someone else took over)."""
        if self._token is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.get("token") == self._token:
            self._delete()
        self._token = None

    def __enter__(self) -> "RunLock":
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ---------------------------------------------------------------- helpers

    def _record(self) -> dict:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now_iso(),
                  "since_epoch": time.time(), "token": uuid.uuid4().hex}
        if not self._local:
            record["expires_epoch"] = time.time() + LEASE_S
        return record

    def _message(self, holder: dict) -> str:
        if not holder:
            return (f"run '{self.run_name}' has an empty or unreadable lock file {self.path} (written "
                    f"{self._age_s():.0f} s ago); it is taken over once it is {EMPTY_LOCK_GRACE_S:.0f} s old, or "
                    f"delete it if no run of this name is running")
        return (f"run '{self.run_name}' is already running (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} since {holder.get('since', '?')}); wait for it to finish "
                f"or use another --run-name (lock file: {self.path})")

    def _stale_reason(self, holder: dict) -> str | None:
        """Why the holder is gone, or None while it may be alive."""
        if not holder and self._age_s() > EMPTY_LOCK_GRACE_S:  # a writer needs milliseconds: this one is gone
            return f"the lock file was empty or unreadable for {self._age_s():.0f} s"
        if not self._local:
            expires = float(holder.get("expires_epoch") or 0)
            return f"its lease expired at {time.ctime(expires)}" if expires < time.time() else None
        if not holder or holder.get("host") != socket.gethostname():
            return None
        pid = int(holder.get("pid") or 0)
        if pid <= 0 or not _pid_alive(pid):
            return "that process is gone"
        if _pid_reused(pid, float(holder.get("since_epoch") or 0)):
            return "that pid now belongs to a newer process"
        return None

    def _age_s(self) -> float:
        """Seconds since the lock file was last written (0 where that cannot be read)."""
        try:
            if self._local:
                return max(0.0, time.time() - os.stat(self.path).st_mtime)
            info = self.store.fs.get_file_info(self.path)
            return max(0.0, time.time() - info.mtime.timestamp()) if info.mtime else 0.0
        except (OSError, AttributeError):
            return 0.0

    def _read(self) -> dict | None:
        """The lock's JSON; None when there is no lock; {} when it is unreadable or half-written."""
        try:
            if self._local:
                with open(self.path, "rb") as f:
                    data = f.read()
            else:
                data = self.store.read_bytes(self.path)
                if data is None:
                    return None
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
            return holder if isinstance(holder, dict) else {}
        except ValueError:
            return {}

    def _delete(self) -> None:
        with contextlib.suppress(OSError):
            if self._local:
                os.unlink(self.path)
            else:
                self.store.fs.delete_file(self.path)

    def _try_acquire(self) -> None:
        if self._local:
            self._try_acquire_local()
        else:
            self._try_acquire_lease()

    # ---------------------------------------------------------------- local disk

    def _create_local(self) -> bool:
        """Create the lock file atomically with its content; False if it exists.

        The record goes to a temporary file first, which is then hard-linked to the lock's name (``link``
        fails if that exists), so a lock file never exists without its holder's identity, even when the
        disk fills up mid-write. Where the filesystem has no hard links, ``O_EXCL`` creation is the fallback.
        """
        record = self._record()
        tmp = f"{self.path}.{record['token']}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(json_bytes(record))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV) or not os.path.exists(tmp):
                raise
            return self._create_local_exclusive(record)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._token = record["token"]
        return True

    def _create_local_exclusive(self, record: dict) -> bool:
        """``O_CREAT | O_EXCL`` creation (filesystems without hard links); a failed write removes the file."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json_bytes(record))
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        self._token = record["token"]
        return True

    def _try_acquire_local(self) -> None:
        from .run_store import StorageError

        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise StorageError(f"storage {self.store.storage!r}: cannot create the run directory "
                               f"{os.path.dirname(self.path)} ({e.strerror or e}); pass a writable "
                               f"directory with --storage") from None
        try:
            if self._create_local():
                return
        except OSError as e:
            raise StorageError(f"storage {self.store.storage!r}: cannot write the lock file {self.path} "
                               f"({e.strerror or e}); free space or pass another --storage, then re-run") from None
        holder = self._read()
        if holder is None and self._create_local():  # released in between
            return
        holder = holder or self._read() or {}
        reason = self._stale_reason(holder)
        if reason is None:
            raise RunLockedError(self._message(holder))
        self._take_over_local(holder, reason)

    def _take_over_local(self, stale: dict, reason: str) -> None:
        import fcntl

        with open(self.path + ".takeover", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                current = self._read()
                if current is not None and current.get("token") != stale.get("token"):
                    raise RunLockedError(self._message(current))  # someone else took it over first
                self._delete()
                if not self._create_local():
                    raise RunLockedError(self._message(self._read() or {}))
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
        self._warn(f"took over the stale lock of run '{self.run_name}' (pid {stale.get('pid')} on "
                   f"{stale.get('host')} since {stale.get('since')}: {reason})")

    # ---------------------------------------------------------------- object stores

    def _try_acquire_lease(self) -> None:
        holder = self._read()
        reason = None
        if holder is not None:
            reason = self._stale_reason(holder)
            if reason is None:
                raise RunLockedError(self._message(holder))
        record = self._record()
        self.store.write_bytes(self.path, json_bytes(record))
        time.sleep(READ_BACK_S)
        current = self._read()
        if current is None or current.get("token") != record["token"]:
            raise RunLockedError(self._message(current or {}))
        self._token = record["token"]
        if holder is not None:
            self._warn(f"took over the stale lease of run '{self.run_name}' (pid {holder.get('pid')} on "
                       f"{holder.get('host')} since {holder.get('since')}: {reason})")
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, args=(record,), daemon=True,
                                         name=f"penni-lease-{self.run_name}")
        self._renewer.start()

    def _renew(self, record: dict) -> None:
        """Extend our lease every LEASE_S / 4 while it is still ours."""
        while not self._stop.wait(LEASE_S / 4):
            current = self._read()
            if current is None or current.get("token") != record["token"]:
                self._warn(f"the lease of run '{self.run_name}' was taken by another process")
                return
            record = {**record, "expires_epoch": time.time() + LEASE_S}
            with contextlib.suppress(Exception):
                self.store.write_bytes(self.path, json_bytes(record))
