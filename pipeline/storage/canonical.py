"""Canonical JSON: the one sha256 of JSON values (fingerprints) and the one strict JSON writer.

A stage's fingerprint hashes its config section and its inputs' fingerprints, so equal inputs give
equal fingerprints in any process. ``json_safe`` turns metrics into strict JSON (NaN -> null);
``json_bytes`` is the one format of every JSON file the project writes (``write_json`` for a local file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any


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


def canonical_sha256(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``: sorted keys, compact separators, ASCII, no NaN."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=_canonical)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(*parts: Any) -> str:
    """sha256 of the canonical JSON of the list ``parts`` (the stage and manifest fingerprints)."""
    return canonical_sha256(list(parts))


def json_safe(obj: Any) -> Any:
    """Convert metrics/extra to strict JSON (non-finite floats -> None, scalars -> Python)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    try:
        return json_safe(_canonical(obj))
    except TypeError:
        return str(obj)


def json_bytes(obj: Any) -> bytes:
    """Strict, sorted, indented JSON of ``obj`` (after ``json_safe``), newline-terminated."""
    return (json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``json_bytes(obj)`` to the local file ``path`` (the one way the project writes a JSON file;
    ``RunStore.write_json_atomic`` and ``fileio.atomic_write_bytes`` for ones others may read meanwhile)."""
    with open(path, "wb") as f:
        f.write(json_bytes(obj))
