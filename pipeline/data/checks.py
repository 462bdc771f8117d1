"""Checks before anything starts (preflight): the dataset is where the config says, has as many classes
as the model, no empty class and no undecodable image (headers of up to SCAN_LIMIT images per split)."""

from __future__ import annotations

import io
import os
import pathlib
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import DataError
from .fashion_mnist import FASHION_CLASSES, find_fashion_mnist
from .image_datasets import split_locations
from .shards import ParquetImageDataset, is_uri, open_shard

if TYPE_CHECKING:
    from ..config.schema import DataConfig

__all__ = ["SCAN_LIMIT", "check_dataset"]

SCAN_LIMIT = 50_000  # preflight decodes the headers of at most this many images per split


def check_dataset(data_cfg: "DataConfig", num_classes: int) -> None:
    """Check that the dataset is where ``data_cfg`` says, has ``num_classes`` classes, no empty
    class and no undecodable image (header check, up to SCAN_LIMIT per split); raise DataError."""
    name, root = data_cfg.dataset, data_cfg.root
    if name == "fashion_mnist":
        find_fashion_mnist(root)
        found = len(FASHION_CLASSES)
    elif name in ("imagefolder", "parquet"):
        if root and is_uri(root):
            split_locations(root, name)  # the prefixes exist; images are checked when they are read
            return
        train_dir, val_dir = split_locations(root, name)
        check = _check_image_tree if name == "imagefolder" else _check_shards
        found = check(pathlib.Path(train_dir))
        check(pathlib.Path(val_dir))
    else:
        return
    if int(found) != int(num_classes):
        what = "Fashion-MNIST" if name == "fashion_mnist" else f"data.root={str(root)!r}"
        fix = "" if name == "fashion_mnist" else "fix the class folders or "
        raise DataError(f"{what} has {found} class{'es' if found != 1 else ''} but "
                        f"model.num_classes={num_classes}; they must "
                        f"be equal ({fix}set model.num_classes={found}).")


def _evenly(items: Sequence, limit: int) -> list:
    """At most ``limit`` items spread evenly over ``items`` (all of them when few)."""
    if len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def _undecodable(data_or_path: Any) -> str | None:
    """Why an image cannot be decoded (header parse + PIL verify), or None when it looks fine."""
    from PIL import Image

    try:
        source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
        with Image.open(source) as img:
            img.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return f"{type(e).__name__}: {e}"
    return None


def _first_bad(items: Sequence[tuple[str, Any]]) -> tuple[str, str] | None:
    """The first ``(where, why)`` among ``(where, path or bytes)`` that does not decode (threaded)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 2) * 2)) as pool:
        for (where, _), why in zip(items, pool.map(lambda item: _undecodable(item[1]), items)):
            if why is not None:
                return where, why
    return None


def _check_image_tree(split_dir: pathlib.Path) -> int:
    """Number of classes of one ImageFolder split; empty classes and bad images are DataErrors."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    try:
        classes, _ = find_classes(str(split_dir))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{split_dir} is not a usable ImageFolder split ({e}); it needs one "
                        f"sub-directory per class holding image files.") from None
    files, empty = [], []
    for cls in classes:
        found = [os.path.join(d, f) for d, _, names in os.walk(split_dir / cls, followlinks=True)
                 for f in sorted(names) if f.lower().endswith(IMG_EXTENSIONS)]
        files += found
        if not found:
            empty.append(str(split_dir / cls))
    if empty:
        raise DataError(f"class folder {empty[0]} holds no images ({', '.join(IMG_EXTENSIONS)})"
                        + (f" (nor do {len(empty) - 1} other class folders)" if len(empty) > 1 else "")
                        + "; add images or remove the folder.")
    bad = _first_bad([(f, f) for f in _evenly(files, SCAN_LIMIT)])
    if bad:
        raise DataError(f"cannot decode the image {bad[0]} ({bad[1]}); remove or replace that file.")
    return len(classes)


def _check_shards(split_dir: pathlib.Path) -> int:
    """Number of classes of one Parquet split; classes without rows and bad images are DataErrors."""
    shards = ParquetImageDataset(split_dir)
    counts = np.bincount(np.asarray(shards.targets, dtype=np.int64), minlength=len(shards.classes))
    empty = [c for c, n in zip(shards.classes, counts) if n == 0]
    if empty:
        raise DataError(f"class {empty[0]!r} has no images in the shards of {split_dir}"
                        + (f" (nor do {len(empty) - 1} other classes)" if len(empty) > 1 else "")
                        + "; re-write the shards from an ImageFolder tree without empty class folders.")
    groups = [(f, g) for f in shards.files for g in range(open_shard(f).metadata.num_row_groups)]
    per_group = max(1, len(shards) // max(1, len(groups)))
    for f, g in _evenly(groups, max(1, SCAN_LIMIT // per_group)):
        column = open_shard(f).read_row_group(g, columns=["image"]).column("image")
        items = [(f"row {i} of row group {g} of {f}", column[i].as_py()) for i in range(len(column))]
        bad = _first_bad(items)
        if bad:
            raise DataError(f"cannot decode the image at {bad[0]} ({bad[1]}); re-write the shards.")
    return len(shards.classes)
