"""How stage metrics are named, sorted and shown in MLflow (manifests and evaluation.json keep theirs).

MLflow's UI groups charts into sections by the part of a metric name before its last ``/`` and
sorts them by name, so ``val_top1`` is logged as ``val/top1``, ``train_loss`` as ``train/loss``,
``compressed.dense_macs`` as ``cost/dense_macs`` (the compressed model is the subject; the
baseline's numbers go to ``baseline/...``). Counters (epoch, epochs, replicas_in_sync, ...) and
text (device, chosen inference form) become ``penni.<key>`` tags, not metrics. Values are rounded
to 5 significant digits, which is what the runs table has room for.
"""

from __future__ import annotations

import math
import numbers
import posixpath
import re
from typing import Any, Mapping

MAX_KEY = 250
SIGNIFICANT_DIGITS = 5
TAG_PREFIX = "penni."

# plain keys: per-epoch training metrics and stage manifests
RENAMES = {
    "train_loss": "train/loss", "train_top1": "train/top1", "train_objective": "train/objective",
    "l1_penalty": "train/l1_penalty", "group_l1_penalty": "train/group_l1_penalty", "lr": "train/lr",
    "distill_loss": "train/distill_loss",
    "val_loss": "val/loss", "val_top1": "val/top1", "val_top5": "val/top5",
    "selected_val_top1": "val/selected_top1", "baseline_val_top1": "baseline/val_top1",
    "sparsity": "sparsity/coefficients", "selected_sparsity": "sparsity/selected",
    "prunable_fraction": "sparsity/prunable",
    "epoch_seconds": "time/epoch_seconds", "train_seconds": "time/train_seconds",
    "mean_relative_kernel_error": "decompose/mean_relative_kernel_error",
    "predicted_dense_macs_reduction": "prune/predicted_dense_macs_reduction",
    "channel_groups_removed": "prune/channel_groups_removed",
    "max_relative_output_change": "shrink/max_relative_output_change",
    "compressed_test_top1": "test/top1", "compressed_test_top5": "test/top5",
    "baseline_test_top1": "baseline/test_top1", "baseline_test_top5": "baseline/test_top5",
    "top1_drop_points": "test/top1_drop_points",
}
# counts and settings, not measurements: tags (``epoch`` is the step itself when one is given)
COUNTERS = {"epoch", "epochs", "start_epoch", "selected_epoch", "replicas_in_sync", "layers_decomposed",
            "torch_threads", "latency_repeats", "pictures"}
_COUNTER_PATTERNS = (re.compile(r"(.*\.)?latency_factorized_layers_bs\d+$"),)
_RULES = (  # (pattern on the flattened key, replacement), first match wins
    (re.compile(r"^(params|dense_macs|sparse_macs)_(before|after)$"), r"shrink/\1_\2"),
    (re.compile(r"^(.+)_reduction_pct$"), r"reduction/\1_pct"),
    (re.compile(r"^(ort_)?latency_speedup_(bs\d+)$"), r"speedup/\1latency_\2"),
    (re.compile(r"^compressed\.test_(.+)$"), r"test/\1"),
    (re.compile(r"^compressed\.((?:nonzero_)?params|(?:dense|sparse)_macs)$"), r"cost/\1"),
    (re.compile(r"^compressed\.(.*?)latency_(.+)$"), r"latency/\1\2"),  # latency/ms_bs1, latency/ort_ms_bs1
    (re.compile(r"^baseline\.(.+)$"), r"baseline/\1"),
)


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty dicts are kept as ``{}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def clean_key(key: Any) -> str:
    """Make a key acceptable to MLflow (characters, no path tricks, length)."""
    k = re.sub(r"[^/\w.\- :]", "_", str(key))
    if not k or posixpath.normpath(k) != k or k.startswith(".."):
        k = k.replace("/", "_")
        if k in ("", ".", "..") or k.startswith(".."):
            k = "_" + k
    return k[:MAX_KEY]


def as_number(v: Any) -> float | None:
    """A float for numbers (bool, numpy/torch scalars included), None for anything else."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars, 1-element tensors
        try:
            x = v.item()
        except Exception:  # noqa: BLE001
            return None
        return float(x) if isinstance(x, numbers.Real) else None
    return None


def rounded(x: float) -> float:
    """``x`` to 5 significant digits (integers and non-finite values unchanged)."""
    if not math.isfinite(x) or x == int(x):
        return x
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def metric_name(key: str) -> str:
    """The grouped MLflow name of a flattened manifest key (``val_top1`` -> ``val/top1``)."""
    if key in RENAMES:
        return RENAMES[key]
    for pattern, replacement in _RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key.replace(".", "/")


def is_counter(key: str) -> bool:
    """Counts and settings (epoch, epochs, replicas_in_sync, ...): logged as tags, not metrics."""
    return key.rsplit(".", 1)[-1] in COUNTERS or any(p.match(key) for p in _COUNTER_PATTERNS)


def split_for_mlflow(values: Mapping, step: int | None = None) -> tuple[dict, dict, list[str]]:
    """``values`` as (metrics by grouped name, rounded; tags for counters and text; keys left out
    because they are NaN or infinite). ``epoch`` is dropped when a step is given (it is the step)."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in flatten(values).items():
        if key == "epoch" and step is not None:
            continue
        x = as_number(value)
        if x is None or is_counter(key):
            tags[clean_key(TAG_PREFIX + key)] = _tag_text(value, x)
        elif math.isfinite(x):
            metrics[clean_key(metric_name(key))] = rounded(x)
        else:
            dropped.append(key)
    return metrics, tags, dropped


def _tag_text(value: Any, x: float | None) -> str:
    """A counter as ``3`` (not ``3.0``), a flag as ``true``, text as it is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if x is not None and math.isfinite(x) and x == int(x):
        return str(int(x))
    return str(value)
