"""Tests for pipeline/data/loaders.py and workflows/make_shards.py on real Fashion-MNIST and real image files."""

from __future__ import annotations

import gzip
import pathlib
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pipeline.data as D
from pipeline.config.schema import DataConfig
from pipeline.data import fashion_mnist
from pipeline.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[2]
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
def needs_fashion(test):
    """Real Fashion-MNIST is required (CI installs it): fail loudly instead of skipping."""
    assert (FASHION / "train-images-idx3-ubyte.gz").exists(), "apt-get install -y dataset-fashion-mnist"
    return test


def cfg(**kw) -> DataConfig:
    base = dict(dataset="fashion_mnist", root=None, train_subset=None, val_fraction=0.1,
                val_subset=None, test_subset=None, image_size=32, synthetic_size=64)
    base.update(kw)
    return DataConfig(**base)


def unchecked(**kw) -> DataConfig:
    """A DataConfig past the config's own validation (which already refuses a missing data.root), so the
    data layer's errors are tested too (a caller may build the data without going through the config)."""
    return DataConfig.model_construct(**{**cfg().model_dump(), **kw})


# ------------------------------------------------------------------ Fashion-MNIST


@pytest.fixture(scope="module")
def fashion():
    return D.build_datasets(cfg(), seed=0)


@needs_fashion
def test_fashion_sizes_shapes_and_labels(fashion):
    s = fashion
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, 32)
    assert len(s.classes) == 10
    for ds in (s.train, s.val, s.test):
        x, y = ds[0]
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
        assert isinstance(y, int)
        t = ds.targets
        assert int(t.min()) == 0 and int(t.max()) == 9
    # stratified hold-out: exactly 600 validation images per class
    assert torch.bincount(s.val.targets, minlength=10).tolist() == [600] * 10


@needs_fashion
def test_fashion_train_val_disjoint(fashion):
    tr, va = set(fashion.train.indices.tolist()), set(fashion.val.indices.tolist())
    assert not tr & va
    assert tr | va == set(range(60000))
    assert fashion.train.source == fashion.val.source == "train"
    assert fashion.test.source == "test"


@needs_fashion
def test_fashion_normalization_and_padding():
    s = D.build_datasets(cfg(image_size=28, val_subset=2000), seed=0)
    x = torch.stack([s.val[i][0] for i in range(len(s.val))])
    assert x.shape == (2000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1.0) < 0.05
    s32 = D.build_datasets(cfg(image_size=32, val_subset=2000), seed=0)
    x28, x32 = s.val[0][0], s32.val[0][0]
    assert torch.equal(x32[:, 2:30, 2:30], x28)  # 32 = 28 padded by 2, background value
    bg = (0 - D.FASHION_MEAN) / D.FASHION_STD
    assert torch.allclose(x32[:, :2], torch.full_like(x32[:, :2], bg))
    s20 = D.build_datasets(cfg(image_size=20, val_subset=10, train_subset=10), seed=0)
    assert s20.image_size == 20
    assert s20.val[0][0].shape == (1, 20, 20) and s20.train[0][0].shape == (1, 20, 20)


@needs_fashion
def test_fashion_augmentation_only_on_train(fashion):
    torch.manual_seed(0)
    a = [fashion.train[0][0] for _ in range(8)]
    assert any(not torch.equal(a[0], b) for b in a[1:])
    assert torch.equal(fashion.val[0][0], fashion.val[0][0])
    assert torch.equal(fashion.test[3][0], fashion.test[3][0])


@needs_fashion
def test_fashion_subsets_deterministic_and_balanced():
    c = cfg(train_subset=1000, val_subset=200, test_subset=300)
    a, b, other = D.build_datasets(c, seed=1), D.build_datasets(c, seed=1), D.build_datasets(c, seed=2)
    for name in ("train", "val", "test"):
        assert np.array_equal(getattr(a, name).indices, getattr(b, name).indices)
        assert not np.array_equal(getattr(a, name).indices, getattr(other, name).indices)
    assert (len(a.train), len(a.val), len(a.test)) == (1000, 200, 300)
    assert torch.bincount(a.train.targets, minlength=10).tolist() == [100] * 10
    assert torch.bincount(a.test.targets, minlength=10).tolist() == [30] * 10
    assert not set(a.train.indices.tolist()) & set(a.val.indices.tolist())
    with pytest.raises(DataError, match="train_subset"):
        D.build_datasets(cfg(train_subset=54001), seed=0)


