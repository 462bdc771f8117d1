"""Streaming training input with Ray Data (``data.loader: ray_data``, the default for Parquet shards on Ray Train).

The training split is a set of rows of the Parquet shards (the validation split is a stratified hold-out of
the same files, chosen by row index), so the dataset is built from the shards' row groups: one Ray Data block
per row group, listing the training rows in it. Each epoch
  1. visits the row groups in a new random order (``randomize_block_order``, reseeded per execution): files are
     never re-read within an epoch, every byte of the shards is read once (the row-sampler path reads a whole
     row group for each random row);
  2. reads a row group and keeps its training rows (``map_batches`` on CPU tasks, local or ``pyarrow.fs`` URIs);
  3. decodes and augments on CPU workers (``map_batches``), which may sit on other nodes than the GPUs, and
     ships uint8 images; or, with ``decode_on_device``, ships the encoded bytes and decodes them in the training
     worker (``torchvision.io.decode_jpeg(..., device="cuda")`` in batches, augmentation on the device);
  4. reaches each training worker through Ray Train (``TorchTrainer(datasets=...)``, an equal split per worker,
     so every worker takes the same number of steps) and ``ray.train.get_dataset_shard``, where a local
     shuffle buffer mixes rows across row groups and the normalization runs on the device.
Evaluation does not use this path: validation and test stay on the exact torch shards (every image once).
Ray is imported inside the functions, as everywhere in ``pipeline/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from ..errors import DataError
from .shards import ParquetImageDataset, decode_image, open_shard
from .transforms import TransformPolicy, geometry, normalize_uint8

if TYPE_CHECKING:
    import ray.data

    from .splits import DataSplits

__all__ = ["SHUFFLE_BUFFER_ROWS", "batch_tensors", "iter_options", "decode_augment", "plan_input", "decode_on_device", "epoch_batches", "read_row_groups",
           "train_dataset"]

SHUFFLE_BUFFER_ROWS = 1024  # rows each training worker mixes locally (about 4 row groups of ImageNet JPEGs)
DECODE_BATCH_ROWS = 64  # images one decode task handles


def read_row_groups(batch: dict) -> dict:
    """Row-group descriptors -> the encoded training images and labels in them (one read per row group);
    ``read_bytes`` carries the compressed size of each image column chunk read (on its group's first row)."""
    images, labels, read = [], [], []
    for file, group, rows, row_labels in zip(batch["file"], batch["group"], batch["rows"], batch["labels"]):
        shard = open_shard(str(file))
        column = shard.read_row_group(int(group), columns=["image"]).column("image")
        images += column.take(np.asarray(rows, dtype=np.int64)).to_pylist()
        labels.append(np.asarray(row_labels, dtype=np.int64))
        chunk = shard.metadata.row_group(int(group)).column(shard.schema_arrow.get_field_index("image"))
        read.append(np.r_[chunk.total_compressed_size, np.zeros(len(rows) - 1, np.int64)])
    out = np.empty(len(images), dtype=object)
    out[:] = images
    empty = np.empty(0, np.int64)
    return {"image": out, "label": np.concatenate(labels) if labels else empty,
            "read_bytes": np.concatenate(read).astype(np.int64) if read else empty}


def decode_augment(batch: dict, policy: TransformPolicy) -> dict:
    """Encoded images -> augmented uint8 (B, 3, S, S) arrays on a CPU worker (the policy's training geometry)."""
    view = geometry(policy.augment, policy.image_size, policy.hflip, train=True)
    x = [view(decode_image(bytes(b), "a training row")).numpy() for b in batch["image"]]
    return {"image": np.stack(x), "label": np.asarray(batch["label"], dtype=np.int64),
            "read_bytes": np.asarray(batch["read_bytes"], dtype=np.int64)}


def _row_group_items(splits: "DataSplits") -> list[dict]:
    """One descriptor per row group holding training rows: file, row group, rows, labels."""
    base = getattr(splits.train, "base", None)
    if not isinstance(base, ParquetImageDataset) or splits.policy is None:
        raise DataError("data.loader='ray_data' reads Parquet shards; set data.dataset=parquet "
                        "(shards from `python workflows/make_shards.py`) or data.loader=torch.")
    return [{"file": f, "group": g, "rows": rows.tolist(), "labels": labels.tolist()}
            for f, g, rows, labels in base.row_groups(splits.train.indices)]


def train_dataset(splits: "DataSplits", seed: int, decode_on_device: bool = False,
                  decode_cpus: float = 1.0) -> "ray.data.Dataset":
    """The training split as a Ray Dataset of ``{"image", "label"}`` rows, shuffled by row group per epoch:
    uint8 (3, S, S) augmented images, or the encoded bytes when ``decode_on_device``."""
    import ray.data
    from ray.data import RandomSeedConfig

    items = _row_group_items(splits)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=int(seed), reseed_after_execution=True))
    ds = ds.map_batches(read_row_groups, batch_size=1, batch_format="numpy")
    if decode_on_device:
        return ds
    return ds.map_batches(decode_augment, fn_kwargs={"policy": splits.policy}, batch_size=DECODE_BATCH_ROWS,
                          batch_format="numpy", num_cpus=decode_cpus)


