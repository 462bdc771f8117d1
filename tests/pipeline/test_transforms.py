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
    assert (policy.augment, policy.normalize, policy.hflip) == ("small", "dataset", True)
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
