"""Channel-level sparsity: group-lasso penalty and prune_channels aimed at a cost target.

The cost reached is measured the way users see it: really shrinking the pruned model
(``penni.shrink``) and profiling it (``penni.profile``), never from the pruner's own estimate.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import penni
from penni.conv import PenniConv2d
from penni.masking import get_mask
from penni.models import build_model
from tests.helpers import GroupedNet, randomize_batchnorm

TOLERANCE = 0.02  # the "within 2%" of the requested reduction


def relative_error(reference: torch.Tensor, got: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def shrunk_and_measured(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, float, float]:
    """Shrink ``model``; return the small model, its dense-MAC reduction and the output change."""
    model.eval()
    before = penni.profile(model, x)
    small = penni.shrink(model, x).eval()
    after = penni.profile(small, x)
    with torch.no_grad():
        change = relative_error(model(x), small(x))
    return small, 1.0 - after.dense_macs / before.dense_macs, change


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, PenniConv2d))}


@pytest.fixture(scope="module")
def resnet18_penni() -> nn.Module:
    torch.manual_seed(0)
    model = penni.decompose(build_model("resnet18"), d=5).eval()
    randomize_batchnorm(model, seed=3)
    return model


# ----------------------------------------------------------------------------- cost targets

def test_channels_reach_dense_mac_target_on_cifar_resnet18(resnet18_penni):
    target = 0.6
    model = copy.deepcopy(resnet18_penni)
    x = torch.randn(2, 3, 32, 32)
    report = penni.prune_channels(model, target, x)
    small, reduction, change = shrunk_and_measured(model, x)
    assert abs(reduction - target) <= TOLERANCE, (reduction, target)
    assert reduction == pytest.approx(report.reduction, abs=1e-9)  # the graph's estimate is the real cost
    assert change <= 1e-5
    before, after = conv_widths(model), conv_widths(small)
    assert sum(after.values()) < sum(before.values())
    assert all(w >= 1 for w in after.values())


def test_channels_reach_dense_mac_target_on_torchvision_resnet50():
    torch.manual_seed(0)
    model = build_model("torchvision:resnet50").eval()
    randomize_batchnorm(model, seed=4)
    x = torch.randn(2, 3, 64, 64)
    penni.prune_channels(model, 0.5, x)
    small, reduction, change = shrunk_and_measured(model, x)
    assert abs(reduction - 0.5) <= TOLERANCE, reduction
    assert change <= 1e-5
    # residual channels are judged across all branches: every block output of a stage keeps the same width
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        layer = small.get_submodule(stage)
        widths = {block.conv3.out_channels for block in layer}
        assert len(widths) == 1, (stage, widths)
        assert layer[0].downsample[0].out_channels in widths


def test_params_cost_reaches_its_target(resnet18_penni):
    model = copy.deepcopy(resnet18_penni)
    x = torch.randn(1, 3, 16, 16)  # parameter counts do not depend on the input size
    before = penni.profile(model, x).params
    penni.prune_channels(model, 0.5, x, cost="params")
    after = penni.profile(penni.shrink(model, x), x).params
    assert abs((1 - after / before) - 0.5) <= TOLERANCE


def test_every_layer_keeps_a_channel_and_excluded_layers_keep_all():
    torch.manual_seed(0)
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5).eval()
    x = torch.randn(4, 1, 28, 28)
    report = penni.prune_channels(copy.deepcopy(model), 0.9999, x)
    assert all(after >= 1 for _, after in report.widths.values())
    assert any(after == 1 for _, after in report.widths.values())
    with pytest.warns(RuntimeWarning, match="reached only"):  # conv2_2 (a quarter of the MACs) stays whole
        report = penni.prune_channels(model, 0.9, x, exclude=["features.conv2_2"])
    assert report.widths["features.conv2_2"] == (32, 32) and report.widths["features.conv2_1"] == (32, 32)
    small, reduction, change = shrunk_and_measured(model, x)
    assert all(w >= 1 for w in conv_widths(small).values())
    assert reduction == pytest.approx(report.reduction, abs=1e-9)
    assert change <= 1e-5


def test_least_important_channels_go_first():
    torch.manual_seed(0)
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5).eval()
    weak = [3, 7]
    with torch.no_grad():
        model.features.bn1_1.weight[weak] *= 1e-3  # the BatchNorm gammas of conv1_1's output
    x = torch.randn(4, 1, 28, 28)
    report = penni.prune_channels(model, 0.03, x)  # one conv1_1 channel is about 1.6% of the MACs
    removed = (get_mask(model.features.bn1_1, "weight") == 0).nonzero().flatten().tolist()
    assert removed == weak
    assert report.groups_removed == 2


# ----------------------------------------------------------------------------- depthwise and grouped convs

def torchvision_penni(arch: str) -> nn.Module:
    """A torchvision model with 10 classes, random BN statistics, decomposed with d=5 (mobilenet_v2:
    the stem; resnext50: every grouped 3x3 becomes a grouped PenniConv2d)."""
    torch.manual_seed(0)
    model = build_model(f"torchvision:{arch}", num_classes=10, in_channels=3)
    randomize_batchnorm(model, 1, mean_scale=0.2, bias_scale=0.3)
    return penni.decompose(model, d=5).eval()


def grouped_convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, PenniConv2d)) and m.groups > 1}


def test_channels_reach_dense_mac_target_on_mobilenet_v2_through_depthwise_convs():
    model = torchvision_penni("mobilenet_v2")
    x = torch.randn(2, 3, 64, 64)
    report = penni.prune_channels(model, 0.5, x)
    small, reduction, change = shrunk_and_measured(model, x)
    assert abs(reduction - 0.5) <= TOLERANCE, reduction
    assert reduction == pytest.approx(report.reduction, abs=1e-9)  # depthwise cost follows its channels
    assert change <= 1e-5
    depthwise_before, depthwise_after = grouped_convs(model), grouped_convs(small)
    assert set(depthwise_before) == set(depthwise_after) and len(depthwise_before) == 17
    narrower = [n for n, m in depthwise_after.items() if m.out_channels < depthwise_before[n].out_channels]
    assert len(narrower) >= 12, narrower
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise_after.values())
    # the expand conv's channels (made by a 1x1, filtered by a depthwise conv) are pruned, and the
    # depthwise rows of a removed channel are held at zero with it
    expand, dw = "features.5.conv.0.0", "features.5.conv.1.0"
    dead = (get_mask(model.get_submodule(expand), "weight").flatten(1) == 0).all(1)
    assert 0 < int(dead.sum()) < 192
    dw_dead = (get_mask(model.get_submodule(dw), "weight").flatten(1) == 0).all(1)
    assert torch.equal(dead, dw_dead)
    assert small.get_submodule(dw).out_channels == 192 - int(dead.sum())


def test_channels_reach_dense_mac_target_on_resnext50_in_matched_sets():
    model = torchvision_penni("resnext50_32x4d")
    x = torch.randn(1, 3, 32, 32)  # small: the costs scale alike at every input size
    report = penni.prune_channels(model, 0.4, x)
    small, reduction, change = shrunk_and_measured(model, x)
    assert abs(reduction - 0.4) <= TOLERANCE, reduction
    assert change <= 1e-5
    before, after = grouped_convs(model), grouped_convs(small)
    assert set(before) == set(after) and len(before) == 16
    assert all(m.groups == 32 for m in after.values())  # channels go from every group alike
    assert any(after[n].in_channels < m.in_channels for n, m in before.items())
    assert any(after[n].out_channels < m.out_channels for n, m in before.items())
    assert sum(report.removed_fraction.values()) > 0


class UnmatchableNet(nn.Module):
    """One tensor read by a 4-group and a 3-group conv: no set of its channels short of all of them
    takes the same number from every group of both, so the pruner must leave them alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 24, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(24)
        self.g4 = nn.Conv2d(24, 64, 3, padding=1, groups=4, bias=False)
        self.g3 = nn.Conv2d(24, 60, 3, padding=1, groups=3, bias=False)
        self.bn = nn.BatchNorm2d(124)
        self.head = nn.Conv2d(124, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)))
        return self.head(torch.relu(self.bn(torch.cat([self.g4(y), self.g3(y)], 1))))


