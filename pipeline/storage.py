"""Durable stage outputs: ``<storage>/<run_name>/<stage>/`` with a ``manifest.json`` written last.

The storage may be a local directory or any ``pyarrow.fs`` URI (``file://``, ``s3://``,
``gs://``, ``hdfs://``, ``mock://`` for tests). A stage counts as done when its manifest
exists, the manifest's fingerprint equals the expected one and every listed file has the
recorded size and sha256 (see docs/DESIGN.md, "Checkpoint hand-off between stages").

Commit protocol (``RunStore.commit_stage``):

1. stale ``<stage>.tmp-*`` / ``<stage>.old-*`` siblings from an earlier crash are removed;
2. files are copied into ``<root>/<stage>.tmp-<uuid>/`` (hashed while copying);
3. ``manifest.json`` is written there last;
4. local filesystem: the old ``<stage>/`` is renamed aside, the temporary directory is renamed to
   ``<stage>/`` and the old one deleted, so a crash never leaves a final directory whose manifest
   describes files that are not all there. Remote filesystems: the old manifest is deleted first,
   then the old directory; the temporary directory is moved (or, where the filesystem cannot move
   directories, e.g. S3/GCS, copied file by file with the manifest copied last).

This module never imports ray; pyarrow is imported lazily.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import posixpath
import shutil
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAIN_DIR = "_train"
_CHUNK = 4 * 1024 * 1024


class StorageError(RuntimeError):
    """A storage problem; the message says what went wrong and what to do."""


# --------------------------------------------------------------------------------------------
# hashing / fingerprints


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a local file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: Any) -> Any:
    """Fallback for json.dumps: make common non-JSON values canonical."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=lambda v: json.dumps(v, sort_keys=True, default=_canonical))
    if isinstance(obj, bytes):
        return obj.hex()
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except Exception:  # noqa: BLE001
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    raise TypeError(f"cannot fingerprint a value of type {type(obj).__name__}: {obj!r}")


