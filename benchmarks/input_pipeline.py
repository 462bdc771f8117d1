"""Input-pipeline benchmark: images/s and bytes read per image for the row-sampler path and Ray Data.

On generated ImageNet-like JPEGs (about 500x375, smooth content plus noise, written as an ImageFolder and
as Parquet shards with row groups of about 1 MB, as ``make_shards.py`` writes them) one shuffled training
epoch is timed, decoding and augmenting with ImageNet's recipe (RandomResizedCrop to 224 + flip):

* ``row_sampler``  the torch path: ``ParquetImageDataset`` + a shuffled DataLoader with N worker processes;
                   each random row reads its whole row group (one cached group per process);
* ``ray_data``     ``pipeline.data.ray_data.train_dataset``: one read per row group in a random order, decode +
                   augment in ``map_batches`` on N CPUs (Ray Data's CPU limit), a local shuffle buffer;
* ``ray_data_device`` (only where CUDA is available): Ray Data ships the encoded bytes, the batch is decoded
                   with ``torchvision.io.decode_jpeg(device="cuda")`` and augmented on the GPU.

Bytes read are the compressed sizes of the ``image`` column chunks of every row group a path reads (what
pyarrow fetches from disk or object storage), per image and as a multiple of the data size. Numbers are
printed and written, never asserted::

    python benchmarks/input_pipeline.py                      # 2000 images, workers 1 and 2
    python benchmarks/input_pipeline.py --images 256 --workers 1 --out /tmp/ip
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from pipeline.data.shards import ParquetImageDataset, open_shard, write_parquet_shards
from pipeline.data.splits import DataSplits
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformPolicy, policy_transforms

POLICY = TransformPolicy("imagenet", True, IMAGENET_MEAN, IMAGENET_STD, 224, "imagenet")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="generated JPEGs (10 classes)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="CPU workers to try")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", default=None, help="directory for the generated data (default: a temporary one)")
    p.add_argument("--out", default="benchmarks/results/input_pipeline_cpu", help="results path without suffix")
    return p.parse_args(argv)


def generate(root: pathlib.Path, n: int) -> pathlib.Path:
    """``n`` ImageNet-like JPEGs (500x375, quality 90) in 10 class folders, then Parquet shards of them."""
    from PIL import Image

    if (root / "shards" / "train").is_dir():
        return root / "shards" / "train"
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "tree" / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(small, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    write_parquet_shards(root / "tree", root / "shards", rows_per_shard=500, split_name="train")
    return root / "shards" / "train"


def chunk_bytes(files: list[str]) -> dict[tuple[str, int], int]:
    """Compressed bytes of the ``image`` column chunk of every row group."""
    sizes = {}
    for f in files:
        md = open_shard(f).metadata
        col = md.schema.to_arrow_schema().get_field_index("image")
        for g in range(md.num_row_groups):
            sizes[(f, g)] = md.row_group(g).column(col).total_compressed_size
    return sizes


class CountingShards(ParquetImageDataset):
    """A ParquetImageDataset that adds the bytes of every row group it loads to a counter shared by workers."""

    counter = None
    sizes: dict = {}

    def _row_group(self, fi: int, gi: int):
        if self._pid == os.getpid() and self._cached_key == (fi, gi):
            return self._cached_images
        with self.counter.get_lock():
            self.counter.value += self.sizes[(self.files[fi], gi)]
        return super()._row_group(fi, gi)


def row_sampler(shard_dir: pathlib.Path, workers: int, batch_size: int, sizes: dict) -> tuple[int, float, int]:
    """(images, seconds, bytes read) of one shuffled epoch through the torch row-sampler path."""
    CountingShards.counter, CountingShards.sizes = multiprocessing.Value("q", 0), sizes
    train_tf, _ = policy_transforms(POLICY)
    ds = CountingShards(shard_dir, transform=train_tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n, time.perf_counter() - start, int(CountingShards.counter.value)


def _splits(shard_dir: pathlib.Path) -> DataSplits:
    from pipeline.data.image_datasets import TransformSubset

    base = ParquetImageDataset(shard_dir)
    train = TransformSubset(base, np.arange(len(base)), None)
    return DataSplits(train, train, train, len(base.classes), 3, 224, tuple(base.classes), policy=POLICY)


def ray_data(shard_dir: pathlib.Path, workers: int, batch_size: int, device: str = "cpu") -> tuple[int, float, int]:
    """(images, seconds, bytes read) of one epoch through ``pipeline.data.ray_data`` with ``workers`` CPUs."""
    import ray.data

    from pipeline.data import ray_data as R

    ray.data.DataContext.get_current().execution_options.resource_limits = ray.data.ExecutionResources(cpu=workers)
    on_device = device != "cpu"
    ds = R.train_dataset(_splits(shard_dir), seed=0, decode_on_device=on_device)
    start, n, read = time.perf_counter(), 0, 0
    for batch in ds.iterator().iter_batches(**{**R.iter_options(batch_size, 0, 0), "drop_last": False}):
        x, _ = R.batch_tensors(batch, POLICY, torch.device(device), on_device)
        n, read = n + len(x), read + int(np.sum(batch["read_bytes"]))
    if on_device:
        torch.cuda.synchronize()
    return n, time.perf_counter() - start, read


def machine() -> dict:
    """Where and when the numbers were measured."""
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "git_commit": commit,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def run(args: argparse.Namespace) -> dict:
    import ray

    root = pathlib.Path(args.data or tempfile.mkdtemp(prefix="penni-input-"))
    shard_dir = generate(root, args.images)
    sizes = chunk_bytes(ParquetImageDataset(shard_dir).files)
    data_bytes = sum(sizes.values())
    ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows = []
    paths = [("row_sampler", w, lambda w=w: row_sampler(shard_dir, w, args.batch_size, sizes)) for w in args.workers]
    paths += [("ray_data", w, lambda w=w: ray_data(shard_dir, w, args.batch_size)) for w in args.workers]
    if torch.cuda.is_available():
        paths.append(("ray_data_device", 1, lambda: ray_data(shard_dir, 1, args.batch_size, device="cuda")))
    for name, workers, measure in paths:
        measure()  # warm-up epoch: worker start-up is not the steady state of a many-epoch run
        n, seconds, read = measure()
        rows.append({"path": name, "workers": workers, "images": n, "seconds": round(seconds, 2),
                     "images_per_s": round(n / seconds, 1), "bytes_read_per_image": int(read / max(n, 1)),
                     "bytes_read_vs_data": round(read / data_bytes, 3)})
        print(rows[-1], flush=True)
    ray.shutdown()
    return {"machine": machine(), "images": args.images, "data_bytes": data_bytes,
            "mean_jpeg_bytes": int(data_bytes / args.images), "batch_size": args.batch_size, "results": rows}


def _load_caveat(m: dict) -> str:
    """A warning where the load average says the CPU was shared with other work during the run."""
    busy = m["load_average"][0] > 1.5 * m["cores"]
    return ": the CPU was shared with other work, so images/s are noisy" if busy else ""


def markdown(report: dict) -> str:
    """The results as a table, with the machine and the caveats."""
    m = report["machine"]
    lines = [f"# Input pipeline, {report['images']} generated 500x375 JPEGs (mean {report['mean_jpeg_bytes']} bytes)",
             "", f"{m['date']}, {m['cpu']} ({m['cores']} cores, load average {m['load_average'][0]:.1f} at the end"
             f"{_load_caveat(m)}), torch {m['torch']}, commit {m['git_commit']}.",
             "ImageNet training transforms (RandomResizedCrop 224 + flip), batch "
             f"{report['batch_size']}; each row is the second of two shuffled epochs (the first warms up worker "
             "processes and Ray Data's tasks).", "",
             "| path | CPU workers | images/s | bytes read / image | bytes read / data size |", "|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['path']} | {r['workers']} | {r['images_per_s']} | {r['bytes_read_per_image']} | "
                     f"{r['bytes_read_vs_data']}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