def _small_net(cls: type) -> nn.Module:
    torch.manual_seed(0)
    net = cls()
    randomize_batchnorm(net, 1, mean_scale=0.2, bias_scale=0.3)
    return net.eval()


def test_small_grouped_net_prunes_matched_sets_exactly():
    net = _small_net(GroupedNet)
    x = torch.randn(2, 3, 8, 8)
    report = penni.prune_channels(net, 0.4, x)  # the old pruner raised IndexError on g's input columns
    small, reduction, change = shrunk_and_measured(net, x)
    assert abs(reduction - 0.4) <= TOLERANCE, reduction
    assert reduction == pytest.approx(report.reduction, abs=1e-9)
    assert change <= 1e-6
    assert small.g.groups == 4 and small.g.in_channels < 12 and small.dw.groups == small.dw.in_channels
    dead_a = (get_mask(net.bn_a, "weight") == 0).reshape(4, 3)  # a's channels feed g's 4 groups of 3
    assert bool((dead_a == dead_a[0]).all())                     # the same local positions in every group


def test_unmatchable_grouped_channels_are_left_alone_and_the_target_still_met():
    net = _small_net(UnmatchableNet)
    x = torch.randn(2, 3, 8, 8)
    report = penni.prune_channels(net, 0.3, x)
    small, reduction, change = shrunk_and_measured(net, x)
    assert report.widths["a"] == (24, 24) and small.a.out_channels == 24
    assert (small.g4.groups, small.g3.groups) == (4, 3)
    assert small.g4.out_channels < 64 and small.g3.out_channels < 60  # their own outputs go in matched sets
    assert abs(reduction - 0.3) <= TOLERANCE, reduction
    assert reduction == pytest.approx(report.reduction, abs=1e-9)
    assert change <= 1e-6


