"""Datasets for the pipeline: Fashion-MNIST (idx), ImageFolder, Parquet shards, synthetic (benchmarks).

The entry points the stages call: ``build_datasets`` (the three splits), ``make_loader`` (a seeded torch
DataLoader), ``example_batch`` and ``resolve_loader`` (which input path a training stage uses: the torch
DataLoader here, or Ray Data in ``ray_data.py``). Each concept has its module: ``splits`` (hold-out and
subsets), ``fashion_mnist``, ``image_datasets`` (ImageFolder / Parquet), ``shards`` (Parquet files),
``transforms`` (augmentation and normalization policies), ``data_checks`` (preflight). Pure
PyTorch/torchvision/pyarrow (pyarrow imported lazily); never imports ray or mlflow, so the stages can
build their data on any machine. Every user-facing problem raises :class:`DataError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .fashion_mnist import (
    build_fashion,
)
from .image_datasets import build_imagefolder, build_parquet
from .splits import DataSplits

if TYPE_CHECKING:
    from ..config.schema import DataConfig

__all__ = ["DATASETS", "SyntheticDataset", "build_datasets", "example_batch", "make_loader", "resolve_loader"]

DATASETS = ("fashion_mnist", "imagefolder", "parquet", "synthetic")


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


def _build_synthetic(data_cfg: "DataConfig", seed: int, in_channels: int, num_classes: int) -> DataSplits:
    """Random tensors shaped for the model (its channels and classes), sized by data.synthetic_size."""
    n, size = data_cfg.synthetic_size, data_cfg.image_size
    held_out = max(1, int(n * data_cfg.val_fraction))
    n_train = data_cfg.train_subset or n
    n_val, n_test = data_cfg.val_subset or held_out, data_cfg.test_subset or held_out
    c, k = int(in_channels), int(num_classes)
    return DataSplits(train=SyntheticDataset(n_train, c, size, k, seed * 3 + 0),
                      val=SyntheticDataset(n_val, c, size, k, seed * 3 + 1),
                      test=SyntheticDataset(n_test, c, size, k, seed * 3 + 2),
                      num_classes=k, in_channels=c, image_size=size, classes=tuple(str(i) for i in range(k)))


def build_datasets(data_cfg: "DataConfig", seed: int = 0, *, in_channels: int = 3,
                   num_classes: int = 10) -> DataSplits:
    """Build train / val (held out of train, picks checkpoints) / test (reported) for
    ``data_cfg.dataset``; ``in_channels`` / ``num_classes`` (the model's) shape synthetic data, real
    datasets bring their own. Raises DataError when the data is missing or malformed."""
    name = data_cfg.dataset
    if name == "synthetic":
        return _build_synthetic(data_cfg, int(seed), in_channels, num_classes)
    builders = {"fashion_mnist": build_fashion, "imagefolder": build_imagefolder, "parquet": build_parquet}
    if name not in builders:
        raise DataError(f"data.dataset={name!r} is unknown; choose one of {', '.join(DATASETS)}.")
    return builders[name](data_cfg, int(seed))


def resolve_loader(data_cfg: "DataConfig", in_process: bool) -> str:
    """Which input path training uses: ``data.loader``, with ``auto`` = ``ray_data`` for Parquet shards
    trained on Ray Train (streaming, decoding on CPU workers that may sit on other nodes), ``torch``
    otherwise (in-process runs, Fashion-MNIST in memory, ImageFolder trees on a shared disk)."""
    loader = data_cfg.loader
    if data_cfg.decode == "device" and in_process:
        raise DataError("data.decode='device' ships encoded images through Ray Data to Ray Train workers, but "
                        "ray.in_process is true; set data.decode=cpu for in-process runs.")
    if loader == "auto":
        return "ray_data" if data_cfg.dataset == "parquet" and not in_process else "torch"
    if loader == "ray_data" and data_cfg.dataset != "parquet":
        raise DataError(f"data.loader='ray_data' reads Parquet shards, but data.dataset={data_cfg.dataset!r}; "
                        "write shards with `python workflows/make_shards.py` or set data.loader=torch.")
    if loader == "ray_data" and in_process:
        raise DataError("data.loader='ray_data' needs Ray Train workers, but ray.in_process is true; "
                        "set data.loader=torch (or auto) for in-process runs.")
    return loader


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
