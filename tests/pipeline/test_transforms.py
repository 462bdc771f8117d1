"""Transforms that fit the data: small images get pad-and-crop, not ImageNet's crops."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import pipeline.data as D
from pipeline.config.schema import DataConfig
from pipeline.data.transforms import IMAGENET_MEAN, SMALL_IMAGE_MAX

N_CLASSES, PER_CLASS, SIZE = 10, 40, 32


def _stripes(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Stripes whose frequency and orientation name the class: zooming in (ImageNet's crops) hides it."""
    freq, vertical = 1.5 + 1.2 * (label % 5), label >= 5
    yy, xx = np.mgrid[0:size, 0:size] / size
    wave = np.sin(2 * np.pi * freq * (xx if vertical else yy) + rng.uniform(0, 2 * np.pi))
    img = 127 + 90 * wave[..., None] * rng.uniform(0.6, 1.0, 3) + rng.normal(0, 20, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_small_tree(root: pathlib.Path, size: int = SIZE, per_class: int = PER_CLASS) -> pathlib.Path:
    """A 10-class ImageFolder of ``size`` x ``size`` RGB PNGs (train/ and val/)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 3)):
        for c in range(N_CLASSES):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_stripes(rng, c, size)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    return make_small_tree(tmp_path_factory.mktemp("small"))


def small_cfg(root: pathlib.Path, **kw) -> DataConfig:
    base = dict(dataset="imagefolder", root=str(root), train_subset=None, val_subset=None, test_subset=None,
                val_fraction=0.2, image_size=SIZE, batch_size=32)
    return DataConfig(**{**base, **kw})


def _accuracy(model: torch.nn.Module, dataset) -> float:
    with torch.no_grad():
        return float(torch.cat([(model(x).argmax(1) == y).float()
                                for x, y in D.make_loader(dataset, 256, shuffle=False)]).mean())


def _accuracy_gap(splits: D.DataSplits, epochs: int = 5) -> tuple[float, float]:
    """(accuracy on the augmented training images, validation accuracy) of a small CNN trained briefly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, N_CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for epoch in range(epochs):
        for x, y in D.make_loader(splits.train, 32, shuffle=True, seed=epoch):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return _accuracy(model, splits.train), _accuracy(model, splits.val)


def test_auto_picks_small_image_policy_and_train_accuracy_keeps_up(small_tree):
    splits = D.build_datasets(small_cfg(small_tree), seed=0)
    policy = splits.policy
    assert (policy.augment, policy.normalize, policy.hflip) == ("small", "dataset", False)  # hflip auto: not known
    x = torch.stack([splits.train[i][0] for i in range(64)])
    assert x.shape == (64, 3, SIZE, SIZE)
    train_acc, val_acc = _accuracy_gap(splits)
    # the symptom was 74% train against 94% validation; pad-and-crop keeps them within a few points
    assert val_acc > 0.6, (train_acc, val_acc)
    assert train_acc > val_acc - 0.10, (train_acc, val_acc)
    imagenet = D.build_datasets(small_cfg(small_tree, augment="imagenet"), seed=0)
    assert imagenet.policy.augment == "imagenet" and imagenet.policy.mean == IMAGENET_MEAN
    crop_train, crop_val = _accuracy_gap(imagenet)
    assert crop_train < train_acc - 0.10, (crop_train, train_acc)  # the ImageNet crops destroy these images


def test_dataset_statistics_come_from_the_training_split(small_tree):
    splits = D.build_datasets(small_cfg(small_tree, augment="none"), seed=0)
    raw = D.build_datasets(small_cfg(small_tree, augment="none", normalize="none"), seed=0)
    assert raw.policy.mean == (0.0, 0.0, 0.0) and raw.policy.std == (1.0, 1.0, 1.0)
    pixels = torch.stack([raw.train[i][0] for i in range(len(raw.train))])  # all of train, in [0, 1]
    expect_mean = pixels.mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(splits.policy.mean), expect_mean, atol=0.01)
    normalized = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert torch.allclose(normalized.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.03)
    assert torch.allclose(normalized.std(dim=(0, 2, 3)), torch.ones(3), atol=0.03)
    assert torch.equal(splits.train[3][0], splits.train[3][0])  # augment=none: train is the eval view


