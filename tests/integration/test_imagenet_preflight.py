"""The shipped ``imagenet_resnet50`` config passes the runner's preflight once its paths exist (Parquet
shards of 1000 classes, a torchvision ResNet50 state dict, a storage directory) and otherwise fails with
one line per missing path, naming it. Nothing is trained."""
from __future__ import annotations

import io

import pytest
import torch
import torchvision
from PIL import Image

from pipeline.cli.launch import preflight
from pipeline.cli.runner import main, parse_args, resolve_config
from pipeline.data.shards import write_parquet_shards

CLASSES = 1000  # the config's model.num_classes: the shards must have as many


def _jpegs(count: int) -> list[bytes]:
    """A few distinct small JPEGs (shapes and colours vary), reused across classes."""
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.new("RGB", (40 + 4 * i, 30 + 3 * i), (37 * i % 256, 90, 200 - 20 * i)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """Parquet shards (one image per class and split, 1000 classes) and a saved ResNet50 state dict."""
    root = tmp_path_factory.mktemp("imagenet")
    jpegs = _jpegs(5)
    for split in ("train", "val"):
        for c in range(CLASSES):
            folder = root / "tree" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            (folder / f"{split}_{c}.JPEG").write_bytes(jpegs[c % len(jpegs)])
    write_parquet_shards(root / "tree", root / "shards", rows_per_shard=500)
    weights = root / "weights" / "resnet50-0676ba61.pth"
    weights.parent.mkdir()
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    return {"data.root": root / "shards", "model.weights": weights, "storage": root / "runs"}


def _argv(paths: dict, tmp_path) -> list[str]:
    """The config's paths replaced; data.val_subset=null because 1% of 1000 images is 10, not 10,000."""
    sets = [x for key, path in paths.items() for x in ("--set", f"{key}={path}")]
    return ["--config", "imagenet_resnet50", *sets, "--set", "data.val_subset=null",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]


def test_imagenet_config_passes_preflight_when_its_paths_exist(imagenet_like, tmp_path):
    args = parse_args(_argv(imagenet_like, tmp_path))
    cfg = resolve_config(args)
    assert (cfg.model.arch, cfg.model.num_classes, cfg.data.dataset) == ("torchvision.models:resnet50", CLASSES, "parquet")
    assert preflight(cfg, args.tracking_uri) == []
    state = torch.load(cfg.model.weights, weights_only=True)  # what the baseline stage loads: no pickle code
    assert state["fc.weight"].shape == (CLASSES, 2048)
    assert not (imagenet_like["storage"]).exists(), "preflight writes nothing"


def test_each_missing_path_is_one_line_naming_it(imagenet_like, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    missing = {"data.root": tmp_path / "no-shards", "model.weights": tmp_path / "no-weights.pth",
               "storage": blocker / "runs"}
    assert main(_argv(missing, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error:") and len(err) == 1 + len(missing), err
    for key, path in missing.items():
        (line,) = [line for line in err[1:] if str(path) in line]
        assert key in line or key == "storage", (key, line)
    assert not blocker.is_dir()

    for key in missing:  # one missing path at a time: exactly one line, naming it
        paths = {**imagenet_like, key: missing[key]}
        cfg = resolve_config(parse_args(_argv(paths, tmp_path)))
        problems = preflight(cfg, f"sqlite:///{tmp_path}/mlflow.db")
        assert len(problems) == 1 and str(missing[key]) in problems[0], (key, problems)
