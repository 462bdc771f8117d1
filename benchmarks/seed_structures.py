"""The seed appendix's compressed models (Tables 1 and 2) as real penni models with random values.

Latency depends on shapes and on where the zeros are, not on what was learned, so each table is
rebuilt as a model with exactly the stated widths, basis counts and non-zero coefficient counts,
filled with random values (fixed seed). Every output channel, input channel and basis kernel keeps
at least one non-zero value, so the models are really "after shrinking": ``penni.shrink`` finds
nothing more to remove.

**Table 1, VGG16-CIFAR10 after shrinking** (``build_vgg16_table1``, 32x32 inputs): the CIFAR
VGG16-BN of ``penni.models.build_model("vgg16")``, decomposed with d=5, sliced to the table's widths.
The after-shrinking columns are consistent: every layer's Total equals
``width x previous width x basis`` (conv5_3 really is 486 wide over 26 inputs: 486*26*5 = 63180),
and the column sums are the printed totals (135707 / 1263775). Only the before-shrinking columns
have a slip (conv4_1 "65536" is 655360 = 512*256*5, as its sparsity 97.61% says); they are not used.

**Table 2, ResNet50-R1 after shrinking** (``build_resnet50_table2``, 224x224 inputs): torchvision's
resnet50 layout. The 7x7 stem and the 3x3 convs are PenniConv2d with the stated basis counts; the
1x1 convs (``conv1``, ``conv3``, ``downsample.0``) stay plain ``nn.Conv2d`` with the stated number
of non-zero weights. Every readable row was checked: Total = width x input width x basis (1 for a
1x1 conv) and the sparsity matches. What was assumed where the scan is garbled or wrong:

* L1B1.conv1: Total printed 1289 is 22*59 = 1298 (digits swapped; 61.48% matches 1298).
* L1B3.conv2: Total printed 9756 is 63*31*5 = 9765 (digits swapped; 91.74% matches 9765).
* L2B3.conv1: 9898/33792 is 70.71% zero, printed 79.03%: the count 9898 is kept.
* The rows printed "L2B3.conv3 ... 78 ..." (second one) and the split "1 512 / L2B4.conv3" row are
  L2B4.conv1 (78 wide, 12508/39936 = 78*512) and L2B4.conv3 (512 wide, 12680/48640 = 512*95).
* L3B1 (rows interleaved with L3B2 in the scan): conv1 240 wide, 29283/122880 (= 240*512);
  conv2 229 wide with 2 bases, 712 non-zero: the printed total 100920 cannot be a product of these
  widths, 109920 = 229*240*2 is (and gives the printed 99.35%), so "100920" is read as 109920;
  conv3 1024 wide, 57763/234496 (= 1024*229); downsample 1024 wide, 117775/524288.
* L3B2: conv2 is 182 wide with 5 bases, 866/93730, so conv1 is 93730/(182*5) = 103 wide. The
  conv1 and conv3 rows print L3B1's numbers again (29283/122880, 57763/234496), which cannot fit
  widths 103 and 1024x182. The counts are kept over the real totals: conv1 29283/105472 (72.24%
  zero), conv3 57763/186368 (69.01% zero). Only with these counts do the column sums give the
  printed Total row (with the printed sparsities instead, 25134 and 45902, the sums would be
  2.96M non-zero and 77.2% zero). The stray "94" on that row is L3B3.conv1's width (96256 = 94*1024).
* L3B6.conv3: width printed 2024 is 1024 (65842/222208 = 1024*217).
* L4B1.conv3: 279619/991232 is 71.79% zero, printed 91.79%: the count is kept.
* Stray basis marks on 1x1 rows ("J", "4", "1") are scan noise: 1x1 convs are not decomposed.

With these, the sum over all 53 layers is 2,978,654 non-zero of 12,976,825 (77.05% zero) against the
printed "2.98M/12.98M 77.0", which supports the reconstruction. The residual stream keeps its full
widths (256/512/1024/2048) except the stem, which is 59 wide (so layer1.0's conv1 and downsample read
59 channels); the fc layer stays 2048 -> 1000 and dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import penni
from penni.models import build_model
from penni.recipe import get_recipe
from penni.slicing import slice_in, slice_out


@dataclass(frozen=True)
class LayerSpec:
    """One row of a seed table after shrinking: where it lives and what it must hold."""

    table_name: str
    module: str                 # module path in the model
    kernel: int
    width: int                  # output channels
    in_width: int               # input channels (the previous layer's width)
    basis: int | None           # None: a plain (1x1) conv, not decomposed
    nonzero: int                # non-zero coefficients (PenniConv2d) or weights (plain conv)
    printed_total: int | None = None   # the Total as printed, where readable
    note: str = ""

    @property
    def total(self) -> int:
        """Coefficient (or weight) count implied by the widths: width x in_width x basis."""
        return self.width * self.in_width * (self.basis or 1)


# Table 1 (after shrinking): name, width, basis, non-zero, printed total.
_VGG16_TABLE1_ROWS = (
    ("conv1_1", 55, 5, 196, 825), ("conv1_2", 64, 5, 2238, 17600), ("conv2_1", 128, 5, 5862, 40960),
    ("conv2_2", 128, 5, 12052, 81920), ("conv3_1", 256, 5, 23169, 163840), ("conv3_2", 256, 5, 36870, 327680),
    ("conv3_3", 237, 5, 27716, 303360), ("conv4_1", 158, 5, 15665, 187230), ("conv4_2", 62, 5, 4530, 48980),
    ("conv4_3", 48, 5, 2666, 14880), ("conv5_1", 36, 5, 1315, 8640), ("conv5_2", 26, 5, 874, 4680),
    ("conv5_3", 486, 5, 2554, 63180),
)
VGG16_TABLE1_TOTALS = (135707, 1263775)   # printed Total row: non-zero / total


def vgg16_table1() -> list[LayerSpec]:
    """Table 1's after-shrinking rows, in layer order, with input widths chained."""
    specs, prev = [], 3
    for name, width, basis, nonzero, printed in _VGG16_TABLE1_ROWS:
        specs.append(LayerSpec(name, f"features.{name}", 3, width, prev, basis, nonzero, printed))
        prev = width
    return specs


