"""Image datasets on files: ImageFolder trees and Parquet shards, split into train / val / test
with the transform policy that fits their images (see ``transforms.py``)."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .shards import MAKE_SHARDS_HINT, ParquetImageDataset, is_uri, location_is_dir
from .splits import DataSplits, split_indices
from .transforms import choose_policy, policy_transforms

if TYPE_CHECKING:
    from ..config.schema import DataConfig

__all__ = ["TransformSubset", "build_imagefolder", "build_parquet", "load_image_file", "split_locations"]


class TransformSubset(Dataset):
    """Subset of a dataset yielding ``(PIL image, label)`` with its own transform, so train and
    val can share one underlying dataset (one directory scan / shard index)."""

    def __init__(self, base: Dataset, indices: np.ndarray, transform: Callable | None):
        self.base, self.transform = base, transform
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = list(getattr(base, "classes", []))

    @property
    def targets(self) -> torch.Tensor:
        """Labels of this split, aligned with item order."""
        return torch.as_tensor(np.asarray(self.base.targets, dtype=np.int64)[self.indices])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, label = self.base[int(self.indices[i])]
        return (self.transform(img) if self.transform is not None else img), int(label)


def _layout_hint(dataset: str) -> str:
    if dataset == "imagefolder":
        return "an ImageFolder tree root/train/<class>/*.jpg and root/val/<class>/*.jpg"
    return f"Parquet shards root/train/*.parquet and root/val/*.parquet ({MAKE_SHARDS_HINT})"


def split_locations(root: str | None, dataset: str) -> tuple[str, str]:
    """The train and val directories (or URIs, for Parquet) under ``data.root``; DataError when missing."""
    hint = _layout_hint(dataset)
    if not root:
        raise DataError(f"data.dataset={dataset!r} needs data.root pointing at {hint}.")
    if is_uri(root):
        if dataset != "parquet":
            raise DataError(f"data.root={root!r} is a URI, which only data.dataset='parquet' reads; "
                            f"write Parquet shards ({MAKE_SHARDS_HINT}) and upload them, or use a local path.")
        subs = [f"{root.partition('?')[0].rstrip('/')}/{s}" + (f"?{root.partition('?')[2]}" if "?" in root else "")
                for s in ("train", "val")]
        for sub, where in zip(("train", "val"), subs):
            if not location_is_dir(where):
                raise DataError(f"data.root={root!r} has no {sub}/ prefix; data.dataset={dataset!r} needs {hint}.")
        return subs[0], subs[1]
    r = pathlib.Path(root).expanduser()
    if not r.is_dir():
        raise DataError(f"data.root={str(r)!r} does not exist or is not a directory; "
                        f"data.dataset={dataset!r} needs {hint}.")
    for sub in ("train", "val"):
        if not (r / sub).is_dir():
            raise DataError(f"data.root={str(r)!r} has no {sub}/ directory; data.dataset={dataset!r} needs {hint}.")
    return str(r / "train"), str(r / "val")


def load_image_file(path: str):
    """An image file as a PIL RGB image; an undecodable file is a DataError naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot decode the image {path} ({type(e).__name__}: {e}); "
                        "remove or replace that file.") from None


def _image_folder(directory: str):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(directory, loader=load_image_file)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{directory} is not a usable ImageFolder split ({e}); it needs one "
                        f"sub-directory per class holding image files.") from None


def _build_folder_like(data_cfg: "DataConfig", seed: int, train_base: Any, test_base: Any) -> DataSplits:
    """Splits of an ImageFolder-like pair (train dir holds train + val, val dir is the test split)."""
    dataset = data_cfg.dataset
    if list(train_base.classes) != list(test_base.classes):
        raise DataError(f"{dataset}: the classes of train ({len(train_base.classes)}) and val "
                        f"({len(test_base.classes)}) differ; both splits need the same class set.")
    tr, va, te = split_indices(data_cfg, seed, np.asarray(train_base.targets, dtype=np.int64),
                               np.asarray(test_base.targets, dtype=np.int64))
    policy = choose_policy(data_cfg, train_base, tr, key=f"{dataset}:{data_cfg.root}:{seed}")
    train_tf, eval_tf = policy_transforms(policy)
    return DataSplits(train=TransformSubset(train_base, tr, train_tf),
                      val=TransformSubset(train_base, va, eval_tf),
                      test=TransformSubset(test_base, te, eval_tf),
                      num_classes=len(train_base.classes), in_channels=3, image_size=policy.image_size,
                      classes=tuple(train_base.classes), policy=policy)


def build_imagefolder(data_cfg: "DataConfig", seed: int) -> DataSplits:
    """ImageFolder splits: root/train holds train + validation, root/val is the reported test split."""
    train_dir, val_dir = split_locations(data_cfg.root, "imagefolder")
    return _build_folder_like(data_cfg, seed, _image_folder(train_dir), _image_folder(val_dir))


def build_parquet(data_cfg: "DataConfig", seed: int) -> DataSplits:
    """Parquet-shard splits, laid out like an ImageFolder tree (local directory or pyarrow.fs URI)."""
    train_dir, val_dir = split_locations(data_cfg.root, "parquet")
    return _build_folder_like(data_cfg, seed, ParquetImageDataset(train_dir), ParquetImageDataset(val_dir))