# ----------------------------------------------------------------------------- masks

def test_masks_hold_through_sgd_and_survive_save_load(tmp_path):
    torch.manual_seed(0)
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5)
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    report = penni.prune_channels(model.eval(), 0.5, x)
    expected = {n: a for n, (_, a) in report.widths.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 1e-3 * penni.group_l1_penalty(model)
        loss.backward()
        optimizer.step()
    bn = model.features.bn1_1
    dead = (get_mask(bn, "weight") == 0).nonzero().flatten()
    assert len(dead) > 0
    assert bool((bn.weight[dead] == 0).all()) and bool((bn.bias[dead] == 0).all())
    penni.save(model, tmp_path / "m.safetensors")
    loaded = penni.load(tmp_path / "m.safetensors").eval()
    small, _, change = shrunk_and_measured(loaded, x)
    assert change <= 1e-5
    widths = conv_widths(small)
    assert all(widths[n] == w for n, w in expected.items() if n in widths)


def test_element_wise_pruning_on_top_combines_masks(resnet18_penni):
    model = copy.deepcopy(resnet18_penni)
    x = torch.randn(2, 3, 32, 32)
    penni.prune_channels(model, 0.4, x)
    channel_zeros = penni.coefficient_sparsity(model)
    penni.prune(model, rule="std", s=1.0)
    assert penni.coefficient_sparsity(model) > channel_zeros
    _, reduction, change = shrunk_and_measured(model, x)
    assert reduction >= 0.4 - TOLERANCE
    assert change <= 1e-5


def test_bad_channel_arguments_are_clear_errors():
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5).eval()
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match="penni.prune_channels"):  # prune() is element-wise only
        penni.prune(model, rule="channels", target=0.5)
    with pytest.raises(ValueError, match="target in"):
        penni.prune_channels(model, 1.5, x)
    with pytest.raises(ValueError, match="unknown cost"):
        penni.prune_channels(model, 0.5, x, cost="flops")  # "latency" is a cost now (tests/penni/test_latency.py)
    assert penni.get_recipe(model) is not None and not list(penni.masking.iter_masks(model))