def fingerprint(*parts: Any) -> str:
    """sha256 of the canonical JSON (sorted keys, compact separators) of ``parts``."""
    text = json.dumps(
        list(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_canonical
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_safe(obj: Any) -> Any:
    """Convert metrics/extra to strict JSON (non-finite floats -> None, scalars -> Python)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    try:
        return _json_safe(_canonical(obj))
    except TypeError:
        return str(obj)


def _dumps(obj: Any) -> bytes:
    return (json.dumps(_json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _is_uri(s: str) -> bool:
    return "://" in s or s.startswith("file:")


def storage_problem(storage: str) -> str | None:
    """Why a local ``storage`` cannot hold runs (a regular file, a read-only directory), or None.
    Writes nothing; URIs are checked when they are first used."""
    if not storage or _is_uri(os.fspath(storage)):
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


# --------------------------------------------------------------------------------------------


class RunStore:
    """Stage output directories of one pipeline run under ``<storage>/<run_name>``."""

    def __init__(self, storage: str, run_name: str, *, filesystem=None):
        import pyarrow.fs as pafs

        if not run_name or "/" in run_name or run_name in (".", ".."):
            raise StorageError(
                f"invalid run name {run_name!r}: use letters, digits, '_', '.', '-' (no '/')"
            )
        storage = os.fspath(storage)
        self.storage = storage
        self.run_name = run_name
        self._query = ""
        if filesystem is not None:
            # explicit filesystem (tests, custom credentials): storage is a path inside it
            self.fs = filesystem
            base = storage.rstrip("/") or "/"
            self.root = posixpath.join(base, run_name)
            self._base_uri = None
        elif _is_uri(storage):
            try:
                fs, base = pafs.FileSystem.from_uri(storage)
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError/...
                raise StorageError(
                    f"cannot open storage {storage!r}: {type(e).__name__}: {e}. Check the URI "
                    "scheme (a local directory, file://, s3://, gs://, hdfs://), the bucket name, "
                    "credentials and network access, or pass a local directory with --storage."
                ) from e
            self.fs = fs
            parsed = urllib.parse.urlsplit(storage)
            self._query = parsed.query
            # keep scheme/netloc/query of the URI, append the run name to its path
            self._base_uri = storage.split("?", 1)[0].split("#", 1)[0].rstrip("/")
            self._base_path = base.rstrip("/") or ("/" if base.startswith("/") else "")
            self.root = self._uri_join(self._base_uri, run_name)
        else:
            self.fs = pafs.LocalFileSystem()
            self._base_uri = None
            self.root = str(Path(storage).expanduser().resolve() / run_name)
        # path of the run root inside self.fs
        if self._base_uri is not None:
            self._root_path = (
                posixpath.join(self._base_path, run_name) if self._base_path else run_name
            )
        else:
            self._root_path = self.root
        self._is_local = isinstance(self.fs, pafs.LocalFileSystem)

    # ---------------------------------------------------------------- naming

    def _uri_join(self, base: str, *names: str) -> str:
        joined = base.rstrip("/") + "/" + "/".join(names)
        return joined + (f"?{self._query}" if self._query else "")

    def _p(self, *names: str) -> str:
        """Path inside ``self.fs``."""
        return posixpath.join(self._root_path, *names) if names else self._root_path

    def stage_uri(self, stage: str) -> str:
        """Where a stage's outputs live (URI for URI storages, absolute path otherwise)."""
        self._check_stage(stage)
        if self._base_uri is not None:
            return self._uri_join(self._base_uri, self.run_name, stage)
        return posixpath.join(self.root, stage)

    @property
    def is_local(self) -> bool:
        return self._is_local

    def local_path(self, stage: str) -> Path | None:
        """The stage directory as a local Path (None when the storage is remote)."""
        self._check_stage(stage)
        return Path(self._p(stage)) if self._is_local else None

    @staticmethod
    def _check_stage(stage: str) -> None:
        if not stage or "/" in stage or stage.startswith(".") or ".tmp-" in stage or ".old-" in stage:
            raise StorageError(f"invalid stage name {stage!r}")

    def __repr__(self) -> str:
        return f"RunStore({self.root!r})"

    # ---------------------------------------------------------------- low-level fs helpers

    def _info(self, path: str):
        try:
            return self.fs.get_file_info(path)
        except Exception as e:  # noqa: BLE001
            raise StorageError(
                f"cannot access {path!r} on {self.fs.type_name} storage ({self.root}): {e}. "
                "Check credentials and network access to the storage."
            ) from e

    def _exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(path).type != pafs.FileType.NotFound

    def _read_bytes(self, path: str) -> bytes | None:
        import pyarrow.fs as pafs

        if self._info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _write_bytes(self, path: str, data: bytes) -> None:
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _delete_dir(self, path: str) -> None:
        import pyarrow.fs as pafs

        info = self._info(path)
        if info.type == pafs.FileType.Directory:
            if self._is_local:
                shutil.rmtree(path, ignore_errors=True)
            else:
                self.fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(path)

    def _list_dir(self, path: str, recursive: bool = False):
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
        try:
            return self.fs.get_file_info(sel)
        except Exception as e:  # noqa: BLE001
            raise StorageError(
                f"cannot list {path!r} on {self.fs.type_name} storage: {e}. "
                "Check credentials and network access to the storage."
            ) from e

    def _hash_remote(self, path: str) -> tuple[str, int]:
        h = hashlib.sha256()
        n = 0
        with self.fs.open_input_stream(path) as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
        return h.hexdigest(), n

    def cleanup_stale(self, stage: str) -> list[str]:
        """Delete leftover ``<stage>.tmp-*`` / ``<stage>.old-*`` dirs of an interrupted commit."""
        self._check_stage(stage)
        removed = []
        for info in self._list_dir(self._root_path):
            name = posixpath.basename(info.path.rstrip("/"))
            if name.startswith(f"{stage}.tmp-") or name.startswith(f"{stage}.old-"):
                log.info("removing leftover %s from an interrupted commit", info.path)
                self._delete_dir(info.path)
                removed.append(info.path)
        return removed

    # ---------------------------------------------------------------- manifests

    def read_manifest(self, stage: str) -> dict | None:
        """The stage's manifest, or None when absent or unreadable (logged)."""
        self._check_stage(stage)
        path = self._p(stage, MANIFEST)
        data = self._read_bytes(path)
        if data is None:
            return None
        try:
            manifest = json.loads(data)
        except ValueError as e:
            log.warning(
                "manifest %s is not valid JSON (%s); stage %r will be re-run", path, e, stage
            )
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
        return self._verify_files(stage, manifest)

    def _verify_files(self, stage: str, manifest: dict, base: str | None = None) -> str | None:
        """Check sizes and sha256 of the manifest's files under ``base`` (default: stage dir)."""
        import pyarrow.fs as pafs

        local_base = base
        for rel, meta in sorted(manifest["files"].items()):
            try:
                want_sha, want_size = meta["sha256"], int(meta["size"])
            except (KeyError, TypeError, ValueError):
                return f"stage {stage!r} manifest entry for {rel!r} is malformed; it will be re-run"
            if local_base is not None:
                p = Path(local_base) / rel
                if not p.is_file():
                    return f"stage {stage!r} output is incomplete: file {rel!r} is missing; it will be re-run"
                size = p.stat().st_size
                if size != want_size:
                    return (
                        f"stage {stage!r} output is corrupt: file {rel!r} has size {size}, "
                        f"manifest says {want_size}; it will be re-run"
                    )
                sha = sha256_file(p)
            else:
                path = self._p(stage, rel)
                info = self._info(path)
                if info.type != pafs.FileType.File:
                    return f"stage {stage!r} output is incomplete: file {rel!r} is missing; it will be re-run"
                if info.size is not None and info.size != want_size:
                    return (
                        f"stage {stage!r} output is corrupt: file {rel!r} has size {info.size}, "
                        f"manifest says {want_size}; it will be re-run"
                    )
                if self._is_local:
                    sha, size = sha256_file(path), info.size
                else:
                    sha, size = self._hash_remote(path)
                if size != want_size:
                    return (
                        f"stage {stage!r} output is corrupt: file {rel!r} has size {size}, "
                        f"manifest says {want_size}; it will be re-run"
                    )
            if sha != want_sha:
                return (
                    f"stage {stage!r} output is corrupt: file {rel!r} checksum {sha[:12]}… does "
                    f"not match the manifest ({want_sha[:12]}…); it will be re-run"
                )
        return None

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
        self.fs.create_dir(self._root_path, recursive=True)
        self.cleanup_stale(stage)

        tmp = self._p(f"{stage}.tmp-{uuid.uuid4().hex[:12]}")
        final = self._p(stage)
        try:
            self.fs.create_dir(tmp, recursive=True)
            files: dict[str, dict] = {}
            for src in sorted(local_dir.rglob("*")):
                if not src.is_file():
                    continue
                rel = src.relative_to(local_dir).as_posix()
                if rel == MANIFEST:
                    continue  # a stale manifest in the work dir is never published
                files[rel] = self._copy_in(src, posixpath.join(tmp, rel))
            manifest = {
                "stage": stage,
                "fingerprint": fingerprint,
                "files": files,
                "metrics": _json_safe(metrics or {}),
                "created": _utcnow(),
                "extra": _json_safe(extra or {}),
            }
            self._write_file_durable(posixpath.join(tmp, MANIFEST), _dumps(manifest))
            self._publish(tmp, final)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise StorageError(
                f"committing stage {stage!r} to {self.stage_uri(stage)} failed: "
                f"{type(e).__name__}: {e}. Check free space / permissions / network; "
                "the stage will be re-run next time."
            ) from e
        finally:
            try:
                if self._exists(tmp):
                    self._delete_dir(tmp)
            except Exception:  # noqa: BLE001
                pass
        return json.loads(_dumps(manifest))

    def _copy_in(self, src: Path, dst: str) -> dict:
        h = hashlib.sha256()
        n = 0
        if self._is_local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(src, "rb") as fi, open(dst, "wb") as fo:
                for chunk in iter(lambda: fi.read(_CHUNK), b""):
                    h.update(chunk)
                    n += len(chunk)
                    fo.write(chunk)
                fo.flush()
                os.fsync(fo.fileno())
        else:
            self.fs.create_dir(posixpath.dirname(dst), recursive=True)
            with open(src, "rb") as fi, self.fs.open_output_stream(dst) as fo:
                for chunk in iter(lambda: fi.read(_CHUNK), b""):
                    h.update(chunk)
                    n += len(chunk)
                    fo.write(chunk)
        return {"sha256": h.hexdigest(), "size": n}

    def _write_file_durable(self, path: str, data: bytes) -> None:
        if self._is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            self._write_bytes(path, data)

    @staticmethod
    def _fsync_dir(path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _publish(self, tmp: str, final: str) -> None:
        if self._is_local:
            old = None
            if os.path.lexists(final):
                old = f"{final}.old-{uuid.uuid4().hex[:12]}"
                os.replace(final, old)
            os.replace(tmp, final)
            self._fsync_dir(os.path.dirname(final))
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return
        import pyarrow.fs as pafs

        # remote: make the old output invalid first (manifest), then remove it
        if self._info(posixpath.join(final, MANIFEST)).type == pafs.FileType.File:
            self.fs.delete_file(posixpath.join(final, MANIFEST))
        self._delete_dir(final)
        try:
            self.fs.move(tmp, final)
            if self._info(posixpath.join(final, MANIFEST)).type == pafs.FileType.File:
                return
        except Exception as e:  # noqa: BLE001 - S3/GCS cannot move directories
            log.debug("directory move not supported on %s (%s); copying", self.fs.type_name, e)
        infos = [i for i in self._list_dir(tmp, recursive=True) if i.type == pafs.FileType.File]
        manifest_src = posixpath.join(tmp, MANIFEST)
        for info in infos:
            if info.path.rstrip("/") == manifest_src:
                continue
            rel = posixpath.relpath(info.path, tmp)
            dst = posixpath.join(final, rel)
            self.fs.create_dir(posixpath.dirname(dst), recursive=True)
            self.fs.copy_file(info.path, dst)
        self.fs.copy_file(manifest_src, posixpath.join(final, MANIFEST))  # last

    # ---------------------------------------------------------------- fetch / invalidate

    def fetch_stage(self, stage: str, dest: Path) -> Path:
        """Local storage: the stage directory itself. Remote: download into ``dest`` and verify."""
        self._check_stage(stage)
        manifest = self.read_manifest(stage)
        if manifest is None:
            raise StorageError(
                f"stage {stage!r} has no output at {self.stage_uri(stage)} (no valid manifest); "
                f"run the {stage!r} stage first (or resume the pipeline so it re-runs)"
            )
        if self._is_local:
            return Path(self._p(stage))
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for rel in sorted(manifest["files"]):
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                with self.fs.open_input_stream(self._p(stage, rel)) as fi, open(out, "wb") as fo:
                    while True:
                        chunk = fi.read(_CHUNK)
                        if not chunk:
                            break
                        fo.write(chunk)
            except FileNotFoundError as e:
                raise StorageError(
                    f"stage {stage!r} output is incomplete: file {rel!r} is missing at "
                    f"{self.stage_uri(stage)}; it will be re-run"
                ) from e
            except OSError as e:
                raise StorageError(
                    f"downloading {rel!r} of stage {stage!r} from {self.stage_uri(stage)} failed: "
                    f"{e}. Check credentials and network access, then resume."
                ) from e
        (dest / MANIFEST).write_bytes(_dumps(manifest))
        reason = self._verify_files(stage, manifest, base=str(dest))
        if reason is not None:
            raise StorageError(reason)
        return dest

    def invalidate_from(self, stages: Sequence[str]) -> None:
        """Delete the manifests of ``stages`` (their outputs stay, but no longer count as done)."""
        import pyarrow.fs as pafs

        for stage in stages:
            self._check_stage(stage)
            path = self._p(stage, MANIFEST)
            if self._info(path).type == pafs.FileType.File:
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
        data = self._read_bytes(path)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise StorageError(
                f"run state file {path} is not valid JSON ({e}); delete it to start that state afresh"
            ) from e

    def write_json_atomic(self, relpath: str, obj: Any) -> None:
        """Write a small JSON state file atomically (rename on local FS, single PUT remotely)."""
        path = self._state_path(relpath)
        data = _dumps(obj)
        if self._is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self._write_bytes(path, data)

    # ---------------------------------------------------------------- Ray Train

    def train_storage(self):
        """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` (``<root>/_train``).

        Local storage: an absolute path and None. Remote storage: the path inside the
        filesystem (scheme stripped, as Ray requires when a filesystem is given) and the
        pyarrow filesystem object (picklable, carries the URI's options such as endpoint).
        """
        path = self._p(TRAIN_DIR)
        if self._is_local:
            os.makedirs(path, exist_ok=True)
            return path, None
        return path, self.fs
