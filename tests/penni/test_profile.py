"""penni.profile: per-layer rows, params, sparse / dense MACs (dense checked against FlopCounterMode)."""
from __future__ import annotations

import copy
import csv
import io
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import penni
from penni.comparison import compare, macs_reduction
from penni.conv import PenniConv2d
from penni.masking import hold_mask
from penni.models import build_model
from penni.profiling import CONV_KINDS, CSV_COLUMNS, LayerRow, Profile, profile


def _flop_count(model: nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode's total for one forward, run on the meta device (shapes only: fast)."""
    meta = copy.deepcopy(model).eval().to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(x.to("meta"))
    return int(counter.get_total_flops())


MODELS = [
    ("vgg16", 32),
    ("resnet18", 32),
    ("resnet56", 32),
    ("torchvision:resnet18", 64),
    ("torchvision:resnet50", 32),
]


@pytest.mark.parametrize("arch,hw", MODELS)
def test_dense_macs_match_flop_counter(arch, hw):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10)
    x = torch.randn(2, 3, hw, hw)
    before = profile(model, x)
    assert before.batch_size == 2
    # FlopCounterMode counts 2 FLOPs per MAC, over the whole batch of 2
    assert 4 * before.dense_macs == _flop_count(model, x)
    assert isinstance(before.dense_macs, int)
    assert before.sparse_macs <= before.dense_macs

    penni.decompose(model, d=5)
    penni.set_forward_mode(model, "dense")
    after = profile(model, x)
    assert 4 * after.dense_macs == _flop_count(model, x)
    assert after.dense_macs == before.dense_macs  # the reconstructed dense conv costs the same
    assert after.sparse_macs < after.dense_macs  # d=5 < 9 (and 49) taps: the basis conv saves
    assert any(r.kind == "penni" for r in after.rows)
    assert after.params == sum(p.numel() for p in model.parameters())


