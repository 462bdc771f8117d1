"""Transform policies that fit the data: which augmentation and which normalization an image dataset gets.

``data.augment``: ``small`` (pad-and-random-crop + flip, the CIFAR recipe) for images up to
``SMALL_IMAGE_MAX`` pixels on their longer side, ``imagenet`` (RandomResizedCrop with its default scale
0.08-1 + flip) for larger ones; ``auto`` picks by the median stored size of a sample of training images,
``none`` trains on the evaluation view. ``data.hflip`` (``auto``, true, false) decides mirroring: ``auto``
mirrors only datasets known to be flip-invariant (``FLIP_INVARIANT_DATASETS``: Fashion-MNIST), never a
user's own images, where a mirror can change the class (digits, text, left/right signs); ``resolve_hflip``
says what it became and why, ``augmentation_note`` is the console's one line about it. ``data.normalize``: ``imagenet`` statistics, ``dataset`` statistics (per-channel mean / std of a
fixed sample of the training split), or ``none``; ``auto`` means ``imagenet`` for the ImageNet recipe
(photographs, and what pretrained torchvision weights expect) and ``dataset`` otherwise.

A policy is split into a *geometry* (PIL image -> uint8 tensor: resize, crop, flip), which the Ray Data
path runs on CPU workers, and a *normalizer* (uint8 -> float), which it runs in the training worker.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from ..errors import DataError

if TYPE_CHECKING:
    from ..config.schema import DataConfig

__all__ = ["FLIP_INVARIANT_DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "SMALL_IMAGE_MAX", "TransformPolicy",
           "augmentation_note", "choose_policy", "geometry", "imagenet_transforms", "normalize_uint8",
           "policy_transforms", "resolve_hflip", "stored_image_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64  # longer side, in pixels, up to which ``auto`` picks the small-image recipe
SIZE_SAMPLE = 32  # training images whose headers decide the stored size
STATS_SAMPLE = 512  # training images the dataset statistics are computed from
#: ``data.dataset`` values whose images keep their class when mirrored left-right (``data.hflip: auto`` flips only these)
FLIP_INVARIANT_DATASETS = ("fashion_mnist",)


def resolve_hflip(data_cfg: "DataConfig") -> tuple[bool, str]:
    """``data.hflip`` resolved: (mirror training images?, why). ``auto`` mirrors only the datasets of
    ``FLIP_INVARIANT_DATASETS``; true / false (older configs) are taken as set."""
    value, name = data_cfg.hflip, data_cfg.dataset
    if value != "auto":
        return bool(value), f"set by data.hflip={str(bool(value)).lower()}"
    if name in FLIP_INVARIANT_DATASETS:
        return True, f"{name} is known to be flip-invariant (data.hflip=auto)"
    return False, (f"{name} images are not known to be flip-invariant, a mirror can change the class "
                   "(data.hflip=auto; set data.hflip=true to mirror)")


def augmentation_note(data_cfg: "DataConfig", policy: "TransformPolicy | None" = None) -> str:
    """The one console line naming the training augmentation and why it was chosen (``policy``: the
    resolved policy of an image dataset; Fashion-MNIST and synthetic data have none)."""
    if data_cfg.dataset == "synthetic":
        return "augmentation: none (synthetic data)"
    augment = policy.augment if policy is not None else ("none" if data_cfg.augment == "none" else "small")
    if augment == "none":
        return "augmentation: none (data.augment=none)"
    if data_cfg.dataset == "fashion_mnist":
        recipe = "pad-and-crop, 2 px"
    elif augment == "imagenet":
        recipe = "ImageNet recipe, RandomResizedCrop"
    else:
        recipe = f"small-image recipe, pad {max(1, int(data_cfg.image_size) // 8)} px + random crop"
    if data_cfg.augment == "auto" and policy is not None:
        recipe += f", data.augment=auto by stored image size ({SMALL_IMAGE_MAX} px or less: small)"
    flips, why = resolve_hflip(data_cfg)
    return f"augmentation: {recipe}; horizontal flips {'on' if flips else 'off'}: {why}"


@dataclass(frozen=True)
class TransformPolicy:
    """The resolved transforms of one image dataset (what ``auto`` became, and the statistics used)."""

    augment: str  # "imagenet" | "small" | "none"
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    normalize: str = "imagenet"  # where mean / std came from: "imagenet" | "dataset" | "none"


def _evenly_spaced(indices: np.ndarray, k: int) -> np.ndarray:
    """At most ``k`` of ``indices`` spread evenly (deterministic, so every worker picks the same)."""
    if len(indices) <= k:
        return np.asarray(indices)
    return np.asarray(indices)[np.linspace(0, len(indices) - 1, k).astype(np.int64)]


def _open_image(base: Any, i: int):
    """Item ``i`` of an ImageFolder or a ParquetImageDataset as a lazily decoded PIL image."""
    from PIL import Image

    if hasattr(base, "read_bytes"):
        return Image.open(io.BytesIO(base.read_bytes(int(i))))
    return Image.open(base.samples[int(i)][0])


def _decoded_rgb(base: Any, i: int):
    """Item ``i`` decoded to RGB; an undecodable image is a DataError naming it (not a traceback)."""
    try:
        with _open_image(base, i) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL: truncated, unknown format, broken header
        where = base.samples[int(i)][0] if hasattr(base, "samples") else f"row {int(i)} of the shards"
        raise DataError(f"cannot decode the image {where} ({type(err).__name__}: {err}); "
                        "remove or replace that file.") from None


def stored_image_size(base: Any, indices: np.ndarray) -> int:
    """Median longer side of a sample of the stored images (headers only)."""
    sides = []
    for i in _evenly_spaced(indices, SIZE_SAMPLE):
        try:
            with _open_image(base, i) as img:
                sides.append(max(img.size))
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            raise DataError(f"cannot read the header of training image {int(i)} ({type(e).__name__}: {e}); "
                            "remove or replace that file.") from None
    return int(np.median(sides)) if sides else 0


def geometry(augment: str, image_size: int, hflip: bool, train: bool, pil: bool = True) -> Callable:
    """PIL image (or, with ``pil=False``, a uint8 (C, H, W) tensor on any device) -> uint8 (C, S, S)
    tensor: the augmentation of ``augment`` on train, else the eval view."""
    from torchvision.transforms import v2

    s = int(image_size)
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    if augment == "imagenet":
        view = [v2.Resize(int(s * 256 / 224), antialias=True), v2.CenterCrop(s)]
        steps = [v2.RandomResizedCrop(s, antialias=True), *flip] if train else view
    else:  # small images (and "none"): resize to fit, then centre
        view = [v2.Resize(s, antialias=True), v2.CenterCrop(s)]
        pad = max(1, s // 8)  # 4 pixels at 32, as in the CIFAR recipe
        steps = [*view, v2.RandomCrop(s, padding=pad), *flip] if train and augment == "small" else view
    return v2.Compose([*steps, *([v2.PILToTensor()] if pil else []), v2.ToPureTensor()])


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> normalized float32, on whatever device ``x`` lives."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(m).div_(s)


class Normalized:
    """A geometry followed by normalization: PIL image -> float tensor (picklable, for loader workers)."""

    def __init__(self, geo: Callable, mean: Sequence[float], std: Sequence[float]):
        self.geo, self.mean, self.std = geo, tuple(mean), tuple(std)

    def __call__(self, img: Any) -> torch.Tensor:
        return normalize_uint8(self.geo(img), self.mean, self.std)


def policy_transforms(policy: TransformPolicy) -> tuple[Callable, Callable]:
    """(train, eval) transforms from PIL images to normalized float tensors."""
    return tuple(Normalized(geometry(policy.augment, policy.image_size, policy.hflip, train),
                            policy.mean, policy.std) for train in (True, False))


def imagenet_transforms(image_size: int) -> tuple[Callable, Callable]:
    """(train, eval) transforms of ImageNet's recipe: RandomResizedCrop + flip, ImageNet statistics."""
    return policy_transforms(TransformPolicy("imagenet", True, IMAGENET_MEAN, IMAGENET_STD, int(image_size)))