def test_hflip_off_never_mirrors_and_large_images_get_imagenet_recipe(small_tree, tmp_path):
    from PIL import Image

    from pipeline.data.transforms import geometry

    img = Image.fromarray(np.tile(np.arange(SIZE, dtype=np.uint8)[None, :, None] * 8, (SIZE, 1, 3)))
    no_flip = geometry("small", SIZE, hflip=False, train=True)
    torch.manual_seed(0)
    for _ in range(20):  # a left-to-right ramp stays increasing under pad-and-crop without flips
        row = no_flip(img)[0, SIZE // 2, 6:-6].int()
        assert bool((row.diff() >= 0).all())
    large = make_small_tree(tmp_path / "large", size=SMALL_IMAGE_MAX + 36, per_class=3)
    splits = D.build_datasets(small_cfg(large, image_size=48, val_fraction=0.34), seed=0)
    assert (splits.policy.augment, splits.policy.normalize) == ("imagenet", "imagenet")
    assert splits.train[0][0].shape == (3, 48, 48)


def _ramp_tree(root: pathlib.Path) -> pathlib.Path:
    """Two classes of left-to-right ramps (a mirror turns them into right-to-left ones)."""
    from PIL import Image

    ramp = np.tile(np.arange(SIZE, dtype=np.uint8)[None, :, None] * 8, (SIZE, 1, 3))
    for split, n in (("train", 6), ("val", 3)):
        for c in range(2):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(ramp).save(root / split / f"class{c}" / f"{i}.png")
    return root


def _mirrored_draws(splits: D.DataSplits, draws: int = 24) -> int:
    """How many of ``draws`` augmented training views of image 0 run right-to-left (were mirrored)."""
    torch.manual_seed(0)
    rows = [splits.train[0][0][0, SIZE // 2, 6:-6] for _ in range(draws)]
    return sum(int(bool((row.diff() < 0).sum() > (row.diff() > 0).sum())) for row in rows)


def test_hflip_auto_mirrors_only_datasets_known_to_be_flip_invariant(tmp_path):
    from pipeline.config import load_config
    from pipeline.data.transforms import augmentation_note, resolve_hflip
    from pipeline.stages.fingerprints import stage_fingerprints

    root = _ramp_tree(tmp_path / "ramps")
    cfg = small_cfg(root, val_fraction=0.34, normalize="none")
    assert cfg.hflip == "auto" and resolve_hflip(cfg)[0] is False
    auto = D.build_datasets(cfg, seed=0)
    assert auto.policy.hflip is False and _mirrored_draws(auto) == 0
    asked = D.build_datasets(small_cfg(root, val_fraction=0.34, normalize="none", hflip=True), seed=0)
    assert asked.policy.hflip is True and 0 < _mirrored_draws(asked) < 24
    note = augmentation_note(cfg, auto.policy)
    assert note.startswith("augmentation: small-image recipe") and "flips off" in note and "data.hflip=true" in note
    # Fashion-MNIST is flip-invariant: auto mirrors, and is the same run (same fingerprints) as the older hflip: true
    fashion = load_config(None)
    assert fashion.data.hflip == "auto" and resolve_hflip(fashion.data) == (
        True, "fashion_mnist is known to be flip-invariant (data.hflip=auto)")
    assert stage_fingerprints(fashion) == stage_fingerprints(load_config(None, ["data.hflip=true"]))
    assert stage_fingerprints(fashion) != stage_fingerprints(load_config(None, ["data.hflip=false"]))
    folder = ["data.dataset=imagefolder", f"data.root={root}"]
    assert stage_fingerprints(load_config(None, folder)) == stage_fingerprints(
        load_config(None, [*folder, "data.hflip=false"]))
    assert stage_fingerprints(load_config(None, folder))["baseline"] != stage_fingerprints(
        load_config(None, [*folder, "data.hflip=true"]))["baseline"]