# ----------------------------------------------------------------------------- group penalty

def small_penni(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(PenniConv2d(3, 4, 3, d=2), nn.ReLU(), PenniConv2d(4, 5, 3, d=3), nn.Conv2d(5, 6, 1))
    return net.to(dtype)


def reference_group_l1(coefficient_tensors: list[torch.Tensor], dims: tuple[str, ...]) -> torch.Tensor:
    """Sum of sqrt(sum of squares) per output row / input column, written out by hand."""
    total = torch.zeros((), dtype=torch.float64)
    for c in coefficient_tensors:
        if "out" in dims:
            for o in range(c.shape[0]):
                total = total + (c[o] ** 2).sum().sqrt()
        if "in" in dims:
            for i in range(c.shape[1]):
                total = total + (c[:, i] ** 2).sum().sqrt()
    return total


@pytest.mark.parametrize("dims", [("out",), ("in",), ("out", "in")])
def test_group_penalty_value_and_gradient_match_a_hand_written_reference(dims):
    net = small_penni()
    coefficients = [net[0].coefficients, net[2].coefficients]
    got = penni.group_l1_penalty(net, dims=dims)
    grads = torch.autograd.grad(got, coefficients)
    copies = [c.detach().clone().requires_grad_(True) for c in coefficients]
    expected = reference_group_l1(copies, dims)
    expected_grads = torch.autograd.grad(expected, copies)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    if dims == ("out",):  # the closed form: d/dc ||c_o|| = c_o / ||c_o||
        c = coefficients[0].detach()
        torch.testing.assert_close(grads[0], c / c.flatten(1).norm(dim=1)[:, None, None])


class _Penalty(nn.Module):
    def __init__(self, net: nn.Module, dims: tuple[str, ...], include_pointwise: bool) -> None:
        super().__init__()
        self.net, self.dims, self.include_pointwise = net, dims, include_pointwise

    def forward(self) -> torch.Tensor:
        return penni.group_l1_penalty(self.net, self.dims, self.include_pointwise)


@pytest.mark.parametrize("include_pointwise", [False, True])
def test_group_penalty_passes_gradcheck(include_pointwise):
    penalty = _Penalty(small_penni(), ("out", "in"), include_pointwise)
    names = ["net.0.coefficients", "net.2.coefficients", "net.3.weight"]
    tensors = tuple(penalty.get_parameter(n).detach().clone().requires_grad_(True) for n in names)

    def f(*values):
        return torch.func.functional_call(penalty, dict(zip(names, values)), ())

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-8)
    pointwise_grad = torch.autograd.grad(f(*tensors), tensors[2], allow_unused=True)[0]
    assert (pointwise_grad is not None and bool(pointwise_grad.ne(0).any())) == include_pointwise


def test_group_penalty_gradient_is_finite_and_zero_at_zero_groups():
    net = small_penni(torch.float32)
    with torch.no_grad():
        net[0].coefficients[1] = 0
        net[2].coefficients[:, 2] = 0
    penni.group_l1_penalty(net, dims=("out", "in")).backward()
    for layer in (net[0], net[2]):
        assert bool(torch.isfinite(layer.coefficients.grad).all())
    assert bool((net[0].coefficients.grad[1] == 0).all())


def test_sparsity_penalty_combines_both_terms():
    net = small_penni()
    combined = penni.sparsity_penalty(net, l1=0.1, group_l1=0.2)
    expected = 0.1 * penni.l1_penalty(net) + 0.2 * penni.group_l1_penalty(net)
    assert combined.item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="dims"):
        penni.group_l1_penalty(net, dims=("rows",))
