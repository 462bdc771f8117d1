"""Datasets for the pipeline: Fashion-MNIST (idx files), ImageFolder, Parquet shards, synthetic.

Pure PyTorch/torchvision/pyarrow (pyarrow imported lazily); never imports ray or mlflow, so the
stages can build their data on any machine. Every user-facing problem raises :class:`DataError`.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import pathlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DataError",
    "DataSplits",
    "build_datasets",
    "check_dataset",
    "find_data_error",
    "load_image_file",
    "make_loader",
    "example_batch",
    "find_fashion_mnist",
    "read_idx",
    "write_parquet_shards",
    "ParquetImageDataset",
    "FashionMNISTSplit",
    "SyntheticDataset",
    "TransformSubset",
    "FASHION_MEAN",
    "FASHION_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CLASSES_KEY = b"penni.classes"
_SPLIT_KEY = b"penni.split"
_FASHION_NAMES = ", ".join(f"{stem}[.gz]" for stem in _FASHION_FILES.values())
DATASETS = ("fashion_mnist", "imagefolder", "parquet", "synthetic")
SCAN_LIMIT = 50_000  # preflight decodes the headers of at most this many images per split


class DataError(ValueError):
    """A user-facing data problem: the message says what was wrong and what to do."""


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


# ---------------------------------------------------------------------------------------------
# split helpers
# ---------------------------------------------------------------------------------------------


def _rank_within_class(labels: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions carry the same label."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_labels)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - group_start
    return rank


def _balanced_subset(indices: np.ndarray, labels: np.ndarray, k: int, rng: np.random.Generator,
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


def _stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(labels)`` into (train, val), val a stratified ``fraction``."""
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise DataError(f"data.val_fraction={fraction} must lie strictly between 0 and 1.")
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * fraction
    per_class = np.floor(exact).astype(np.int64)
    missing = int(round(n * fraction)) - int(per_class.sum())
    if missing > 0:  # largest remainders get the leftover examples
        per_class[np.argsort(-(exact - per_class), kind="stable")[:missing]] += 1
    val_parts = []
    for c, m in zip(classes, per_class):
        pos = np.flatnonzero(labels == c)
        val_parts.append(rng.permutation(pos)[:m])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.empty(0, np.int64)
    if len(val) == 0 or len(val) == n:
        raise DataError(f"data.val_fraction={fraction} of {n} training examples leaves an empty "
                        f"train or validation split; choose a fraction that keeps both non-empty.")
    train = np.setdiff1d(np.arange(n), val, assume_unique=True)
    return train.astype(np.int64), val.astype(np.int64)