@needs_fashion
def test_fashion_full_epoch_iterates_every_sample(fashion):
    start, n = time.perf_counter(), 0
    for x, y in D.make_loader(fashion.train, 512, shuffle=True, seed=0):
        n += len(y)
    assert n == 54000
    print(f"one Fashion-MNIST epoch: {time.perf_counter() - start:.1f}s")


def test_find_fashion_mnist_layouts_and_error(tmp_path, monkeypatch):
    if FASHION.exists():
        raw = tmp_path / "tv" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in FASHION.glob("*-ubyte.gz"):
            (raw / f.name).symlink_to(f)
        assert D.find_fashion_mnist(str(tmp_path / "tv")) == raw
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError) as e:
        D.find_fashion_mnist(str(tmp_path / "empty"), download=False)
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "data.root" in msg and "download" in msg


# ------------------------------------------------------------------ read_idx


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def test_read_idx_roundtrip_and_corruption(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good-idx3-ubyte.gz"
    good.write_bytes(gzip.compress(_idx_bytes(arr)))
    assert np.array_equal(D.read_idx(good), arr)
    plain = tmp_path / "plain-idx3-ubyte"
    plain.write_bytes(_idx_bytes(arr))
    assert np.array_equal(D.read_idx(plain), arr)

    truncated = tmp_path / "trunc-idx3-ubyte"
    truncated.write_bytes(_idx_bytes(arr)[:-5])
    with pytest.raises(DataError, match="truncated"):
        D.read_idx(truncated)
    bad_magic = tmp_path / "magic-idx3-ubyte"
    bad_magic.write_bytes(b"\x12\x34" + _idx_bytes(arr)[2:])
    with pytest.raises(DataError, match="magic"):
        D.read_idx(bad_magic)
    bad_gz = tmp_path / "broken-idx3-ubyte.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot be read"):
        D.read_idx(bad_gz)
    with pytest.raises(DataError, match="does not exist"):
        D.read_idx(tmp_path / "missing.gz")


# ------------------------------------------------------------------ ImageFolder / Parquet

CLASSES = ("cat", "dog", "emu")