def test_reconstruct_mode_adds_the_reconstruction_matmul():
    """In "reconstruct" mode FlopCounterMode also counts coefficients @ basis, once per call."""
    torch.manual_seed(0)
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5)
    x = torch.randn(3, 1, 28, 28)
    p = profile(model, x)
    recon = sum(m.out_channels * (m.in_channels // m.groups) * m.d * m.kernel_size[0] * m.kernel_size[1]
                for m in model.modules() if isinstance(m, PenniConv2d))
    assert _flop_count(model, x) == 2 * (3 * p.dense_macs + recon)
    penni.set_forward_mode(model, "dense")
    assert _flop_count(model, x) == 2 * 3 * p.dense_macs


# ------------------------------------------------------------------ the sparse rule, by hand


@pytest.mark.parametrize("groups", [1, 2])
def test_penni_conv_sparse_rule(groups):
    torch.manual_seed(0)
    layer = PenniConv2d(4, 6, 3, d=4, stride=2, padding=1, groups=groups)
    with torch.no_grad():
        layer.coefficients[0].zero_()
        layer.coefficients[2, 1, 3] = 0.0
    nnz = int((layer.coefficients != 0).sum())
    assert nnz == layer.coefficients.numel() - (4 // groups) * 4 - 1
    model = nn.Sequential(layer)
    x = torch.randn(2, 4, 11, 7)  # non-square input; output 6 x 4
    assert model(x).shape[-2:] == (6, 4)
    p = profile(model, x)
    row = p.row("0")
    hw = 6 * 4
    assert row.kind == "penni" and row.basis == 4 and row.size == "3"
    assert row.output_hw == (6, 4) and row.stride == (2, 2) and row.groups == groups
    assert (row.nonzero, row.total) == (nnz, 6 * (4 // groups) * 4)
    assert row.sparse_macs == p.sparse_macs == hw * 4 * 4 * 9 + nnz * hw
    assert row.dense_macs == p.dense_macs == hw * 6 * (4 // groups) * 9
    assert row.params == layer.coefficients.numel() + 4 * 9 + 6
    assert row.sparsity == pytest.approx(100.0 * (1 - nnz / row.total))


def test_penni_conv_reads_masked_coefficients():
    """A held mask (parametrization) zeroes entries even where the raw tensor is not zero."""
    torch.manual_seed(0)
    layer = PenniConv2d(3, 5, (3, 1), d=2, padding=(1, 0))
    mask = torch.ones_like(layer.coefficients)
    mask[1:3] = 0
    hold_mask(layer, "coefficients", mask)
    with torch.no_grad():
        layer.parametrizations.coefficients.original.fill_(1.0)  # raw values all non-zero
    nnz = int(mask.sum())
    model = nn.Sequential(layer)
    p = profile(model, torch.randn(1, 3, 8, 5))
    row = p.row("0")
    assert row.size == "3x1" and row.nonzero == nnz == 3 * 3 * 2
    assert row.sparse_macs == 8 * 5 * (3 * 2 * 3 + nnz)
    assert p.params == 5 * 3 * 2 + 2 * 3 + 5  # the stored original counts once
    assert p.nonzero_params == nnz + int((layer.basis != 0).sum()) + int((layer.bias != 0).sum())


def test_pointwise_conv_sparse_rule_uses_output_size():
    conv = nn.Conv2d(8, 6, 1, stride=2, bias=False)
    with torch.no_grad():
        conv.weight[:, :3] = 0.0
        conv.weight[5] = 0.0
    nnz = int((conv.weight != 0).sum())
    model = nn.Sequential(conv)
    p = profile(model, torch.randn(2, 8, 9, 9))  # output 5 x 5 (Hin*Win would be 81)
    row = p.row("0")
    assert row.kind == "pointwise" and row.basis is None and row.basis_str == "-"
    assert row.output_hw == (5, 5)
    assert row.sparse_macs == 25 * nnz
    assert row.dense_macs == 25 * 6 * 8
    assert (row.nonzero, row.total) == (nnz, 48)


def test_plain_conv_and_linear_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
        model[2].weight[:, :10] = 0.0
    p = profile(model, torch.randn(3, 2, 5, 5))
    conv, lin = p.row("0"), p.row("2")
    assert conv.kind == "conv" and conv.sparse_macs == 25 * (72 - 9) and conv.dense_macs == 25 * 72
    assert conv.params == 72 + 4
    assert lin.kind == "linear" and lin.size == "-" and lin.width == 3
    assert lin.nonzero == 300 - 30 and lin.sparse_macs == 270 and lin.dense_macs == 300
    assert p.sparse_macs == conv.sparse_macs + lin.sparse_macs
    assert p.params == 72 + 4 + 300 + 3


def test_linear_on_sequences_counts_every_row():
    lin = nn.Linear(6, 4)
    p = profile(nn.Sequential(lin), torch.randn(2, 7, 6))  # 7 rows per sample
    assert p.dense_macs == 7 * 24
    assert 2 * p.dense_macs * 2 == _flop_count(nn.Sequential(lin), torch.randn(2, 7, 6))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


def test_shared_layer_counted_per_call_and_state_untouched():
    model = _Twice().train()
    x = torch.randn(2, 3, 6, 6)
    p = profile(model, x)
    assert p.row("conv").calls == 2
    assert p.dense_macs == 2 * 36 * 81
    assert 4 * p.dense_macs == _flop_count(model, x)
    model.train()
    assert model.training
    p = profile(model, x)
    assert model.training and model.bn.training  # flags restored
    assert int(model.bn.num_batches_tracked) == 0  # ran in eval mode: running stats untouched
    assert p.params == 81 + 6  # BatchNorm's weight and bias count, its buffers do not


def test_wrappers_and_input_forms():
    model = build_model("fashion_cnn", in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    ref = profile(model, x)
    wrapped = profile(nn.DataParallel(model), x)
    assert [r.name for r in wrapped.rows] == [r.name for r in ref.rows]
    assert wrapped.dense_macs == ref.dense_macs
    assert profile(model, (x,)).dense_macs == ref.dense_macs
    assert profile(model, {"x": x}).dense_macs == ref.dense_macs
    assert profile(model, x[:1], batch_size=1).dense_macs == ref.dense_macs


def test_vgg16_rows_follow_table1():
    model = penni.decompose(build_model("vgg16"), d=5)
    p = profile(model, torch.randn(1, 3, 32, 32))
    names = [r.name for r in p.select(CONV_KINDS)]
    assert names == [f"features.conv{s}_{i}" for s, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
                     for i in range(1, n + 1)]
    assert p.row("features.conv1_1").total == 960 and p.row("features.conv1_2").total == 20480
    assert sum(r.total for r in p.select("penni")) == 8172480  # Table 1's total
    assert [r.kind for r in p.rows] == ["penni"] * 13 + ["linear"]
    assert p.coefficient_total == 8172480 + 512 * 10


# ------------------------------------------------------------------ renderers


def _pruned_fashion(widths=(16, 32, 64)):
    torch.manual_seed(0)
    model = penni.decompose(build_model("fashion_cnn", in_channels=1, widths=widths), d=5)
    penni.prune(model, rule="std", s=1.0)
    return model


def test_markdown_csv_dict():
    model = _pruned_fashion()
    p = profile(model, torch.randn(2, 1, 28, 28))
    md = p.to_markdown()
    header = md.splitlines()[0]
    for col in ("Name", "Kind", "Size", "Width", "Basis", "Coefficients (non-zero/total)", "Sparsity %",
                "MACs (sparse)", "MACs (dense)"):
        assert col in header
    assert f"| {p.coefficient_nonzero}/{p.coefficient_total} |" in md
    assert "**Total**" in md and "MACs per image" in md and str(p.dense_macs) in md
    conv_md = p.to_markdown(kinds=CONV_KINDS)
    assert "classifier" not in conv_md and "features.conv3_2" in conv_md
    with pytest.raises(ValueError):
        p.to_markdown(kinds=["bogus"])

    text = p.to_csv()
    table = list(csv.DictReader(io.StringIO(text)))
    assert list(table[0]) == list(CSV_COLUMNS)
    assert [r["name"] for r in table[:-1]] == [r.name for r in p.rows]
    total = table[-1]
    assert total["name"] == "Total" and total["kind"] == "total"
    assert int(total["nonzero"]) == p.coefficient_nonzero and int(total["total"]) == p.coefficient_total
    assert int(total["sparse_macs"]) == p.sparse_macs and int(total["dense_macs"]) == p.dense_macs
    assert int(total["params"]) == p.params
    assert table[0]["basis"] == "5" and table[-2]["basis"] == ""

    d = json.loads(json.dumps(p.to_dict()))
    assert d["dense_macs"] == p.dense_macs and len(d["rows"]) == len(p.rows)
    assert d["rows"][0]["sparsity"] == pytest.approx(p.rows[0].sparsity, abs=1e-3)
    back = Profile.from_dict(d)
    assert back.to_markdown() == p.to_markdown()
    assert isinstance(back.rows[0], LayerRow) and back.rows[0].kernel_size == (3, 3)


def test_to_csv_writes_file(tmp_path):
    p = profile(nn.Sequential(nn.Conv2d(1, 2, 3)), torch.randn(1, 1, 5, 5))
    path = tmp_path / "sub" / "profile.csv"
    text = p.to_csv(path)
    assert path.read_text() == text


def test_compare_layout_and_reduction():
    x = torch.randn(1, 1, 28, 28)
    before = profile(_pruned_fashion(), x)
    after = profile(_pruned_fashion(widths=(12, 24, 48)), x)
    after.rows = [r for r in after.rows if r.name != "features.conv3_2"]  # as if the layer were gone
    text = compare(before, after, kinds=CONV_KINDS)
    lines = text.splitlines()
    assert lines[0].startswith("| Name | Size | Before shrinking: Width | Basis | Coefficients (non-zero/total)")
    assert "After shrinking: Width" in lines[0]
    assert len(lines[0].split("|")) == 12  # 10 columns
    by_name = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]
               if line.startswith("|")}
    b, a = before.row("features.conv2_1"), after.row("features.conv2_1")
    assert by_name["features.conv2_1"] == [
        "features.conv2_1", "3", "32", "5", f"{b.nonzero}/{b.total}", f"{b.sparsity:.2f}",
        "24", "5", f"{a.nonzero}/{a.total}", f"{a.sparsity:.2f}"]
    assert by_name["features.conv3_2"][6:] == ["-"] * 4
    assert "classifier" not in by_name
    total = by_name["**Total**"]
    conv_before = before.select(CONV_KINDS)
    nz, tot = sum(r.nonzero for r in conv_before), sum(r.total for r in conv_before)
    assert total[4] == f"{nz}/{tot}" and total[5] == f"{100 * (1 - nz / tot):.2f}"
    assert "MACs per image (sparse)" in text

    red = macs_reduction(before, after)
    assert set(red) >= {"params", "nonzero_params", "sparse_macs", "dense_macs"}
    assert red["dense_macs"] == pytest.approx(100 * (1 - after.dense_macs / before.dense_macs))
    assert red["params"] > 0 and red["sparse_macs"] > 0
    assert macs_reduction(before, before)["dense_macs"] == 0.0
