"""Files written so that no reader sees half of one, and read once while hashed: for every module.

* ``atomic_write_bytes`` / ``atomic_write_text``: a local path, a ``pyarrow.fs`` URI or a path on a
  given filesystem. Local disks: a temporary sibling, fsynced, renamed over the target. Object stores:
  one upload, which is visible only once complete.
* ``atomic_output_path``: a temporary local path for writers that want a file name (``pq.write_table``,
  ``torch.save``), renamed over the target when the block succeeds.
* ``copy_and_hash``: stream a file once, hashing it (and copying it, when given a destination).

This module never imports ray; pyarrow is imported lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator

_CHUNK = 4 * 1024 * 1024
_ATOMIC_RENAME = frozenset({"local", "hdfs"})  # pyarrow filesystems whose directory rename is atomic


def is_uri(s: str) -> bool:
    """Whether ``s`` names a ``pyarrow.fs`` URI (``file:``, ``s3://`` ...) rather than a local path."""
    return "://" in s or s.startswith("file:")


@dataclasses.dataclass(frozen=True)
class FileDigest:
    """sha256 and size of a byte stream (``sha256`` None: only the size is known)."""

    sha256: str | None
    size: int


def copy_and_hash(src: BinaryIO, dst: BinaryIO | None = None) -> FileDigest:
    """Read ``src`` to its end in chunks, writing each chunk to ``dst`` (if given); its sha256 and size."""
    h = hashlib.sha256()
    size = 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return FileDigest(h.hexdigest(), size)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a local file (streamed)."""
    with open(path, "rb") as f:
        return copy_and_hash(f).sha256


def has_atomic_rename(fs) -> bool:
    """Whether ``fs`` renames a directory atomically (local disks, HDFS), unlike object stores."""
    return fs.type_name in _ATOMIC_RENAME


@contextlib.contextmanager
def output_stream(fs, path: str) -> Iterator[BinaryIO]:
    """A stream writing ``path`` on ``fs``; on a local disk it is fsynced before it closes."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if fs.type_name != "local":
        with fs.open_output_stream(path) as f:
            yield f
        return
    with open(path, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Make a rename inside local directory ``path`` durable (POSIX); a no-op where that fails."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _resolve(path: str | os.PathLike, filesystem=None) -> tuple[Any, str]:
    """``(filesystem, path inside it)`` for a local path, a URI, or a path on an explicit filesystem."""
    import pyarrow.fs as pafs

    path = os.fspath(path)
    if filesystem is not None:
        return filesystem, path
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, filesystem=None) -> None:
    """Write ``data`` to ``path`` (local path, URI, or path on ``filesystem``) so no reader sees half of it.

    Local disks: a temporary sibling, fsynced, renamed over ``path``. Object stores: one upload,
    which becomes visible only when complete."""
    fs, p = _resolve(path, filesystem)
    if not has_atomic_rename(fs):
        with output_stream(fs, p) as f:
            f.write(data)
        return
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with output_stream(fs, tmp) as f:
            f.write(data)
        fs.move(tmp, p)
        if fs.type_name == "local":
            fsync_dir(posixpath.dirname(p))
    finally:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)


def atomic_write_text(path: str | os.PathLike, text: str, *, filesystem=None) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), filesystem=filesystem)


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary local path beside ``path`` for writers that want a file name (``pq.write_table``,
    ``torch.save``); renamed over ``path`` when the block ends without error, deleted otherwise."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(str(final.parent))
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
