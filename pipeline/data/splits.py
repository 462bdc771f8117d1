"""Train / validation / test splits: the validation split is a stratified hold-out of the training
files, each split optionally a seeded class-balanced subset (every choice its own random stream)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError

if TYPE_CHECKING:
    from ..config.schema import DataConfig

__all__ = ["DataSplits", "split_indices", "stratified_holdout", "balanced_subset"]


@dataclass
class DataSplits:
    """The three splits of one dataset plus the facts a model needs to match it."""

    train: Dataset
    val: Dataset  # held out of the training set, chooses checkpoints
    test: Dataset  # only reported
    num_classes: int
    in_channels: int
    image_size: int  # spatial size of the tensors the datasets yield
    classes: tuple[str, ...] = field(default=())
    policy: Any = None  # the transforms.TransformPolicy of image data (None for fixed datasets)


def _rank_within_class(labels: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions carry the same label."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_labels)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - group_start
    return rank


def balanced_subset(indices: np.ndarray, labels: np.ndarray, k: int | None, rng: np.random.Generator,
                    what: str) -> np.ndarray:
    """Seeded, class-balanced subset of ``k`` of ``indices`` (labels aligned), returned sorted."""
    if k is None:
        return indices
    k = int(k)
    if k <= 0:
        raise DataError(f"{what}={k}: a subset size must be a positive integer (or null for all).")
    if k > len(indices):
        raise DataError(f"{what}={k} exceeds the {len(indices)} examples available; "
                        f"lower it or set it to null to use them all.")
    perm = rng.permutation(len(indices))
    rank = _rank_within_class(labels[perm])
    chosen = perm[np.lexsort((np.arange(len(perm)), rank))[:k]]
    return np.sort(indices[chosen])


def _per_class_counts(counts: np.ndarray, n: int, fraction: float) -> np.ndarray:
    """How many of each class go to validation: floor of the share, leftovers by largest remainder."""
    exact = counts * fraction
    per_class = np.floor(exact).astype(np.int64)
    missing = int(round(n * fraction)) - int(per_class.sum())
    if missing > 0:
        per_class[np.argsort(-(exact - per_class), kind="stable")[:missing]] += 1
    return per_class


def stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(labels)`` into (train, val), val a stratified ``fraction``."""
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise DataError(f"data.val_fraction={fraction} must lie strictly between 0 and 1.")
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    per_class = _per_class_counts(counts, n, fraction)
    val_parts = [rng.permutation(np.flatnonzero(labels == c))[:m] for c, m in zip(classes, per_class)]
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.empty(0, np.int64)
    if len(val) == 0 or len(val) == n:
        raise DataError(f"data.val_fraction={fraction} of {n} training examples leaves an empty "
                        f"train or validation split; choose a fraction that keeps both non-empty.")
    train = np.setdiff1d(np.arange(n), val, assume_unique=True)
    return train.astype(np.int64), val.astype(np.int64)


def split_indices(data_cfg: "DataConfig", seed: int, train_labels: np.ndarray, test_labels: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation (held out of train, stratified) / test indices, each optionally a
    seeded class-balanced subset; every choice has its own random stream."""
    tr, va = stratified_holdout(train_labels, data_cfg.val_fraction, np.random.default_rng([seed, 0]))
    tr = balanced_subset(tr, train_labels[tr], data_cfg.train_subset,
                         np.random.default_rng([seed, 1]), "data.train_subset")
    va = balanced_subset(va, train_labels[va], data_cfg.val_subset,
                         np.random.default_rng([seed, 2]), "data.val_subset")
    te = balanced_subset(np.arange(len(test_labels), dtype=np.int64), test_labels, data_cfg.test_subset,
                         np.random.default_rng([seed, 3]), "data.test_subset")
    return tr, va, te
