"""Durable stage outputs: ``<storage>/<run_name>/<stage>/`` with a ``manifest.json`` written last.

The storage is a local directory or any ``pyarrow.fs`` URI (``file://``, ``s3://``, ``gs://``,
``hdfs://``, ``mock://`` for tests); every operation goes through one ``pyarrow.fs`` filesystem
(``LocalFileSystem`` for local paths). A stage counts as done when its manifest exists, the
manifest's fingerprint equals the expected one and every listed file has the recorded size and
sha256 (see docs/DESIGN.md, "Checkpoint hand-off between stages").

Commit protocol (``RunStore.commit_stage``), the manifest is the commit point everywhere:

1. stale ``<stage>.tmp-*`` / ``<stage>.old-*`` siblings of an earlier crash are removed;
2. filesystems with an atomic directory rename (local disks, HDFS): files are streamed (and hashed)
   into ``<stage>.tmp-<uuid>/``, ``manifest.json`` is written there last, then the old ``<stage>/``
   is invalidated (manifest first) and deleted and the temporary directory renamed to ``<stage>/``;
3. object stores (S3, GCS, ...), where a "rename" is a copy: the old ``<stage>/`` is invalidated
   (manifest first) and deleted, files are streamed straight into ``<stage>/``, ``manifest.json``
   last. A crash before the manifest leaves a directory without one, which never counts as done.

S3 endpoints other than AWS (MinIO, moto, a private endpoint): pyarrow reads ``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL`` when it builds the filesystem from an ``s3://`` URI, or take
``s3://bucket/path?endpoint_override=host:port&scheme=http``. Credentials come from the standard
AWS environment variables. The filesystem object carries the endpoint to Ray Train's workers.

The streaming, hashing and atomic-write helpers live in ``pipeline/storage/fileio.py`` (re-exported here).
This module never imports ray; pyarrow is imported lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any, Sequence

from .canonical import json_bytes, json_safe
from .fileio import (
    FileDigest,
    atomic_write_bytes,
    copy_and_hash,
    fsync_dir,
    has_atomic_rename,
    is_uri,
    output_stream,
)

__all__ = ["MANIFEST", "RunStore", "StorageError", "TRAIN_DIR", "storage_problem"]
log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAIN_DIR = "_train"


class StorageError(RuntimeError):
    """A storage problem; the message says what went wrong and what to do."""


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def storage_problem(storage: str) -> str | None:
    """Why a local ``storage`` cannot hold runs (a regular file, a read-only directory), or None.
    Writes nothing; URIs are checked when they are first used."""
    if not storage or is_uri(os.fspath(storage)):
        return None
    path = Path(os.fspath(storage)).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a regular file" if existing == path else f"lies under the regular file {existing}"
        return f"storage {os.fspath(storage)!r} {what}, not a directory: pass a directory with --storage"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"storage {os.fspath(storage)!r} is not writable (directory {existing} is read-only): "
                "pass a writable directory with --storage")
    return None


def _file_problem(stage: str, rel: str, meta: Any, got: FileDigest | None) -> str | None:
    """Why file ``rel`` (``got``: its digest, None when missing) does not match its manifest entry."""
    try:
        want_sha, want_size = meta["sha256"], int(meta["size"])
    except (KeyError, TypeError, ValueError):
        return f"stage {stage!r} manifest entry for {rel!r} is malformed; it will be re-run"
    if got is None:
        return f"stage {stage!r} output is incomplete: file {rel!r} is missing; it will be re-run"
    if got.size != want_size:
        return (f"stage {stage!r} output is corrupt: file {rel!r} has size {got.size}, "
                f"manifest says {want_size}; it will be re-run")
    if got.sha256 is not None and got.sha256 != want_sha:
        return (f"stage {stage!r} output is corrupt: file {rel!r} checksum {got.sha256[:12]}… does "
                f"not match the manifest ({want_sha[:12]}…); it will be re-run")
    return None


# --------------------------------------------------------------------------------------------


class RunStore:
    """Stage output directories of one pipeline run under ``<storage>/<run_name>``."""

    def __init__(self, storage: str, run_name: str, *, filesystem=None):
        import pyarrow.fs as pafs

        if not run_name or "/" in run_name or run_name in (".", ".."):
            raise StorageError(
                f"invalid run name {run_name!r}: use letters, digits, '_', '.', '-' (no '/')"
            )
        self.storage = storage = os.fspath(storage)
        self.run_name = run_name
        self._uri_base = self._query = None
        if filesystem is None and is_uri(storage):
            self.fs, base = self._open_uri(storage)
            self._query = storage.split("#", 1)[0].partition("?")[2]
            self._uri_base = storage.split("?", 1)[0].split("#", 1)[0].rstrip("/")
            base = base.rstrip("/") or ("/" if base.startswith("/") else "")
            self._root_path = posixpath.join(base, run_name) if base else run_name
            self.root = self._uri(run_name)
        else:
            if filesystem is not None:  # tests, custom credentials: storage is a path inside it
                self.fs, base = filesystem, storage.rstrip("/") or "/"
            else:
                self.fs, base = pafs.LocalFileSystem(), str(Path(storage).expanduser().resolve())
            self._root_path = self.root = posixpath.join(base, run_name)
        self._renames = has_atomic_rename(self.fs)

    @staticmethod
    def _open_uri(storage: str):
        import pyarrow.fs as pafs

        try:
            return pafs.FileSystem.from_uri(storage)
        except Exception as e:
            raise StorageError(
                f"cannot open storage {storage!r}: {type(e).__name__}: {e}. Check the URI "
                "scheme (a local directory, file://, s3://, gs://, hdfs://), the bucket name, "
                "credentials and network access, or pass a local directory with --storage."
            ) from e

    # ---------------------------------------------------------------- naming

    def _uri(self, *names: str) -> str:
        """The storage URI with ``names`` appended to its path (query kept)."""
        joined = self._uri_base + "/" + "/".join(names)
        return joined + (f"?{self._query}" if self._query else "")

    def _p(self, *names: str) -> str:
        """Path inside ``self.fs``."""
        return posixpath.join(self._root_path, *names) if names else self._root_path

    def stage_uri(self, stage: str) -> str:
        """Where a stage's outputs live (URI for URI storages, absolute path otherwise)."""
        self._check_stage(stage)
        return self._uri(self.run_name, stage) if self._uri_base else self._p(stage)

    @property
    def is_local(self) -> bool:
        """Whether the run lives on this machine's disk (a path or ``file://``)."""
        return self.fs.type_name == "local"

    def local_path(self, stage: str) -> Path | None:
        """The stage directory as a local Path (None when the storage is remote)."""
        self._check_stage(stage)
        return Path(self._p(stage)) if self.is_local else None

    @staticmethod
    def _check_stage(stage: str) -> None:
        if not stage or "/" in stage or stage.startswith(".") or ".tmp-" in stage or ".old-" in stage:
            raise StorageError(f"invalid stage name {stage!r}")

    def __repr__(self) -> str:
        return f"RunStore({self.root!r})"

    # ---------------------------------------------------------------- filesystem access

    def _info(self, path: str):
        try:
            return self.fs.get_file_info(path)
        except Exception as e:
            raise StorageError(
                f"cannot access {path!r} on {self.fs.type_name} storage ({self.root}): {e}. "
                "Check credentials and network access to the storage."
            ) from e

    def _is_file(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(path).type == pafs.FileType.File

    def read_bytes(self, path: str) -> bytes | None:
        """The content of file ``path`` inside the store's filesystem, or None when absent."""
        if not self._is_file(path):
            return None
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write file ``path`` inside the store's filesystem atomically (see ``atomic_write_bytes``)."""
        atomic_write_bytes(path, data, filesystem=self.fs)

    def _delete(self, path: str) -> None:
        """Delete a file or directory tree (nothing when absent)."""
        import pyarrow.fs as pafs

        kind = self._info(path).type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(path)

    def _list_dir(self, path: str, recursive: bool = False):
        import pyarrow.fs as pafs

        try:
            return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
        except Exception as e:
            raise StorageError(
                f"cannot list {path!r} on {self.fs.type_name} storage: {e}. "
                "Check credentials and network access to the storage."
            ) from e

    def _digest(self, path: str) -> FileDigest | None:
        """Hash of file ``path`` inside the store (streamed), or None when it is missing."""
        try:
            with self.fs.open_input_stream(path) as f:
                return copy_and_hash(f)
        except FileNotFoundError:
            return None

    def cleanup_stale(self, stage: str) -> list[str]:
        """Delete leftover ``<stage>.tmp-*`` / ``<stage>.old-*`` dirs of an interrupted commit."""
        self._check_stage(stage)
        removed = []
        for info in self._list_dir(self._root_path):
            name = posixpath.basename(info.path.rstrip("/"))
            if name.startswith((f"{stage}.tmp-", f"{stage}.old-")):
                log.info("removing leftover %s from an interrupted commit", info.path)
                self._delete(info.path)
                removed.append(info.path)
        return removed

    # ---------------------------------------------------------------- manifests

    def read_manifest(self, stage: str) -> dict | None:
        """The stage's manifest, or None when absent or unreadable (logged)."""
        self._check_stage(stage)
        path = self._p(stage, MANIFEST)
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            manifest = json.loads(data)
        except ValueError as e:
            log.warning("manifest %s is not valid JSON (%s); stage %r will be re-run", path, e, stage)
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            log.warning("manifest %s has no 'files' table; stage %r will be re-run", path, stage)
            return None
        return manifest

    def verify(self, stage: str, fingerprint: str | None = None) -> str | None:
        """Why the stage is not complete (a message), or None when it is.

        ``fingerprint=None`` skips the fingerprint comparison (checksums only).
        """
        manifest = self.read_manifest(stage)
        if manifest is None:
            return f"stage {stage!r} has no valid manifest at {self.stage_uri(stage)}"
        if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
            return (
                f"stage {stage!r} was produced with a different configuration or inputs "
                f"(fingerprint {str(manifest.get('fingerprint'))[:12]}… != {fingerprint[:12]}…); "
                "it will be re-run"
            )
        for rel, meta in sorted(manifest["files"].items()):
            problem = self._file_status(stage, rel, meta)
            if problem is not None:
                return problem
        return None

    def _file_status(self, stage: str, rel: str, meta: Any) -> str | None:
        """Why one stored file does not match its manifest entry (its size is checked before it is read)."""
        import pyarrow.fs as pafs

        path = self._p(stage, rel)
        info = self._info(path)
        if info.type != pafs.FileType.File:
            return _file_problem(stage, rel, meta, None)
        if info.size is not None:
            problem = _file_problem(stage, rel, meta, FileDigest(None, info.size))
            if problem is not None:
                return problem
        return _file_problem(stage, rel, meta, self._digest(path))

    def is_complete(self, stage: str, fingerprint: str) -> bool:
        """Manifest present, fingerprint equal, every file's sha256 and size match."""
        reason = self.verify(stage, fingerprint)
        if reason is not None:
            log.info("%s", reason)
            return False
        return True

    # ---------------------------------------------------------------- commit

    def commit_stage(
        self,
        stage: str,
        local_dir: Path,
        fingerprint: str,
        metrics: dict,
        extra: dict | None = None,
    ) -> dict:
        """Publish the files of ``local_dir`` (recursively) as the stage's output; returns the manifest."""
        self._check_stage(stage)
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(
                f"cannot commit stage {stage!r}: {local_dir} is not a directory; the stage "
                "function must write its outputs into its work directory"
            )
        final = self._p(stage)
        staging = self._p(f"{stage}.tmp-{uuid.uuid4().hex[:12]}") if self._renames else final
        try:
            self.fs.create_dir(self._root_path, recursive=True)
            self.cleanup_stale(stage)
            if not self._renames:
                self._withdraw(final)
            manifest = {
                "stage": stage,
                "fingerprint": fingerprint,
                "files": self._upload(local_dir, staging),
                "metrics": json_safe(metrics or {}),
                "created": _utcnow(),
                "extra": json_safe(extra or {}),
            }
            with output_stream(self.fs, posixpath.join(staging, MANIFEST)) as f:
                f.write(json_bytes(manifest))  # last: the commit point
            if self._renames:
                self._withdraw(final)
                self.fs.move(staging, final)
                if self.is_local:
                    fsync_dir(self._root_path)
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(
                f"committing stage {stage!r} to {self.stage_uri(stage)} failed: "
                f"{type(e).__name__}: {e}. Check free space / permissions / network; "
                "the stage will be re-run next time."
            ) from e
        finally:
            if staging != final:
                with contextlib.suppress(Exception):
                    self._delete(staging)
        return json.loads(json_bytes(manifest))

    def _upload(self, local_dir: Path, target: str) -> dict[str, dict]:
        """Stream every file under ``local_dir`` to ``target`` (hashing while copying); the files table."""
        files: dict[str, dict] = {}
        for src in sorted(local_dir.rglob("*")):
            rel = src.relative_to(local_dir).as_posix()
            if not src.is_file() or rel == MANIFEST:  # a stale manifest in the work dir is never published
                continue
            with open(src, "rb") as fi, output_stream(self.fs, posixpath.join(target, rel)) as fo:
                files[rel] = dataclasses.asdict(copy_and_hash(fi, fo))
        return files

    def _withdraw(self, stage_path: str) -> None:
        """Remove a published stage directory, its manifest first (so it stops counting as done at once)."""
        manifest = posixpath.join(stage_path, MANIFEST)
        if self._is_file(manifest):
            self.fs.delete_file(manifest)
        self._delete(stage_path)

    # ---------------------------------------------------------------- fetch / invalidate

    def fetch_stage(self, stage: str, dest: Path) -> Path:
        """Local storage: the stage directory itself. Remote: download into ``dest``, verifying each file."""
        self._check_stage(stage)
        manifest = self.read_manifest(stage)
        if manifest is None:
            raise StorageError(
                f"stage {stage!r} has no output at {self.stage_uri(stage)} (no valid manifest); "
                f"run the {stage!r} stage first (or resume the pipeline so it re-runs)"
            )
        if self.is_local:
            return Path(self._p(stage))
        dest = Path(dest)
        for rel, meta in sorted(manifest["files"].items()):
            problem = _file_problem(stage, rel, meta, self._download(stage, rel, dest / rel))
            if problem is not None:
                raise StorageError(problem)
        atomic_write_bytes(dest / MANIFEST, json_bytes(manifest))
        return dest

    def _download(self, stage: str, rel: str, out: Path) -> FileDigest | None:
        """Copy one stage file to local ``out``; its digest (None when the file is missing)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.fs.open_input_stream(self._p(stage, rel)) as fi, open(out, "wb") as fo:
                return copy_and_hash(fi, fo)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(
                f"downloading {rel!r} of stage {stage!r} from {self.stage_uri(stage)} failed: "
                f"{e}. Check credentials and network access, then resume."
            ) from e

    def invalidate_from(self, stages: Sequence[str]) -> None:
        """Delete the manifests of ``stages`` (their outputs stay, but no longer count as done)."""
        for stage in stages:
            self._check_stage(stage)
            path = self._p(stage, MANIFEST)
            if self._is_file(path):
                log.info("invalidating stage %r (upstream output changed)", stage)
                self.fs.delete_file(path)

    # ---------------------------------------------------------------- run-level state

    def _state_path(self, relpath: str) -> str:
        rel = posixpath.normpath(str(relpath).replace(os.sep, "/"))
        if rel.startswith("..") or rel.startswith("/") or rel == ".":
            raise StorageError(f"run state path {relpath!r} must be relative to the run root")
        return self._p(rel)

    def read_json(self, relpath: str) -> Any | None:
        """A small JSON state file under the run root (None when absent)."""
        path = self._state_path(relpath)
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise StorageError(
                f"run state file {path} is not valid JSON ({e}); delete it to start that state afresh"
            ) from e

    def write_json_atomic(self, relpath: str, obj: Any) -> None:
        """Write a small JSON state file atomically (rename on local disks, a single upload remotely)."""
        self.write_bytes(self._state_path(relpath), json_bytes(obj))

    # ---------------------------------------------------------------- Ray Train

    def train_storage(self):
        """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` (``<root>/_train``).

        Local storage: an absolute path and None. Remote storage: the path inside the
        filesystem (scheme stripped, as Ray requires when a filesystem is given) and the
        pyarrow filesystem object (picklable, carries the URI's options such as endpoint).
        """
        path = self._p(TRAIN_DIR)
        if self.is_local:
            os.makedirs(path, exist_ok=True)
            return path, None
        return path, self.fs