# Table 2 blocks: (stage, block, conv1 width, conv1 nnz, conv2 width, basis, conv2 nnz, conv3 nnz,
# downsample nnz or None). conv3 widths are the full torchvision widths (the table agrees).
_RESNET50_BLOCKS = (
    (1, 1, 22, 500, 29, 4, 125, 2223, 2589), (1, 2, 32, 2636, 34, 5, 349, 2301, None),
    (1, 3, 31, 2978, 63, 5, 807, 3395, None),
    (2, 1, 88, 5973, 115, 3, 581, 11939, 23134), (2, 2, 20, 3778, 76, 4, 334, 8154, None),
    (2, 3, 66, 9898, 98, 4, 497, 10702, None), (2, 4, 78, 12508, 95, 4, 1006, 12680, None),
    (3, 1, 240, 29283, 229, 2, 712, 57763, 117775), (3, 2, 103, 29283, 182, 5, 866, 57763, None),
    (3, 3, 94, 35956, 180, 5, 1222, 53268, None), (3, 4, 135, 49843, 193, 5, 925, 58240, None),
    (3, 5, 155, 56279, 197, 4, 1138, 60387, None), (3, 6, 206, 65496, 217, 4, 1156, 65842, None),
    (4, 1, 495, 148203, 484, 1, 546, 279619, 580155), (4, 2, 411, 276731, 445, 4, 1334, 275688, None),
    (4, 3, 501, 307600, 484, 3, 1076, 245290, None),
)
RESNET50_STEM = (59, 5, 128)             # width, basis, non-zero of the 7x7 conv1
RESNET50_STAGE_WIDTHS = {1: 256, 2: 512, 3: 1024, 4: 2048}
# Printed totals that differ from width x in_width x basis, and rows whose numbers were assumed.
_RESNET50_NOTES = {
    "L1B1.conv1": (1289, "printed total 1289 read as 1298 = 22*59 (digits swapped)"),
    "L1B3.conv2": (9756, "printed total 9756 read as 9765 = 63*31*5 (digits swapped)"),
    "L2B3.conv1": (33792, "printed sparsity 79.03% does not match 9898/33792 (70.71%): count kept"),
    "L3B1.conv2": (100920, "printed total 100920 read as 109920 = 229*240*2 (matches 99.35%)"),
    "L3B2.conv1": (None, "width 103 from conv2's 93730 = 182*103*5; the row repeats L3B1.conv1's "
                         "29283/122880: count kept over 103*1024 (72.24% zero)"),
    "L3B2.conv3": (None, "the row repeats L3B1.conv3's 57763/234496: count kept over 1024*182 (69.01% zero)"),
    "L3B6.conv3": (222208, "printed width 2024 read as 1024"),
    "L4B1.conv3": (991232, "printed sparsity 91.79% does not match 279619/991232 (71.79%): count kept"),
}
RESNET50_TABLE2_TOTALS = ("2.98M", "12.98M")