def _cfg(data_cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(data_cfg, name, default)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (``.gz`` or plain) into a numpy array, validating magic, dims and size."""
    path = pathlib.Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"idx file {path} does not exist.") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"idx file {path} cannot be read ({e}); delete it and fetch it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an idx file (bad magic {raw[:4].hex()!r}); "
                        f"delete it and fetch the dataset again.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"idx file {path} is truncated in its header; fetch it again.")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"idx file {path} holds {len(raw) - header} data bytes but its header "
                        f"{dims} needs {expected}; the file is corrupt or truncated, fetch it again.")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True) if dtype.itemsize > 1 else arr.copy()


def _fashion_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _has_fashion(directory: pathlib.Path) -> bool:
    return all(_fashion_file(directory, s) is not None for s in _FASHION_FILES.values())


def find_fashion_mnist(root: str | os.PathLike | None, download: bool = True) -> pathlib.Path:
    """Directory holding the four Fashion-MNIST idx files. An explicit ``root`` must hold them
    (in itself or its torchvision ``FashionMNIST/raw``); without one: the Debian
    ``dataset-fashion-mnist`` package, then a torchvision download into ``~/.cache/penni``."""
    if root:
        return _fashion_in_root(pathlib.Path(root).expanduser())
    if _has_fashion(DEBIAN_FASHION_DIR):
        return DEBIAN_FASHION_DIR
    dl_root = pathlib.Path.home() / ".cache" / "penni"
    if _has_fashion(dl_root / "FashionMNIST" / "raw"):
        return dl_root / "FashionMNIST" / "raw"
    reason = "download disabled"
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(dl_root), train=train, download=True)
            if _has_fashion(dl_root / "FashionMNIST" / "raw"):
                return dl_root / "FashionMNIST" / "raw"
            reason = "download finished but the files are missing"
        except Exception as e:  # no network, mirror down, disk full, ...
            reason = f"{type(e).__name__}: {e}"
    raise DataError(
        f"Fashion-MNIST idx files ({_FASHION_NAMES}) were not found. Looked in: {DEBIAN_FASHION_DIR}, "
        f"{dl_root / 'FashionMNIST' / 'raw'}; torchvision download into {dl_root} failed ({reason}). "
        "Fix one of: (1) put the four files in a directory and set data.root to it; "
        "(2) `apt-get install -y dataset-fashion-mnist` (installs them in "
        f"{DEBIAN_FASHION_DIR}); (3) run once with network access so torchvision can download "
        f"them into {dl_root}.")


def _fashion_in_root(root: pathlib.Path) -> pathlib.Path:
    """The Fashion-MNIST directory inside an explicitly given data.root (never another copy)."""
    for candidate in (root, root / "FashionMNIST" / "raw"):
        if _has_fashion(candidate):
            return candidate
    raise DataError(
        f"data.root={str(root)!r} does not hold Fashion-MNIST: the idx files ({_FASHION_NAMES}) are "
        f"not in {root} nor in {root / 'FashionMNIST' / 'raw'}. Put them there (e.g. from "
        f"`apt-get install -y dataset-fashion-mnist`, in {DEBIAN_FASHION_DIR}), or remove data.root "
        "to use the system copy or a torchvision download.")


@functools.lru_cache(maxsize=2)
def _load_fashion(directory: str) -> dict[str, torch.Tensor]:
    """All of Fashion-MNIST as uint8 image / int64 label tensors (cached per directory)."""
    d = pathlib.Path(directory)
    out: dict[str, torch.Tensor] = {}
    for key, stem in _FASHION_FILES.items():
        arr = read_idx(_fashion_file(d, stem))
        out[key] = torch.from_numpy(arr if key.endswith("images") else arr.astype(np.int64))
    for split, n in (("train", 60000), ("test", 10000)):
        imgs, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if imgs.dtype != torch.uint8 or tuple(imgs.shape) != (n, 28, 28) or tuple(labels.shape) != (n,):
            raise DataError(f"Fashion-MNIST {split} files in {d} have shapes {tuple(imgs.shape)} / "
                            f"{tuple(labels.shape)}, expected ({n}, 28, 28) / ({n},); fetch them again.")
        if int(labels.min()) < 0 or int(labels.max()) > 9:
            raise DataError(f"Fashion-MNIST {split} labels in {d} fall outside 0..9; fetch them again.")
    return out


class FashionMNISTSplit(Dataset):
    """In-memory uint8 Fashion-MNIST subset yielding normalized float (1, S, S) tensors.

    ``indices`` index the source arrays (``source`` is "train" or "test"); augmentation (random
    crop with 2-pixel padding + horizontal flip) is done with cheap tensor ops per item.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray,
                 image_size: int, augment: bool, source: str):
        self.images, self.labels = images, labels
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_size, self.augment, self.source = int(image_size), bool(augment), source
        self.classes = list(FASHION_CLASSES)
        if self.image_size <= 0:
            raise DataError(f"data.image_size={image_size} must be positive.")
        # geometry: native 28 as is, 32 = pad 2 (CIFAR layout), anything else = resize.
        self._border = 2 if self.image_size == 32 else 0
        self._resize = self.image_size not in (28, 32)

    @property
    def targets(self) -> torch.Tensor:
        """Labels of this split, aligned with item order."""
        return self.labels[torch.from_numpy(self.indices)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        img = self.images[j].unsqueeze(0)  # (1, 28, 28) uint8
        if self._resize:
            from torchvision.transforms.v2 import functional as TF

            img = TF.resize(img, [self.image_size, self.image_size], antialias=True)
        pad = self._border + (2 if self.augment else 0)
        if pad:
            img = F.pad(img, (pad, pad, pad, pad))
        if self.augment:
            dy, dx = torch.randint(0, 5, (2,)).tolist()
            s = self.image_size
            img = img[:, dy:dy + s, dx:dx + s]
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
        x = img.float().div_(255.0).sub_(FASHION_MEAN).div_(FASHION_STD)
        return x, int(self.labels[j])


def _split_indices(data_cfg: Any, seed: int, train_labels: np.ndarray, test_labels: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation (held out of train, stratified) / test indices, each optionally a
    seeded class-balanced subset; every choice has its own random stream."""
    tr, va = _stratified_holdout(train_labels, _cfg(data_cfg, "val_fraction", 0.1),
                                 np.random.default_rng([seed, 0]))
    tr = _balanced_subset(tr, train_labels[tr], _cfg(data_cfg, "train_subset"),
                          np.random.default_rng([seed, 1]), "data.train_subset")
    va = _balanced_subset(va, train_labels[va], _cfg(data_cfg, "val_subset"),
                          np.random.default_rng([seed, 2]), "data.val_subset")
    te = _balanced_subset(np.arange(len(test_labels), dtype=np.int64), test_labels, _cfg(data_cfg, "test_subset"),
                          np.random.default_rng([seed, 3]), "data.test_subset")
    return tr, va, te


def _build_fashion(data_cfg: Any, seed: int) -> DataSplits:
    directory = find_fashion_mnist(_cfg(data_cfg, "root"))
    t = _load_fashion(str(directory.resolve()))
    size = int(_cfg(data_cfg, "image_size", 32) or 32)
    tr, va, te = _split_indices(data_cfg, seed, t["train_labels"].numpy(), t["test_labels"].numpy())
    return DataSplits(
        train=FashionMNISTSplit(t["train_images"], t["train_labels"], tr, size, True, "train"),
        val=FashionMNISTSplit(t["train_images"], t["train_labels"], va, size, False, "train"),
        test=FashionMNISTSplit(t["test_images"], t["test_labels"], te, size, False, "test"),
        num_classes=10, in_channels=1, image_size=size, classes=FASHION_CLASSES)


# ---------------------------------------------------------------------------------------------
# ImageFolder and Parquet (ImageNet-style transforms)
# ---------------------------------------------------------------------------------------------


def imagenet_transforms(image_size: int) -> tuple[Callable, Callable]:
    """(train, eval) torchvision transforms from PIL images to normalized float tensors."""
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), v2.ToPureTensor()]
    train = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True),
                        v2.RandomHorizontalFlip(), *tail])
    evaluate = v2.Compose([v2.Resize(int(image_size * 256 / 224), antialias=True),
                           v2.CenterCrop(image_size), *tail])
    return train, evaluate


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


def _split_dirs(root: Any, dataset: str) -> tuple[pathlib.Path, pathlib.Path]:
    hint = ("an ImageFolder tree root/train/<class>/*.jpg and root/val/<class>/*.jpg"
            if dataset == "imagefolder" else
            "Parquet shards root/train/*.parquet and root/val/*.parquet "
            "(write them with `python workflows/make_shards.py IMAGEFOLDER_ROOT OUT_DIR`)")
    if not root:
        raise DataError(f"data.dataset={dataset!r} needs data.root pointing at {hint}.")
    r = pathlib.Path(root).expanduser()
    if not r.is_dir():
        raise DataError(f"data.root={str(r)!r} does not exist or is not a directory; "
                        f"data.dataset={dataset!r} needs {hint}.")
    for sub in ("train", "val"):
        if not (r / sub).is_dir():
            raise DataError(f"data.root={str(r)!r} has no {sub}/ directory; "
                            f"data.dataset={dataset!r} needs {hint}.")
    return r / "train", r / "val"


def _build_folder_like(data_cfg: Any, seed: int, train_base: Any, test_base: Any,
                       dataset: str) -> DataSplits:
    if list(train_base.classes) != list(test_base.classes):
        raise DataError(f"{dataset}: the classes of train ({len(train_base.classes)}) and val "
                        f"({len(test_base.classes)}) differ; both splits need the same class set.")
    size = int(_cfg(data_cfg, "image_size", 224) or 224)
    train_tf, eval_tf = imagenet_transforms(size)
    tr, va, te = _split_indices(data_cfg, seed, np.asarray(train_base.targets, dtype=np.int64),
                                np.asarray(test_base.targets, dtype=np.int64))
    return DataSplits(train=TransformSubset(train_base, tr, train_tf),
                      val=TransformSubset(train_base, va, eval_tf),
                      test=TransformSubset(test_base, te, eval_tf),
                      num_classes=len(train_base.classes), in_channels=3, image_size=size,
                      classes=tuple(train_base.classes))


def load_image_file(path: str):
    """An image file as a PIL RGB image; an undecodable file is a DataError naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot decode the image {path} ({type(e).__name__}: {e}); "
                        "remove or replace that file.") from None


def _image_folder(directory: pathlib.Path):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(directory), loader=load_image_file)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{directory} is not a usable ImageFolder split ({e}); it needs one "
                        f"sub-directory per class holding image files.") from None