def decode_on_device(encoded: Any, policy: TransformPolicy, train: bool, device: torch.device) -> torch.Tensor:
    """Encoded images -> augmented uint8 (B, 3, S, S) on ``device``: JPEGs decoded there in one batched
    ``decode_jpeg`` call (nvJPEG on CUDA), other formats decoded on the CPU and moved."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.io import decode_image as tv_decode

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    jpeg = [i for i, b in enumerate(encoded) if bytes(b[:2]) == b"\xff\xd8"]
    images: list[Any] = [None] * len(data)
    if jpeg:
        decoded = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpeg, decoded):
            images[i] = img
    for i, img in enumerate(images):
        if img is None:
            images[i] = tv_decode(data[i], mode=ImageReadMode.RGB).to(device)
    view = geometry(policy.augment, policy.image_size, policy.hflip, train=train, pil=False)
    return torch.stack([view(img) for img in images])


def batch_tensors(batch: dict, policy: TransformPolicy, device: torch.device, decode_on_device_: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A numpy batch from the dataset -> (normalized float images on ``device``, labels)."""
    y = torch.from_numpy(np.array(batch["label"], dtype=np.int64))
    if decode_on_device_:
        x = decode_on_device(batch["image"], policy, True, device)
    else:
        x = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(device, non_blocking=True)
    return normalize_uint8(x, policy.mean, policy.std), y


def iter_options(batch_size: int, seed: int, epoch: int) -> dict:
    """The ``iter_batches`` arguments of one epoch: drop the incomplete last batch, seeded local shuffle."""
    return dict(batch_size=int(batch_size), batch_format="numpy", drop_last=True,
                local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS, local_shuffle_seed=int(seed) * 1000 + int(epoch),
                prefetch_batches=2)


def epoch_batches(shard: Any, batch_size: int, policy: TransformPolicy, device: torch.device, seed: int,
                  epoch: int, decode_on_device_: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of this worker's ``(normalized float images, labels)`` batches from its Ray Train dataset
    shard (``ray.train.get_dataset_shard("train")``); incomplete last batches are dropped, like the torch path."""
    for batch in shard.iter_batches(**iter_options(batch_size, seed, epoch)):
        yield batch_tensors(batch, policy, device, decode_on_device_)


def plan_input(config: dict, num_workers: int, cpus_per_worker: float) -> tuple[dict, dict]:
    """On the driver, before a TorchTrainer starts: ``(config with data.loader resolved, datasets=...)``.

    ``auto`` becomes ``ray_data`` for Parquet shards when the cluster has at least one CPU beyond the training
    workers' (Ray Data's decode tasks need one), else ``torch``; an explicit ``ray_data`` without a spare CPU is
    a DataError. The workers read the resolved value, so driver and workers agree."""
    import ray

    from ..config.loading import from_dict
    from .loaders import build_datasets, resolve_loader

    cfg = from_dict(config)
    loader = resolve_loader(cfg.data, in_process=False)
    spare = ray.cluster_resources().get("CPU", 0.0) - num_workers * cpus_per_worker
    if loader == "ray_data" and spare < 1.0:
        if cfg.data.loader == "ray_data":
            raise DataError(f"data.loader='ray_data' decodes on CPUs beyond the training workers', but the Ray "
                            f"cluster has {spare:g} spare; lower ray.num_workers or ray.cpus_per_worker, add CPUs, "
                            "or set data.loader=torch.")
        loader = "torch"
    resolved = {**config, "data": {**config["data"], "loader": loader}}
    if loader != "ray_data":
        if cfg.data.decode == "device":
            raise DataError(f"data.decode='device' needs the Ray Data loader, but it resolved to {loader!r} (the "
                            f"cluster has {spare:g} CPUs beyond the training workers'); add a CPU or set data.decode=cpu.")
        return resolved, {}
    splits = build_datasets(cfg.data, cfg.seed, in_channels=cfg.model.in_channels, num_classes=cfg.model.num_classes)
    return resolved, {"train": train_dataset(splits, cfg.seed, decode_on_device=cfg.data.decode == "device")}