def resnet50_table2() -> list[LayerSpec]:
    """Table 2's rows (as reconstructed, see the module docstring) in layer order."""
    width, basis, nonzero = RESNET50_STEM
    specs = [LayerSpec("conv1", "conv1", 7, width, 3, basis, nonzero, 885)]
    stream = width
    for stage, block, w1, n1, w2, b2, n2, n3, nd in _RESNET50_BLOCKS:
        out = RESNET50_STAGE_WIDTHS[stage]
        prefix, module = f"L{stage}B{block}", f"layer{stage}.{block - 1}"
        rows = [("conv1", "conv1", 1, w1, stream, None, n1), ("conv2", "conv2", 3, w2, w1, b2, n2),
                ("conv3", "conv3", 1, out, w2, None, n3)]
        if nd is not None:
            rows.append(("downsample", "downsample.0", 1, out, stream, None, nd))
        for short, path, kernel, w, cin, b, n in rows:
            name = f"{prefix}.{short}"
            spec = LayerSpec(name, f"{module}.{path}", kernel, w, cin, b, n)
            printed, note = _RESNET50_NOTES.get(name, (spec.total, ""))
            specs.append(LayerSpec(name, spec.module, kernel, w, cin, b, n, printed, note))
        stream = out
    return specs


def random_sparse(shape: tuple[int, ...], nonzero: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random values at exactly ``nonzero`` positions of a ``(out, in, rest...)`` tensor, zeros elsewhere.

    Every output row, input column and position along the flattened rest (basis index) gets at
    least one non-zero, so no channel or basis kernel is dead (the layer is really shrunk).
    """
    out, cin, rest = shape[0], shape[1], math.prod(shape[2:])
    total = out * cin * rest
    cover = max(out, cin, rest)
    if not cover <= nonzero <= total:
        raise ValueError(f"cannot place {nonzero} non-zeros in a {tuple(shape)} tensor with every channel "
                         f"used: need {cover} <= nonzero <= {total}")
    k = torch.arange(cover)
    cols = torch.randperm(cin, generator=generator)[k % cin]
    first = ((k % out) * cin + cols) * rest + k % rest   # distinct: the largest axis runs over all k
    free = torch.ones(total, dtype=torch.bool)
    free[first] = False
    candidates = free.nonzero().flatten()
    extra = candidates[torch.randperm(len(candidates), generator=generator)[: nonzero - cover]]
    values = torch.randn(nonzero, generator=generator) * scale
    values = torch.where(values == 0, torch.full_like(values, scale), values)
    flat = torch.zeros(total)
    flat[torch.cat([first, extra])] = values
    return flat.reshape(shape)


def _size(module: nn.Module, axis: str) -> int:
    """Current channel count of ``module`` along ``axis`` ("out" or "in")."""
    names = ("out_channels", "num_features") if axis == "out" else ("in_channels", "in_features")
    return next(getattr(module, n) for n in names if hasattr(module, n))


def _set_width(model: nn.Module, producer: str, norm: str | None, consumers: list[str], width: int) -> None:
    """Keep the first ``width`` output channels of ``producer`` (and its BatchNorm, and the consumers' inputs)."""
    kept = list(range(width))
    recipe = get_recipe(model)
    for name, axis in [(producer, "out")] + ([(norm, "out")] if norm else []) + [(c, "in") for c in consumers]:
        module = model.get_submodule(name)
        if _size(module, axis) == width:
            continue
        (slice_out if axis == "out" else slice_in)(module, kept)
        recipe.record_kept(name, axis, kept)


def _fill(model: nn.Module, specs: list[LayerSpec], generator: torch.Generator) -> None:
    """Random coefficients/weights with the exact non-zero counts; random BatchNorm statistics."""
    with torch.no_grad():
        for spec in specs:
            layer = model.get_submodule(spec.module)
            fan_in = max(1.0, spec.nonzero / spec.width)
            if isinstance(layer, penni.PenniConv2d):
                layer.coefficients.copy_(random_sparse(tuple(layer.coefficients.shape), spec.nonzero,
                                                       generator, (2.0 / fan_in) ** 0.5))
            else:
                layer.weight.copy_(random_sparse(tuple(layer.weight.shape), spec.nonzero, generator,
                                                 (2.0 / fan_in) ** 0.5))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))