def _build_imagefolder(data_cfg: Any, seed: int) -> DataSplits:
    train_dir, val_dir = _split_dirs(_cfg(data_cfg, "root"), "imagefolder")
    return _build_folder_like(data_cfg, seed, _image_folder(train_dir), _image_folder(val_dir),
                              "imagefolder")


def _decode_image(data: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot decode the image at {where} ({e}); re-write the shards.") from None


class ParquetImageDataset(Dataset):
    """Encoded images in Parquet shards (columns ``image`` binary, ``label`` int64, ``path``).

    Only footers and the ``label`` column are read up front; images are read lazily, one row
    group at a time through memory-mapped files (an LRU of open files and one cached row group
    per process), so shard sets far larger than RAM work. Items are ``(PIL RGB image, label)``
    unless a ``transform`` is given.
    """

    max_open_files = 64

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike],
                 transform: Callable | None = None):
        import pyarrow.parquet as pq

        if isinstance(source, (str, os.PathLike)):
            d = pathlib.Path(source)
            if not d.is_dir():
                raise DataError(f"Parquet shard directory {d} does not exist.")
            files = sorted(d.glob("*.parquet"))
            if not files:
                raise DataError(f"no *.parquet shards in {d}; write them with "
                                f"`python workflows/make_shards.py IMAGEFOLDER_ROOT OUT_DIR`.")
        else:
            files = [pathlib.Path(f) for f in source]
            if not files:
                raise DataError("ParquetImageDataset needs at least one shard file.")
        self.files = [str(f) for f in files]
        self.transform = transform
        classes: list[str] | None = None
        rows_per_file, rg_rows, labels = [], [], []
        for f in self.files:
            try:
                pf = pq.ParquetFile(f, memory_map=True)
                schema = pf.schema_arrow
                for col in ("image", "label"):
                    if col not in schema.names:
                        raise DataError(f"shard {f} has no {col!r} column (columns: "
                                        f"{schema.names}); it was not written by write_parquet_shards.")
                meta = schema.metadata or {}
                file_classes = json.loads(meta[_CLASSES_KEY]) if _CLASSES_KEY in meta else None
                lab = pf.read(columns=["label"]).column("label").to_numpy().astype(np.int64)
                md = pf.metadata
                rg_rows.append([md.row_group(g).num_rows for g in range(md.num_row_groups)])
            except DataError:
                raise
            except Exception as e:  # ArrowInvalid, OSError, JSON errors
                raise DataError(f"cannot read Parquet shard {f} ({type(e).__name__}: {e}); "
                                f"it is corrupt or not a shard, re-write it.") from None
            if file_classes is not None:
                if classes is None:
                    classes = list(file_classes)
                elif classes != file_classes:
                    raise DataError(f"shard {f} lists different classes than {self.files[0]}; "
                                    f"all shards of a dataset must come from one ImageFolder tree.")
            rows_per_file.append(len(lab))
            labels.append(lab)
        self._labels = np.concatenate(labels) if labels else np.empty(0, np.int64)
        if classes is None:  # shards written elsewhere: derive names from the labels
            classes = [str(i) for i in range(int(self._labels.max()) + 1 if len(self._labels) else 0)]
        if len(self._labels) and (self._labels.min() < 0 or self._labels.max() >= len(classes)):
            raise DataError(f"labels in {source} fall outside 0..{len(classes) - 1} "
                            f"of the {len(classes)} classes in the shard metadata; re-write the shards.")
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        # index: global row -> (file, row group, row in group), as compact numpy arrays.
        file_of, group_of, row_of = [], [], []
        for fi, groups in enumerate(rg_rows):
            for gi, n in enumerate(groups):
                file_of.append(np.full(n, fi, np.int32))
                group_of.append(np.full(n, gi, np.int32))
                row_of.append(np.arange(n, dtype=np.int32))
        self._file = np.concatenate(file_of) if file_of else np.empty(0, np.int32)
        self._group = np.concatenate(group_of) if group_of else np.empty(0, np.int32)
        self._row = np.concatenate(row_of) if row_of else np.empty(0, np.int32)
        if len(self._file) != len(self._labels):
            raise DataError(f"row-group metadata and label column of {source} disagree; "
                            f"re-write the shards.")
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._pid = os.getpid()
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._cached_key: tuple[int, int] | None = None
        self._cached_images: Any = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_handles", "_cached_key", "_cached_images", "_pid"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_cache()

    @property
    def targets(self) -> np.ndarray:
        """All labels, aligned with item order."""
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def _row_group(self, fi: int, gi: int):
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # forked worker: never share handles with the parent
            self._reset_cache()
        if self._cached_key == (fi, gi):
            return self._cached_images
        pf = self._handles.get(fi)
        if pf is None:
            pf = pq.ParquetFile(self.files[fi], memory_map=True)
            self._handles[fi] = pf
            while len(self._handles) > self.max_open_files:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(fi)
        images = pf.read_row_group(gi, columns=["image"]).column("image")
        self._cached_key, self._cached_images = (fi, gi), images
        return images

    def read_bytes(self, i: int) -> bytes:
        """The encoded image bytes of item ``i``."""
        if i < 0:
            i += len(self)
        fi, gi, ri = int(self._file[i]), int(self._group[i]), int(self._row[i])
        return self._row_group(fi, gi)[ri].as_py()

    def __getitem__(self, i: int) -> tuple[Any, int]:
        i = int(i)
        img = _decode_image(self.read_bytes(i), f"row {i} of {self.files[int(self._file[i])]}")
        return (self.transform(img) if self.transform is not None else img), int(self._labels[i])