def _make_tree(root: pathlib.Path, per_class: int = 8) -> pathlib.Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
                if i % 4 == 3:  # a grayscale PNG: loaders must convert to RGB
                    img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
                else:
                    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
                img.save(d / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def tree(tmp_path):
    return _make_tree(tmp_path / "imgs")


def test_missing_roots_raise_helpful_errors(tmp_path):
    for name in ("imagefolder", "parquet"):
        with pytest.raises(DataError, match="needs data.root"):
            D.build_datasets(unchecked(dataset=name, root=None))
        with pytest.raises(DataError, match="does not exist") as e:
            D.build_datasets(cfg(dataset=name, root=str(tmp_path / "nope")))
        assert "train" in str(e.value) and "val" in str(e.value)
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no val/ directory"):
        D.build_datasets(cfg(dataset="imagefolder", root=str(tmp_path / "half")))
    with pytest.raises(DataError, match="unknown"):
        D.build_datasets(unchecked(dataset="mnist"))


def test_imagefolder_splits(tree):
    s = D.build_datasets(cfg(dataset="imagefolder", root=str(tree), image_size=32,
                             val_fraction=0.25), seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (18, 6, 24)
    assert (s.num_classes, s.in_channels, s.image_size, s.classes) == (3, 3, 32, CLASSES)
    assert not set(s.train.indices.tolist()) & set(s.val.indices.tolist())
    for ds in (s.train, s.val, s.test):
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and type(x) is torch.Tensor and 0 <= y < 3
    assert torch.bincount(s.val.targets, minlength=3).tolist() == [2, 2, 2]
    assert D.example_batch(s, 4).shape == (4, 3, 32, 32)


def test_parquet_roundtrip_matches_imagefolder(tree, tmp_path):
    import pyarrow.parquet as pq
    from torchvision.datasets import ImageFolder

    out = tmp_path / "shards"
    written = D.write_parquet_shards(tree, out, rows_per_shard=5)
    assert len(written) == 10  # 24 images per split -> 5 shards each
    assert all(pathlib.Path(p).exists() for p in written)
    assert not list(out.rglob(".*tmp*"))
    meta = pq.ParquetFile(written[0]).schema_arrow.metadata
    assert meta[b"penni.classes"] == b'["cat", "dog", "emu"]'

    _, eval_tf = D.imagenet_transforms(32)
    for split in ("train", "val"):
        folder = ImageFolder(str(tree / split), transform=eval_tf)
        shards = D.ParquetImageDataset(out / split, transform=eval_tf)
        assert len(shards) == len(folder) == 24 and shards.classes == list(CLASSES)
        assert shards.targets.tolist() == folder.targets
        for i in (0, 7, 13, 23, 2):  # jumps between shards and back
            xs, ys = shards[i]
            xf, yf = folder[i]
            assert ys == yf and torch.equal(xs, xf)
    # pickles without open handles and works in forked DataLoader workers
    clone = pickle.loads(pickle.dumps(shards))
    assert torch.equal(clone[5][0], shards[5][0])
    labels = torch.cat([y for _, y in D.make_loader(shards, 4, shuffle=False, workers=2)])
    assert labels.tolist() == folder.targets

    p = D.build_datasets(cfg(dataset="parquet", root=str(out), val_fraction=0.25), seed=3)
    f = D.build_datasets(cfg(dataset="imagefolder", root=str(tree), val_fraction=0.25), seed=3)
    assert (p.num_classes, p.in_channels, p.classes) == (f.num_classes, f.in_channels, f.classes)
    for name in ("train", "val", "test"):
        assert np.array_equal(getattr(p, name).indices, getattr(f, name).indices)
    assert torch.equal(p.val[1][0], f.val[1][0]) and p.val[1][1] == f.val[1][1]
    assert torch.equal(p.test[4][0], f.test[4][0])

    with pytest.raises(DataError, match="already holds"):
        D.write_parquet_shards(tree, out, rows_per_shard=5)
    again = D.write_parquet_shards(tree, out, rows_per_shard=100, overwrite=True)
    assert len(again) == 2 and sorted(str(x) for x in out.rglob("*.parquet")) == sorted(again)


def test_parquet_rejects_foreign_files(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match="cannot read Parquet shard"):
        D.ParquetImageDataset(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.parquet shards"):
        D.ParquetImageDataset(tmp_path / "empty")


def test_make_shards_cli(tree, tmp_path):
    script = [sys.executable, str(REPO / "workflows" / "make_shards.py")]
    out = tmp_path / "cli"
    r = subprocess.run(script + [str(tree), str(out), "--rows-per-shard", "10"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    printed = r.stdout.split()
    assert len(printed) == 6 and all(pathlib.Path(p).is_file() for p in printed)
    assert len(D.ParquetImageDataset(out / "train")) == 24

    r = subprocess.run(script + [str(tree), str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "--overwrite" in r.stderr
    r = subprocess.run(script + [str(tree), str(out), "--overwrite"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.split()) == 2, r.stderr

    r = subprocess.run(script + [str(tmp_path / "missing"), str(tmp_path / "o2")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_import_pulls_no_ray_mlflow_or_pyarrow():
    code = ("import sys, pipeline.data; "
            "bad = [m for m in ('ray', 'mlflow', 'pyarrow') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ synthetic / loaders


def test_synthetic_is_deterministic_and_explicit():
    c = cfg(dataset="synthetic", synthetic_size=40, image_size=16)
    a, b = (D.build_datasets(c, seed=5, in_channels=3, num_classes=7) for _ in range(2))
    assert (len(a.train), a.num_classes, a.in_channels, a.image_size) == (40, 7, 3, 16)
    assert torch.equal(a.train[3][0], b.train[3][0]) and a.train[3][1] == b.train[3][1]
    assert a.train[0][0].shape == (3, 16, 16)
    assert not torch.equal(a.train[0][0], a.val[0][0])


def test_make_loader_seeded_shuffle():
    s = D.build_datasets(cfg(dataset="synthetic", synthetic_size=50), seed=0)

    def order(seed):
        return torch.cat([y for _, y in D.make_loader(s.train, 8, True, seed=seed)])

    first = [x for x, _ in D.make_loader(s.train, 8, True, seed=1)][0]
    again = [x for x, _ in D.make_loader(s.train, 8, True, seed=1)][0]
    assert torch.equal(first, again) and torch.equal(order(1), order(1))
    batches = list(D.make_loader(s.train, 8, False, drop_last=True))
    assert len(batches) == 6 and all(len(y) == 8 for _, y in batches)
    with pytest.raises(DataError, match="no batch"):
        D.make_loader(s.val, 64, True, drop_last=True)
