"""workflows/reproduce.py at tiny scale: the comparison table, Torch-Pruning's MAC match, the generated doc;
pipeline/data/device.py: the on-device training loader (crop/flip/normalize done as tensor ops)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "workflows"))

import reproduce  # noqa: E402
from reproduce_results import ROWS  # noqa: E402

from pipeline.data.device import CROP_PAD, DeviceLoader  # noqa: E402
from pipeline.errors import DataError  # noqa: E402

COLUMNS = ("test_top1", "params", "nonzero_params", "sparse_macs", "dense_macs", "latency_ms_bs1", "latency_ms_bs64")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run (VGG16 at 1/8 width, 128 images, 1 epoch per stage, on-device loader on the CPU) + its doc."""
    root = tmp_path_factory.mktemp("reproduce")
    results_dir = root / "results"
    out = results_dir / "reproduce_tiny"
    assert reproduce.main(["--scale", "tiny", "--device", "cpu", "--work", str(root / "work"), "--out", str(out)]) == 0
    docs = root / "docs" / "results.md"
    assert reproduce.main(["--write-docs", "--out", str(results_dir), "--docs", str(docs)]) == 0
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), docs.read_text()


def _doc_table(doc: str) -> dict[str, list[str]]:
    """The comparison table of the doc: label -> its cells."""
    labels = dict((label, key) for key, label in ROWS)
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in labels:
            rows[labels[cells[0]]] = cells[1:]
    return rows


@pytest.mark.timeout(1800)  # the module's one tiny run (about 1-2 min on 2 idle cores) is timed here
def test_table_has_every_row_and_column(tiny_run):
    results, markdown, _ = tiny_run
    run = results["models"]["vgg16"]
    assert run["config"]["data"]["loader"] == "device"   # the GPU path's loader, exercised on the CPU
    table = run["table"]
    assert set(table) == {key for key, _ in ROWS}
    for key, row in table.items():
        missing = [c for c in COLUMNS if not isinstance(row.get(c), (int, float))]
        assert not missing, f"{key} lacks {missing}"
    md_rows = _doc_table(markdown)
    assert set(md_rows) == set(table) and all(len(cells) == 10 for cells in md_rows.values())


def test_torch_pruning_matches_our_dense_macs(tiny_run):
    results, _, _ = tiny_run
    run = results["models"]["vgg16"]
    ours, theirs = run["table"]["penni"]["dense_macs"], run["table"]["torch_pruning"]["dense_macs"]
    assert abs(theirs / ours - 1) <= 0.02
    assert theirs < run["table"]["baseline"]["dense_macs"] * 0.9   # really pruned (tiny removes half the MACs)
    assert run["torch_pruning"]["finetune_epochs"] == run["config"]["finetune"]["epochs"]


def test_doc_numbers_equal_the_result_files(tiny_run):
    results, _, doc = tiny_run
    table = results["models"]["vgg16"]["table"]
    rows = _doc_table(doc)
    assert set(rows) == set(table)
    for key, cells in rows.items():
        r = table[key]
        number = [float(c.replace(",", "")) for c in cells]
        assert number[0] == pytest.approx(100 * r["test_top1"], abs=0.0051)
        assert number[2:4] == [r["params"], r["nonzero_params"]]
        assert number[4] == pytest.approx(r["sparse_macs"], abs=0.5)
        assert number[6] == pytest.approx(r["dense_macs"], abs=0.5)
        assert number[8:] == [pytest.approx(r["latency_ms_bs1"], abs=0.0051), pytest.approx(r["latency_ms_bs64"], abs=0.0051)]
    assert results["command"] in doc and results["machine"]["torch"] in doc


def _split(n: int = 40, size: int = 32, **policy):
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    return SimpleNamespace(images=images, labels=torch.arange(n), indices=np.arange(5, n), image_size=size, **policy)