def _build_parquet(data_cfg: Any, seed: int) -> DataSplits:
    train_dir, val_dir = _split_dirs(_cfg(data_cfg, "root"), "parquet")
    return _build_folder_like(data_cfg, seed, ParquetImageDataset(train_dir),
                              ParquetImageDataset(val_dir), "parquet")


def write_parquet_shards(image_folder: str | os.PathLike, out_dir: str | os.PathLike,
                         rows_per_shard: int = 1000, split_name: str | None = None,
                         overwrite: bool = False, row_group_bytes: int = 1 << 20) -> list[str]:
    """Convert an ImageFolder tree to Parquet shards, keeping the encoded file bytes as they are.

    Without ``split_name``: ``image_folder/{train,val}`` -> ``out_dir/{train,val}/*.parquet``.
    With ``split_name``: ``image_folder`` is one split (class sub-directories) written to
    ``out_dir/split_name``. Rows keep ImageFolder order; row groups hold about
    ``row_group_bytes`` so random access reads little. Each shard is written atomically.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if int(rows_per_shard) <= 0:
        raise DataError(f"rows_per_shard={rows_per_shard} must be a positive integer.")
    src = pathlib.Path(image_folder).expanduser()
    out = pathlib.Path(out_dir).expanduser()
    if not src.is_dir():
        raise DataError(f"ImageFolder root {src} does not exist or is not a directory.")
    if split_name is None:
        for sub in ("train", "val"):
            if not (src / sub).is_dir():
                raise DataError(f"{src} has no {sub}/ directory; expected an ImageFolder tree "
                                f"root/train/<class>/* and root/val/<class>/* (or convert a "
                                f"single split with split_name / --split).")
        jobs = [(src / "train", "train"), (src / "val", "val")]
    else:
        if not split_name or "/" in split_name or split_name.startswith("."):
            raise DataError(f"split_name={split_name!r} must be a plain directory name.")
        jobs = [(src, split_name)]

    plans = []
    for split_dir, name in jobs:
        try:
            classes, class_to_idx = find_classes(str(split_dir))
            samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"{split_dir} is not a usable ImageFolder split ({e}).") from None
        target = out / name
        existing = sorted(target.glob("*.parquet")) if target.is_dir() else []
        if existing and not overwrite:
            raise DataError(f"{target} already holds {len(existing)} shard(s); remove them or "
                            f"pass overwrite=True (--overwrite).")
        plans.append((split_dir, name, classes, samples, target, existing))

    from PIL import Image, UnidentifiedImageError

    written: list[str] = []
    for split_dir, name, classes, samples, target, existing in plans:
        target.mkdir(parents=True, exist_ok=True)
        for old in existing:
            old.unlink()
        meta = {_CLASSES_KEY: json.dumps(list(classes)).encode(), _SPLIT_KEY: name.encode()}
        schema = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())],
                           metadata=meta)
        n_shards = (len(samples) + rows_per_shard - 1) // rows_per_shard
        for s in range(n_shards):
            chunk = samples[s * rows_per_shard:(s + 1) * rows_per_shard]
            images = []
            for path, _ in chunk:
                data = pathlib.Path(path).read_bytes()
                try:
                    with Image.open(io.BytesIO(data)):  # header only: catches non-images early
                        pass
                except (UnidentifiedImageError, OSError) as e:
                    raise DataError(f"{path} is not a readable image ({e}); remove or fix it.") from None
                images.append(data)
            table = pa.Table.from_pydict(
                {"image": images, "label": [lab for _, lab in chunk],
                 "path": [os.path.relpath(p, split_dir) for p, _ in chunk]}, schema=schema)
            mean_bytes = max(1, sum(map(len, images)) // max(1, len(images)))
            row_group = max(1, min(len(chunk), row_group_bytes // mean_bytes))
            final = target / f"{name}-{s:05d}-of-{n_shards:05d}.parquet"
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            try:
                pq.write_table(table, tmp, row_group_size=row_group,
                               compression={"image": "NONE", "label": "ZSTD", "path": "ZSTD"},
                               use_dictionary=["label", "path"], write_statistics=["label"])
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    tmp.unlink()
            written.append(str(final))
    return written


# ---------------------------------------------------------------------------------------------
# synthetic (benchmarks only)
# ---------------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """Deterministic random tensors (item ``i`` always the same) with random labels; for
    throughput benchmarks only, never a stand-in for a missing dataset."""

    def __init__(self, n: int, in_channels: int, image_size: int, num_classes: int, seed: int):
        if n <= 0 or in_channels <= 0 or image_size <= 0 or num_classes <= 0:
            raise DataError(f"synthetic data needs positive sizes, got n={n}, "
                            f"in_channels={in_channels}, image_size={image_size}, "
                            f"num_classes={num_classes}.")
        self.n, self.in_channels, self.image_size = int(n), int(in_channels), int(image_size)
        self.seed = int(seed)
        g = torch.Generator().manual_seed(self.seed)
        self._labels = torch.randint(0, int(num_classes), (self.n,), generator=g)
        self.classes = [str(i) for i in range(int(num_classes))]

    @property
    def targets(self) -> torch.Tensor:
        """Labels, aligned with item order."""
        return self._labels

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x = torch.randn(self.in_channels, self.image_size, self.image_size, generator=g)
        return x, int(self._labels[i])


def _build_synthetic(data_cfg: Any, seed: int) -> DataSplits:
    n = int(_cfg(data_cfg, "synthetic_size", 1024) or 1024)
    c = int(_cfg(data_cfg, "in_channels", None) or 3)
    k = int(_cfg(data_cfg, "num_classes", None) or 10)
    s = int(_cfg(data_cfg, "image_size", 32) or 32)
    frac = float(_cfg(data_cfg, "val_fraction", 0.1) or 0.1)
    n_train = int(_cfg(data_cfg, "train_subset", None) or n)
    n_val = int(_cfg(data_cfg, "val_subset", None) or max(1, int(n * frac)))
    n_test = int(_cfg(data_cfg, "test_subset", None) or max(1, int(n * frac)))
    return DataSplits(train=SyntheticDataset(n_train, c, s, k, seed * 3 + 0),
                      val=SyntheticDataset(n_val, c, s, k, seed * 3 + 1),
                      test=SyntheticDataset(n_test, c, s, k, seed * 3 + 2),
                      num_classes=k, in_channels=c, image_size=s,
                      classes=tuple(str(i) for i in range(k)))


# ---------------------------------------------------------------------------------------------
# checks before anything starts (preflight)
# ---------------------------------------------------------------------------------------------


def check_dataset(data_cfg: Any, num_classes: int) -> None:
    """Check that the dataset is where ``data_cfg`` says, has ``num_classes`` classes, no empty
    class and no undecodable image (header check, up to SCAN_LIMIT per split); raise DataError."""
    name = _cfg(data_cfg, "dataset")
    root = _cfg(data_cfg, "root")
    if name == "fashion_mnist":
        find_fashion_mnist(root)
        found = [len(FASHION_CLASSES)]
    elif name in ("imagefolder", "parquet"):
        if root and "://" in str(root):
            return  # remote shards are checked when they are read
        train_dir, val_dir = _split_dirs(root, name)
        check = _check_image_tree if name == "imagefolder" else _check_shards
        found = [check(train_dir), check(val_dir)]
    else:
        return
    if int(found[0]) != int(num_classes):
        what = "Fashion-MNIST" if name == "fashion_mnist" else f"data.root={str(root)!r}"
        fix = "" if name == "fashion_mnist" else "fix the class folders or "
        raise DataError(f"{what} has {found[0]} class{'es' if found[0] != 1 else ''} but "
                        f"model.num_classes={num_classes}; they must "
                        f"be equal ({fix}set model.num_classes={found[0]}).")


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
    import pyarrow.parquet as pq

    shards = ParquetImageDataset(split_dir)
    counts = np.bincount(np.asarray(shards.targets, dtype=np.int64), minlength=len(shards.classes))
    empty = [c for c, n in zip(shards.classes, counts) if n == 0]
    if empty:
        raise DataError(f"class {empty[0]!r} has no images in the shards of {split_dir}"
                        + (f" (nor do {len(empty) - 1} other classes)" if len(empty) > 1 else "")
                        + "; re-write the shards from an ImageFolder tree without empty class folders.")
    groups = [(f, g) for f in shards.files for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
    per_group = max(1, len(shards) // max(1, len(groups)))
    for f, g in _evenly(groups, max(1, SCAN_LIMIT // per_group)):
        column = pq.ParquetFile(f, memory_map=True).read_row_group(g, columns=["image"]).column("image")
        items = [(f"row {i} of row group {g} of {f}", column[i].as_py()) for i in range(len(column))]
        bad = _first_bad(items)
        if bad:
            raise DataError(f"cannot decode the image at {bad[0]} ({bad[1]}); re-write the shards.")
    return len(shards.classes)


def find_data_error(err: BaseException | None) -> DataError | None:
    """The DataError behind ``err``, also when Ray wrapped it (a task error's ``cause``, a Ray
    Train ``WorkerGroupError``'s ``worker_failures``, chained exceptions); None if there is none."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            inner = getattr(e, "cause", None)  # a RayTaskError(DataError): its cause reads cleanly
            return inner if isinstance(inner, DataError) else e
        failures = getattr(e, "worker_failures", None)
        todo += list(failures.values()) if isinstance(failures, dict) else []
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------


def build_datasets(data_cfg: Any, seed: int = 0) -> DataSplits:
    """Build train / val (held out of train, picks checkpoints) / test (reported) for
    ``data_cfg.dataset``; raises DataError when the data is missing or malformed."""
    name = _cfg(data_cfg, "dataset")
    builders = {"fashion_mnist": _build_fashion, "imagefolder": _build_imagefolder,
                "parquet": _build_parquet, "synthetic": _build_synthetic}
    if name not in builders:
        raise DataError(f"data.dataset={name!r} is unknown; choose one of {', '.join(DATASETS)}.")
    return builders[name](data_cfg, int(seed))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader whose shuffling and worker augmentation RNG are seeded by ``seed``."""
    if int(batch_size) <= 0:
        raise DataError(f"batch_size={batch_size} must be positive.")
    if drop_last and len(dataset) < batch_size:
        raise DataError(f"the dataset has {len(dataset)} examples, fewer than batch_size="
                        f"{batch_size} with drop_last=True, so it would yield no batch; "
                        f"lower the batch size or use more data.")
    workers = int(workers)
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=bool(shuffle),
                      num_workers=workers, generator=torch.Generator().manual_seed(int(seed)),
                      drop_last=bool(drop_last), pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def example_batch(splits: DataSplits, batch_size: int = 2) -> torch.Tensor:
    """The first ``batch_size`` validation inputs (no augmentation), for tracing and profiling."""
    ds = splits.val if len(splits.val) else splits.test
    n = min(int(batch_size), len(ds))
    if n <= 0:
        raise DataError("cannot build an example batch: the validation and test splits are empty.")
    return torch.stack([ds[i][0] for i in range(n)])