def check_structure(model: nn.Module, specs: list[LayerSpec]) -> None:
    """Raise if any layer's widths, basis count or non-zero count differ from its spec."""
    for spec in specs:
        layer = model.get_submodule(spec.module)
        is_penni = isinstance(layer, penni.PenniConv2d)
        values = layer.coefficients if is_penni else layer.weight
        got = (layer.out_channels, layer.in_channels, layer.d if is_penni else None, int(values.ne(0).sum()))
        want = (spec.width, spec.in_width, spec.basis, spec.nonzero)
        if got != want:
            raise AssertionError(f"{spec.table_name} ({spec.module}): (out, in, basis, nonzero) = {got}, "
                                 f"the table says {want}")


def build_vgg16_table1(seed: int = 0) -> nn.Module:
    """The seed's Table 1 VGG16-CIFAR10 after shrinking (eval mode, PenniConv2d in "dense" mode)."""
    specs = vgg16_table1()
    model = penni.decompose(build_model("vgg16"), d=5)
    for i, spec in enumerate(specs):
        consumers = [specs[i + 1].module] if i + 1 < len(specs) else ["classifier"]
        _set_width(model, spec.module, spec.module.replace("conv", "bn"), consumers, spec.width)
    _fill(model, specs, torch.Generator().manual_seed(seed))
    check_structure(model, specs)
    return penni.set_forward_mode(model.eval(), "dense")


def build_resnet50_table2(seed: int = 0) -> nn.Module:
    """The seed's Table 2 ResNet50-R1 after shrinking, as reconstructed (eval mode, "dense" mode)."""
    specs = resnet50_table2()
    model = build_model("torchvision:resnet50", num_classes=1000)
    penni.decompose(model, d={s.module: s.basis for s in specs if s.basis is not None})
    by_module = {s.module: s for s in specs}
    _set_width(model, "conv1", "bn1", ["layer1.0.conv1", "layer1.0.downsample.0"], RESNET50_STEM[0])
    for spec in specs:
        if spec.module.endswith(".conv1") or spec.module.endswith(".conv2"):
            block, conv = spec.module.rsplit(".", 1)
            following = f"{block}.conv{int(conv[-1]) + 1}"
            _set_width(model, spec.module, f"{block}.bn{conv[-1]}", [following], spec.width)
        elif spec.module != "conv1" and model.get_submodule(spec.module).out_channels != spec.width:
            raise AssertionError(f"{spec.table_name}: the residual stream is {spec.width} wide in the table "
                                 f"but {model.get_submodule(spec.module).out_channels} in resnet50")
    assert set(by_module) <= {n for n, _ in model.named_modules()}
    _fill(model, specs, torch.Generator().manual_seed(seed))
    check_structure(model, specs)
    return penni.set_forward_mode(model.eval(), "dense")


def table_sums(specs: list[LayerSpec]) -> tuple[int, int]:
    """(non-zero, total) summed over the rows: compare with the printed Total row."""
    return sum(s.nonzero for s in specs), sum(s.total for s in specs)