def _all_crops(image: torch.Tensor, size: int) -> list[torch.Tensor]:
    padded = F.pad(F.pad(image, (2, 2, 2, 2)) if size == 32 else image, (CROP_PAD,) * 4)
    crops = [padded[dy:dy + size, dx:dx + size] for dy in range(2 * CROP_PAD + 1) for dx in range(2 * CROP_PAD + 1)]
    return crops + [c.flip(-1) for c in crops]


def test_device_loader_crops_flips_and_normalizes_like_the_split():
    split = _split(augment=True, hflip=True, mean=0.5, std=0.25)
    loader = DeviceLoader(split, batch_size=8, device="cpu", seed=3)
    assert len(loader) == 35 // 8
    seen, flipped = [], 0
    for x, y in loader:
        assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32
        pixels = (x * 0.25 + 0.5) * 255
        for image, label in zip(pixels.round().to(torch.uint8), y):
            crops = _all_crops(split.images[int(label)], 32)
            match = [i for i, c in enumerate(crops) if torch.equal(c, image[0])]
            assert match, "not a 32x32 crop (pad 2) of its own source image"
            flipped += min(match) >= len(crops) // 2
            seen.append(int(label))
    assert sorted(seen) == sorted(set(seen)) and set(seen) <= set(range(5, 40))   # a permutation, no repeats
    assert 0 < flipped < len(seen)
    again = [y for _, y in DeviceLoader(split, batch_size=8, device="cpu", seed=3)]
    assert torch.equal(torch.cat(again), torch.tensor(seen))  # seeded: the same epoch again


def test_device_loader_without_augmentation_is_the_plain_image():
    split = _split(size=28, augment=False, hflip=True, mean=0.0, std=1.0)
    x, y = next(iter(DeviceLoader(split, batch_size=4, device="cpu", seed=0)))
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), split.images[y])


def test_device_loader_refuses_what_it_cannot_hold():
    with pytest.raises(DataError, match="data.loader=device"):
        DeviceLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8)), 2, "cpu")
    with pytest.raises(DataError, match="fewer than batch_size"):
        DeviceLoader(_split(n=10), batch_size=64, device="cpu")


def test_bad_command_lines_fail_in_one_line(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert reproduce.main(["--scale", "tiny", "--device", "cuda", "--work", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no reproduce_<scale>/results.json"):
        reproduce.main(["--write-docs", "--out", str(tmp_path), "--docs", str(tmp_path / "results.md")])
    assert not (tmp_path / "results.md").exists()


def test_committed_results_doc_is_generated_from_the_committed_result_files(tmp_path):
    """docs/results.md is exactly what ``--write-docs`` makes from benchmarks/results/reproduce_* (never typed by
    hand, never stale); only the pictures' relative paths differ with the output folder."""
    regenerated = tmp_path / "results.md"
    assert reproduce.main(["--write-docs", "--docs", str(regenerated)]) == 0

    def text(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if not line.startswith("![")]

    committed = REPO / "docs" / "results.md"
    assert text(regenerated) == text(committed), "run: python workflows/reproduce.py --write-docs"
    pictures = [line for line in committed.read_text().splitlines() if line.startswith("![")]
    assert pictures and all((committed.parent / line.split("](")[1].rstrip(")")).exists() for line in pictures)


def test_torch_pruning_halves_round_to_when_the_target_falls_between_its_steps():
    """The H200 run's ResNet18 case: 24.17% of the dense MACs is out of reach at round_to 8, 4 and 2 (the MACs
    jump past it), so the comparison goes down to round_to 1 instead of stopping the run."""
    from reproduce_compare import prune_to_macs

    import penni
    from penni.models import build_model

    model, x = build_model("resnet18", in_channels=1).eval(), torch.zeros(1, 1, 32, 32)
    target = penni.profile(model, x).dense_macs * 0.2417
    pruned, info = prune_to_macs(model, x, target, round_to=8)
    assert (info["round_to_asked"], info["round_to"]) == (8, 1)
    assert abs(penni.profile(pruned, x).dense_macs / target - 1) <= 0.02