_STATISTICS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}  # per process, by data + sample


def _statistics(base: Any, indices: Sequence[int], image_size: int
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std of the eval views of ``indices`` of ``base``."""
    view = geometry("small", image_size, False, train=False)
    total = torch.zeros(3, dtype=torch.float64)
    square = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for i in indices:
        x = view(_decoded_rgb(base, i)).to(torch.float64).div_(255.0)
        total += x.sum(dim=(1, 2))
        square += (x * x).sum(dim=(1, 2))
        pixels += x.shape[1] * x.shape[2]
    mean = total / pixels
    std = (square / pixels - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(max(float(v), 1e-3), 4) for v in std)


def dataset_statistics(base: Any, train_indices: np.ndarray, image_size: int, key: str
                       ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of a fixed, evenly spread sample of the training split (``key`` names
    the data; the result is cached per process, so every stage and worker computes it once)."""
    sample = [int(i) for i in _evenly_spaced(train_indices, STATS_SAMPLE)]
    digest = hashlib.sha256(np.asarray(sample, np.int64).tobytes()).hexdigest()[:16]
    cache_key = f"{key}:{int(image_size)}:{digest}"
    if cache_key not in _STATISTICS:
        _STATISTICS[cache_key] = _statistics(base, sample, int(image_size))
    return _STATISTICS[cache_key]


def choose_policy(data_cfg: "DataConfig", base: Any, train_indices: np.ndarray, key: str) -> TransformPolicy:
    """Resolve ``data.augment`` / ``data.normalize`` (``auto``) against the stored training images."""
    augment = data_cfg.augment
    if augment == "auto":
        augment = "small" if stored_image_size(base, train_indices) <= SMALL_IMAGE_MAX else "imagenet"
    normalize = data_cfg.normalize
    if normalize == "auto":
        normalize = "imagenet" if augment == "imagenet" else "dataset"
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize == "dataset":
        mean, std = dataset_statistics(base, train_indices, data_cfg.image_size, key)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return TransformPolicy(augment, resolve_hflip(data_cfg)[0], tuple(mean), tuple(std),
                           int(data_cfg.image_size), normalize)
