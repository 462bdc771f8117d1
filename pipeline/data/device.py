"""``data.loader: device``: the whole training split held on the training device, augmented there.

On a GPU the per-image CPU work of a DataLoader (crop, flip, normalize, collate, copy) is what
limits a small network at 32x32: one H200 trains VGG16 at tens of thousands of images/s, far more
than 2 loader workers deliver. Here the split's uint8 images are gathered onto the device once
(about 60 MB for Fashion-MNIST at 32x32), and each epoch is a seeded permutation plus the same
augmentation as ``FashionMNISTSplit`` (pad 2 + random 32x32 crop, horizontal flip, normalize) done
as batched tensor ops on the device, following the split's own policy (its ``augment``, ``hflip``,
``mean`` and ``std``). Works on the CPU as well, so the path is testable anywhere.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..errors import DataError
from .fashion_mnist import FASHION_MEAN, FASHION_STD

CROP_PAD = 2  # the random-crop padding FashionMNISTSplit uses


def _source_images(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's raw uint8 images (N, 1, 28, 28) and int64 labels, in item order."""
    needed = ("images", "labels", "indices", "image_size")
    if not all(hasattr(dataset, name) for name in needed):
        raise DataError(f"data.loader=device holds in-memory image splits only (data.dataset=fashion_mnist); "
                        f"got a {type(dataset).__name__}: use data.loader=torch or auto for this dataset")
    index = torch.as_tensor(dataset.indices, dtype=torch.long)
    return dataset.images[index].unsqueeze(1), dataset.labels[index]


def _to_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """28x28 as is, 32x32 by 2-pixel zero padding (the CIFAR layout), anything else by resizing."""
    if size == 28:
        return images
    if size == 32:
        return F.pad(images, (2, 2, 2, 2))
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).round().clamp(0, 255).to(torch.uint8)


_ON_DEVICE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _images_on_device(dataset: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images at its ``image_size`` and its labels on ``device``, made once per split and device:
    every epoch's loader (and the precise-BN pass of a penalized epoch) reuses them."""
    try:
        cached = _ON_DEVICE.setdefault(dataset, {})
    except TypeError:  # not weak-referenceable: no cache
        cached = {}
    key = str(device)
    if key not in cached:
        images, labels = _source_images(dataset)  # refuses what it cannot hold, before image_size is read
        cached[key] = (_to_size(images, int(dataset.image_size)).to(device), labels.to(device))
    return cached[key]


class DeviceLoader:
    """Batches ``(x, y)`` already on ``device``: seeded shuffle, random crop + flip, normalized float."""

    def __init__(self, dataset: Any, batch_size: int, device: torch.device | str, seed: int = 0,
                 drop_last: bool = True) -> None:
        self.device = torch.device(device)
        self.images, self.labels = _images_on_device(dataset, self.device)  # uint8 (N, 1, S, S), int64
        size = self.images.shape[-1]
        self.batch_size, self.size = int(batch_size), size
        self.augment, self.hflip = bool(getattr(dataset, "augment", True)), bool(getattr(dataset, "hflip", True))
        self.mean = float(getattr(dataset, "mean", FASHION_MEAN))
        self.std = float(getattr(dataset, "std", FASHION_STD))
        self.drop_last = bool(drop_last)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        if self.batch_size <= 0:
            raise DataError(f"batch_size={batch_size} must be positive.")
        if drop_last and len(self.labels) < self.batch_size:
            raise DataError(f"the dataset has {len(self.labels)} examples, fewer than batch_size={batch_size} "
                            "with drop_last=True, so it would yield no batch; lower the batch size or use more data.")

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _augment(self, batch: torch.Tensor) -> torch.Tensor:
        """Random crop (pad 2, per-image offsets) and flip of a uint8 batch, by gathering pixels."""
        n, c, s, p = batch.shape[0], batch.shape[1], self.size, CROP_PAD
        padded = F.pad(batch, (p, p, p, p))
        offsets = torch.randint(0, 2 * p + 1, (n, 2), device=self.device, generator=self.generator)
        steps = torch.arange(s, device=self.device)
        rows = (offsets[:, :1] + steps).view(n, 1, s, 1).expand(n, c, s, s + 2 * p)
        cols = (offsets[:, 1:] + steps).view(n, 1, 1, s)
        if self.hflip:
            flip = torch.rand(n, device=self.device, generator=self.generator) < 0.5
            cols = torch.where(flip.view(n, 1, 1, 1), cols.flip(-1), cols)
        return padded.gather(2, rows).gather(3, cols.expand(n, c, s, s))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, device=self.device, generator=self.generator)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            batch = self.images[index]
            if self.augment:
                batch = self._augment(batch)
            x = batch.float().div_(255.0).sub_(self.mean).div_(self.std)
            yield x, self.labels[index]


def device_loader(dataset: Any, cfg: Any, device: torch.device, seed: int) -> DeviceLoader:
    """The training loader for ``data.loader=device`` (one process, ``data.batch_size``, last partial batch dropped)."""
    return DeviceLoader(dataset, cfg.data.batch_size, device, seed=seed, drop_last=True)


def uses_device_loader(cfg: Any) -> bool:
    """Whether the config asks for the on-device training loader."""
    return getattr(cfg.data, "loader", "auto") == "device"
