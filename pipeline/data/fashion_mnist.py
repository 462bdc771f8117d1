"""Fashion-MNIST from its idx files: finding them (data.root, the Debian package, a torchvision
download), reading them with numpy, and the in-memory split datasets."""

from __future__ import annotations

import functools
import gzip
import os
import pathlib
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataError
from .splits import DataSplits, split_indices
from .transforms import resolve_hflip

if TYPE_CHECKING:
    from ..config.schema import DataConfig

__all__ = ["FASHION_MEAN", "FASHION_STD", "FASHION_CLASSES", "FashionMNISTSplit", "build_fashion",
           "find_fashion_mnist", "read_idx"]

FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
GRAY_IMAGENET_MEAN, GRAY_IMAGENET_STD = 0.449, 0.226  # ImageNet's statistics averaged over RGB
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
_FASHION_NAMES = ", ".join(f"{stem}[.gz]" for stem in _FASHION_FILES.values())
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_payload(raw: bytes, path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(dims, dtype, header length) of an idx file's bytes, validating magic, dims and size."""
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
    return dims, dtype, header


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (``.gz`` or plain) into a numpy array, validating magic, dims and size."""
    path = pathlib.Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"idx file {path} does not exist.") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"idx file {path} cannot be read ({e}); delete it and fetch it again.") from None
    dims, dtype, header = _idx_payload(raw, path)
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True) if dtype.itemsize > 1 else arr.copy()


def _fashion_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _has_fashion(directory: pathlib.Path) -> bool:
    return all(_fashion_file(directory, s) is not None for s in _FASHION_FILES.values())


def _download_fashion(dl_root: pathlib.Path) -> str:
    """Download Fashion-MNIST with torchvision; the reason it failed ('' when it worked)."""
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(dl_root), train=train, download=True)
        if _has_fashion(dl_root / "FashionMNIST" / "raw"):
            return ""
        return "download finished but the files are missing"
    except Exception as e:  # noqa: BLE001 - no network, mirror down, disk full, ...
        return f"{type(e).__name__}: {e}"


def find_fashion_mnist(root: str | os.PathLike | None, download: bool = True) -> pathlib.Path:
    """Directory holding the four Fashion-MNIST idx files. An explicit ``root`` must hold them
    (in itself or its torchvision ``FashionMNIST/raw``); without one: the Debian
    ``dataset-fashion-mnist`` package, then a torchvision download into ``~/.cache/penni``."""
    if root:
        return _fashion_in_root(pathlib.Path(root).expanduser())
    if _has_fashion(DEBIAN_FASHION_DIR):
        return DEBIAN_FASHION_DIR
    dl_root = pathlib.Path.home() / ".cache" / "penni"
    raw_dir = dl_root / "FashionMNIST" / "raw"
    if _has_fashion(raw_dir):
        return raw_dir
    reason = _download_fashion(dl_root) if download else "download disabled"
    if not reason:
        return raw_dir
    raise DataError(
        f"Fashion-MNIST idx files ({_FASHION_NAMES}) were not found. Looked in: {DEBIAN_FASHION_DIR}, "
        f"{raw_dir}; torchvision download into {dl_root} failed ({reason}). "
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
    crop with 2-pixel padding, horizontal flip when ``hflip``) is done with cheap tensor ops per item.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray,
                 image_size: int, augment: bool, source: str, hflip: bool = True,
                 mean: float = FASHION_MEAN, std: float = FASHION_STD):
        self.images, self.labels = images, labels
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_size, self.augment, self.source = int(image_size), bool(augment), source
        self.hflip, self.mean, self.std = bool(hflip), float(mean), float(std)
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

    def _augmented(self, img: torch.Tensor) -> torch.Tensor:
        """A random crop of the 2-pixel padded image, mirrored half the time when ``hflip``."""
        dy, dx = torch.randint(0, 5, (2,)).tolist()
        s = self.image_size
        img = img[:, dy:dy + s, dx:dx + s]
        if self.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img

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
            img = self._augmented(img)
        x = img.float().div_(255.0).sub_(self.mean).div_(self.std)
        return x, int(self.labels[j])


def _fashion_normalization(normalize: str) -> tuple[float, float]:
    """(mean, std) for ``data.normalize``: the dataset's own statistics unless asked otherwise."""
    return {"imagenet": (GRAY_IMAGENET_MEAN, GRAY_IMAGENET_STD), "none": (0.0, 1.0)}.get(
        normalize, (FASHION_MEAN, FASHION_STD))


def build_fashion(data_cfg: "DataConfig", seed: int) -> DataSplits:
    """Fashion-MNIST splits: pad-and-crop (+ flip) augmentation on train unless data.augment is none."""
    directory = find_fashion_mnist(data_cfg.root)
    t = _load_fashion(str(directory.resolve()))
    size = int(data_cfg.image_size)
    tr, va, te = split_indices(data_cfg, seed, t["train_labels"].numpy(), t["test_labels"].numpy())
    augment = data_cfg.augment != "none"
    hflip = resolve_hflip(data_cfg)[0]
    mean, std = _fashion_normalization(data_cfg.normalize)

    def split(images: str, indices: np.ndarray, train: bool, source: str) -> FashionMNISTSplit:
        return FashionMNISTSplit(t[f"{images}_images"], t[f"{images}_labels"], indices, size,
                                 augment and train, source, hflip, mean, std)

    return DataSplits(train=split("train", tr, True, "train"), val=split("train", va, False, "train"),
                      test=split("test", te, False, "test"),
                      num_classes=10, in_channels=1, image_size=size, classes=FASHION_CLASSES)
