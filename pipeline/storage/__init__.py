"""Run storage: a run's committed stage outputs with manifests (a local folder or a URI), atomic file writes, the
run lock, and canonical JSON (the one fingerprint hash and the one strict JSON writer)."""
from .canonical import canonical_sha256, fingerprint, json_bytes, write_json
from .lock import RunLock, RunLockedError
from .run_store import MANIFEST, TRAIN_DIR, RunStore, StorageError, storage_problem

__all__ = ["MANIFEST", "TRAIN_DIR", "RunLock", "RunLockedError", "RunStore", "StorageError", "canonical_sha256",
           "fingerprint", "json_bytes", "storage_problem", "write_json"]
