"""The seed structures the latency benchmark times, and the benchmark's output files (never its speed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import penni

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import seed_structures  # noqa: E402

# (module, out, in, basis, non-zero) copied from the seed appendix's tables, not from the module.
VGG16_ROWS = [
    ("features.conv1_1", 55, 3, 5, 196), ("features.conv1_2", 64, 55, 5, 2238),
    ("features.conv2_1", 128, 64, 5, 5862), ("features.conv2_2", 128, 128, 5, 12052),
    ("features.conv3_1", 256, 128, 5, 23169), ("features.conv3_2", 256, 256, 5, 36870),
    ("features.conv3_3", 237, 256, 5, 27716), ("features.conv4_1", 158, 237, 5, 15665),
    ("features.conv4_2", 62, 158, 5, 4530), ("features.conv4_3", 48, 62, 5, 2666),
    ("features.conv5_1", 36, 48, 5, 1315), ("features.conv5_2", 26, 36, 5, 874),
    ("features.conv5_3", 486, 26, 5, 2554),
]
RESNET50_SAMPLE_ROWS = [
    ("conv1", 59, 3, 5, 128), ("layer1.0.conv1", 22, 59, None, 500), ("layer1.0.downsample.0", 256, 59, None, 2589),
    ("layer1.0.conv2", 29, 22, 4, 125), ("layer1.2.conv2", 63, 31, 5, 807),
    ("layer2.0.conv2", 115, 88, 3, 581), ("layer2.3.conv1", 78, 512, None, 12508),
    ("layer3.0.conv2", 229, 240, 2, 712), ("layer3.1.conv1", 103, 1024, None, 29283),
    ("layer3.1.conv2", 182, 103, 5, 866), ("layer3.5.conv3", 1024, 217, None, 65842),
    ("layer4.0.conv2", 484, 495, 1, 546), ("layer4.0.downsample.0", 2048, 1024, None, 580155),
    ("layer4.2.conv2", 484, 501, 3, 1076), ("layer4.2.conv3", 2048, 484, None, 245290),
]


def _layer_facts(model: torch.nn.Module, name: str) -> tuple:
    layer = model.get_submodule(name)
    is_penni = isinstance(layer, penni.PenniConv2d)
    values = layer.coefficients if is_penni else layer.weight
    return layer.out_channels, layer.in_channels, layer.d if is_penni else None, int(values.ne(0).sum())


@pytest.fixture(scope="module")
def vgg16():
    return seed_structures.build_vgg16_table1(seed=0)


def test_vgg16_table1_widths_bases_and_nonzeros(vgg16):
    for name, out, cin, basis, nonzero in VGG16_ROWS:
        assert _layer_facts(vgg16, name) == (out, cin, basis, nonzero), name
    assert vgg16.classifier.in_features == 486
    assert seed_structures.table_sums(seed_structures.vgg16_table1()) == (135707, 1263775)


def test_vgg16_table1_profile_matches_the_table(vgg16):
    prof = penni.profile(vgg16, torch.randn(1, 3, 32, 32))
    rows = {r.name: r for r in prof.select(["penni"])}
    assert sorted(rows) == sorted(name for name, *_ in VGG16_ROWS)
    assert sum(r.nonzero for r in rows.values()) == 135707
    assert sum(r.total for r in rows.values()) == 1263775


def test_vgg16_table1_is_already_shrunk(vgg16):
    """No channel or basis kernel is dead: shrink has nothing left to remove, and the output is unchanged."""
    x = torch.randn(2, 3, 32, 32)
    small, report = penni.shrink_with_report(vgg16, x)
    assert report.removed_groups == 0 and report.widths == {}
    with torch.inference_mode():
        torch.testing.assert_close(penni.set_forward_mode(small, "dense")(x), vgg16(x), rtol=1e-5, atol=1e-5)


def test_resnet50_table2_reconstruction():
    model = seed_structures.build_resnet50_table2(seed=0)
    for name, out, cin, basis, nonzero in RESNET50_SAMPLE_ROWS:
        assert _layer_facts(model, name) == (out, cin, basis, nonzero), name
    specs = seed_structures.resnet50_table2()
    assert len(specs) == 53
    for spec in specs:
        assert _layer_facts(model, spec.module) == (spec.width, spec.in_width, spec.basis, spec.nonzero)
        if spec.printed_total is not None and not spec.note:
            assert spec.total == spec.printed_total, spec.table_name
    nonzero, total = seed_structures.table_sums(specs)
    assert round(nonzero / 1e6, 2) == 2.98 and round(total / 1e6, 2) == 12.98   # the printed Total row
    assert round(100 * (1 - nonzero / total), 1) == 77.0
    assert all(type(m) is torch.nn.Conv2d for n, m in model.named_modules() if n.endswith(("conv1", "conv3", "downsample.0"))
               and n != "conv1")
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_random_sparse_exact_count_and_every_channel_used():
    g = torch.Generator().manual_seed(1)
    t = seed_structures.random_sparse((7, 40, 3), 45, g)
    assert int(t.ne(0).sum()) == 45
    assert t.ne(0).any(2).any(1).all() and t.ne(0).any(2).any(0).all() and t.ne(0).any(1).any(0).all()
    with pytest.raises(ValueError, match="every channel"):
        seed_structures.random_sparse((7, 40, 3), 39, g)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "inference_latency.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    stem = tmp_path / "results" / "quick"
    proc = _run("--cases", "quickstart", "--quick", "--out", str(stem))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(stem.with_suffix(".json").read_text())
    assert {"date", "machine", "settings", "pairs", "rows", "targets", "notes"} <= set(result)
    assert {"cpu", "cores", "threads", "torch"} <= set(result["machine"]) and result["machine"]["cores"] >= 1
    assert result["settings"]["quick"] is True
    (pair,) = result["pairs"]
    assert pair["case"] == "quickstart" and pair["batch_sizes"] == [1, 2]
    assert pair["structure"]["compressed"]["dense_macs"] < pair["structure"]["baseline"]["dense_macs"]
    rows = {(r["batch"], r["form"]): r for r in result["rows"]}
    for batch in (1, 2):
        assert rows[(batch, "dense")]["speedup"] is None
        for form in ("shrunk-dense", "per-layer"):
            row = rows[(batch, form)]
            assert row["reference"] == "dense" and row["runs"] == 3 and row["dtype"] == "float32"
            assert row["median_ms"] > 0
            assert row["speedup"] == pytest.approx(rows[(batch, "dense")]["median_ms"] / row["median_ms"])
            assert row["max_rel_diff"] < 1e-4          # every form computes the compressed model's function
    markdown = stem.with_suffix(".md").read_text()
    assert "| batch | dtype | form | median ms |" in markdown and result["machine"]["torch"] in markdown


def test_bad_output_path_is_refused_and_nothing_written(tmp_path):
    proc = _run("--cases", "quickstart", "--quick", "--out", str(tmp_path))
    assert proc.returncode != 0 and "is a directory" in proc.stderr
    proc = _run("--cases", "quickstart", "--quick", "--quickstart-run", str(tmp_path / "missing"),
                "--out", str(tmp_path / "q"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_quickstart_pair_loads_a_pipeline_run(tmp_path):
    """--quickstart-run reads baseline/ and shrink/model.safetensors through penni.load."""
    import inference_latency

    base, small = inference_latency._synthetic_quickstart(seed=0, size=28)
    for stage, model in (("baseline", base), ("shrink", small)):
        (tmp_path / stage).mkdir()
        penni.save(model, tmp_path / stage / "model.safetensors")
    args = inference_latency.parse_args(["--cases", "quickstart", "--quick", "--quickstart-run", str(tmp_path)])
    pair = inference_latency.quickstart_pair(args)
    assert pair.input_shape == (1, 28, 28) and pair.batch_sizes == [1, 2]
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(pair.compressed(x), penni.set_forward_mode(small, "dense")(x))
        torch.testing.assert_close(pair.baseline(x), base(x))
    assert {n: m.forward_mode for n, m in penni.penni_layers(pair.compressed).items()} == \
        {n: "dense" for n in penni.penni_layers(small)}
