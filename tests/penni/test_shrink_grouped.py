"""shrink() through depthwise and grouped convs: exact, and really narrower."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import penni
from penni.conv import PenniConv2d
from penni.dependency import channel_graph
from penni.models import build_model
from penni.shrinking import shrink, shrink_with_report
from tests.helpers import GroupedNet, kill_in, kill_out, randomize_batchnorm

# ----------------------------------------------------------------------------- helpers

def bn_constant(model: nn.Module, name: str, channels, value: float) -> None:
    """BatchNorm maps a dead conv's output (0) to ``value`` on ``channels``; 0: weight and bias zero."""
    bn = model.get_submodule(name)
    with torch.no_grad():
        for c in channels:
            if value == 0:
                bn.weight[c], bn.bias[c] = 0.0, 0.0
            else:
                bn.bias[c] = value + bn.running_mean[c] * bn.weight[c] / torch.sqrt(bn.running_var[c] + bn.eps)


def kill_channels(model: nn.Module, conv: str, bn: str, channels, value: float = 0.0) -> None:
    """What a channel pruner leaves: the conv rows and the BatchNorm channel zeroed."""
    kill_out(model, conv, channels)
    bn_constant(model, bn, channels, value)


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def widths(model: nn.Module, keys) -> dict:
    return {(name, attr): getattr(model.get_submodule(name), attr) for name, attr in keys}


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=3)
    randomize_batchnorm(model, 1, mean_scale=0.2, bias_scale=0.3)
    penni.decompose(model, d=5)  # mobilenet_v2: the stem; resnext: every grouped 3x3 (PenniConv2d groups=32)
    return model.eval()


def pick(n: int, fraction: float, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:round(n * fraction)].tolist())


# ----------------------------------------------------------------------------- scenarios

def scenario_mobilenet_v2(m: nn.Module) -> dict:
    """~30% of pointwise outputs killed; the depthwise convs behind them must lose them too."""
    kill_channels(m, "features.0.0", "features.0.1", range(10))            # stem (PenniConv2d) -> depthwise 32
    kill_channels(m, "features.1.conv.1", "features.1.conv.2", [0, 3, 7, 11, 12])  # a project conv
    kill_channels(m, "features.2.conv.0.0", "features.2.conv.0.1", pick(96, 0.3, 3))  # expand -> dw
    kill_in(m, "features.3.conv.2", range(40))                             # nobody reads 40 dw outputs
    # a non-zero constant through a zero-padded depthwise conv is not constant: kept
    kill_channels(m, "features.4.conv.0.0", "features.4.conv.0.1", [0, 1, 2], value=0.5)
    # ... unless the depthwise rows are dead too
    kill_channels(m, "features.5.conv.0.0", "features.5.conv.0.1", range(5), value=0.5)
    kill_out(m, "features.5.conv.1.0", range(5))
    return {
        ("features.0.0", "out_channels"): 22, ("features.0.1", "num_features"): 22,
        ("features.1.conv.0.0", "in_channels"): 22, ("features.1.conv.0.0", "out_channels"): 22,
        ("features.1.conv.0.0", "groups"): 22, ("features.1.conv.0.1", "num_features"): 22,
        ("features.1.conv.1", "in_channels"): 22, ("features.1.conv.1", "out_channels"): 11,
        ("features.2.conv.0.0", "in_channels"): 11, ("features.2.conv.0.0", "out_channels"): 67,
        ("features.2.conv.1.0", "out_channels"): 67, ("features.2.conv.1.0", "groups"): 67,
        ("features.2.conv.1.1", "num_features"): 67, ("features.2.conv.2", "in_channels"): 67,
        ("features.3.conv.0.0", "out_channels"): 104, ("features.3.conv.1.0", "out_channels"): 104,
        ("features.3.conv.2", "in_channels"): 104,
        ("features.4.conv.1.0", "out_channels"): 144,
        ("features.5.conv.1.0", "out_channels"): 187, ("features.5.conv.2", "in_channels"): 187,
    }


def _every_group(width: int, groups: int, local) -> list[int]:
    per = width // groups
    return [g * per + j for g in range(groups) for j in local]


def scenario_resnext50(m: nn.Module) -> dict:
    """Whole groups, matched channels in every group, different positions per group, one group only."""
    # layer1.0: group 3 (channels 12..15) dead on both sides of the grouped conv -> 31 groups
    kill_channels(m, "layer1.0.conv1", "layer1.0.bn1", range(12, 16))
    kill_channels(m, "layer1.0.conv2", "layer1.0.bn2", range(12, 16))
    # layer2.0 (8 per group): outputs 1 and 5 of every group (constant 0.3, folded into conv3);
    # inputs 2 of every group
    kill_channels(m, "layer2.0.conv2", "layer2.0.bn2", _every_group(256, 32, [1, 5]), value=0.3)
    kill_channels(m, "layer2.0.conv1", "layer2.0.bn1", _every_group(256, 32, [2]))
    # layer3.1 (16 per group): one input per group, at a different position in each group
    kill_channels(m, "layer3.1.conv1", "layer3.1.bn1", [g * 16 + g % 16 for g in range(32)])
    # dead channels in only one group: the grouped conv keeps them
    kill_channels(m, "layer3.0.conv1", "layer3.0.bn1", [0, 1])
    kill_channels(m, "layer4.0.conv2", "layer4.0.bn2", [5 * 32, 5 * 32 + 1, 5 * 32 + 2])
    return {
        ("layer1.0.conv1", "out_channels"): 124, ("layer1.0.bn1", "num_features"): 124,
        ("layer1.0.conv2", "in_channels"): 124, ("layer1.0.conv2", "out_channels"): 124,
        ("layer1.0.conv2", "groups"): 31, ("layer1.0.conv3", "in_channels"): 124,
        ("layer2.0.conv2", "out_channels"): 192, ("layer2.0.conv2", "in_channels"): 224,
        ("layer2.0.conv2", "groups"): 32, ("layer2.0.bn2", "num_features"): 192,
        ("layer2.0.conv3", "in_channels"): 192, ("layer2.0.conv1", "out_channels"): 224,
        ("layer3.1.conv1", "out_channels"): 480, ("layer3.1.conv2", "in_channels"): 480,
        ("layer3.1.conv2", "out_channels"): 512,
        ("layer3.0.conv1", "out_channels"): 512, ("layer3.0.conv2", "in_channels"): 512,
        ("layer4.0.conv2", "out_channels"): 1024, ("layer4.0.conv3", "in_channels"): 1024,
    }


MODELS = [
    ("torchvision:mobilenet_v2", scenario_mobilenet_v2, {"features.2.conv.2", "features.5.conv.2"}),
    ("torchvision:resnext50_32x4d", scenario_resnext50, {"layer2.0.conv3"}),
]


def _conv_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (m.in_channels, m.out_channels) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, PenniConv2d))}


@pytest.mark.parametrize("arch,scenario,folded", MODELS, ids=["mobilenet_v2", "resnext50_32x4d"])
def test_shrink_through_depthwise_and_grouped_convs_is_exact_and_narrower(arch, scenario, folded, tmp_path):
    model = build(arch)
    expected = scenario(model)
    x = torch.randn(2, 3, 64, 64)
    small, report = shrink_with_report(model, x)
    with torch.no_grad():
        reference, got = model(x), small(x)
    assert rel_err(got, reference) <= 1e-5
    assert report.converged
    assert widths(small, expected) == expected
    assert folded <= set(report.folded), report.folded
    before = penni.profile(model, x).dense_macs
    after = penni.profile(small, x).dense_macs
    assert after < before
    penni.save(small, tmp_path / "small.safetensors")  # the recipe replays grouped slicing
    rebuilt = penni.load(tmp_path / "small.safetensors").eval()
    assert _conv_widths(rebuilt) == _conv_widths(small)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), got)


def test_a_constant_behind_a_zero_padded_depthwise_conv_is_reported():
    model = build("torchvision:mobilenet_v2")
    kill_channels(model, "features.4.conv.0.0", "features.4.conv.0.1", [0, 1, 2], value=0.5)
    x = torch.randn(2, 3, 64, 64)
    small, report = shrink_with_report(model, x)
    assert small.get_submodule("features.4.conv.1.0").out_channels == 144
    assert any("depthwise conv features.4.conv.1.0" in line for line in report.kept_constant), report.kept_constant
    with torch.no_grad():
        assert rel_err(small(x), model(x)) <= 1e-5


def _is_rounded(n: int, full: int, multiple: int) -> bool:
    return n == full or n % multiple == 0


def test_round_to_keeps_widths_multiples_and_stays_exact():
    model = build("torchvision:mobilenet_v2")
    scenario_mobilenet_v2(model)
    x = torch.randn(2, 3, 64, 64)
    small = shrink(model, x, round_to=8)
    with torch.no_grad():
        assert rel_err(small(x), model(x)) <= 1e-5
    full, got = _conv_widths(model), _conv_widths(small)
    for name, (cin, cout) in got.items():
        assert _is_rounded(cin, full[name][0], 8) and _is_rounded(cout, full[name][1], 8), (name, got[name])
    assert widths(small, [("features.0.0", "out_channels"), ("features.1.conv.1", "out_channels"),
                          ("features.2.conv.1.0", "out_channels"), ("features.3.conv.1.0", "out_channels"),
                          ("features.5.conv.1.0", "out_channels")]) == {
        ("features.0.0", "out_channels"): 24, ("features.1.conv.1", "out_channels"): 16,
        ("features.2.conv.1.0", "out_channels"): 72, ("features.3.conv.1.0", "out_channels"): 104,
        ("features.5.conv.1.0", "out_channels"): 192}
    assert sum(a[1] for a in got.values()) < sum(a[1] for a in full.values())


# ----------------------------------------------------------------------------- small cases

def _grouped_net() -> GroupedNet:
    torch.manual_seed(0)
    net = GroupedNet()
    randomize_batchnorm(net, 1, mean_scale=0.2, bias_scale=0.3)
    return net.eval()


def test_dead_channels_in_one_group_only_are_kept_exactly():
    net = _grouped_net()
    kill_channels(net, "a", "bn_a", [0, 1])      # group 0 only: the grouped conv keeps its width
    x = torch.randn(2, 3, 8, 8)
    graph = channel_graph(net, x)
    assert graph.conv_groups == {"g": 4, "dw": 6} and graph.depthwise == {"dw": 2}
    assert not graph.group_of("a", "out", 0).frozen
    small = shrink(net, x)
    assert (small.a.out_channels, small.g.in_channels, small.g.groups) == (12, 12, 4)
    with torch.no_grad():
        assert rel_err(small(x), net(x)) <= 1e-6


def test_whole_group_and_depthwise_multiplier_channels_go_together():
    net = _grouped_net()
    kill_channels(net, "a", "bn_a", [3, 4, 5])   # all inputs of group 1 ...
    kill_channels(net, "g", "bn_g", [2, 3])      # ... and its outputs: the group goes
    kill_channels(net, "b", "bn_b", [4])         # depthwise input 4 -> its outputs 8 and 9 go with it
    x = torch.randn(2, 3, 8, 8)
    graph = channel_graph(net, x)
    assert graph.slots["dw"]["out"][8:10] == [graph.slots["dw"]["in"][4]] * 2
    assert [p.kind for p in graph.group_of("dw", "in", 4).producers] == ["weights", "depthwise", "depthwise"]
    small = shrink(net, x)
    assert (small.a.out_channels, small.g.in_channels, small.g.out_channels, small.g.groups) == (9, 9, 6, 3)
    assert (small.b.out_channels, small.dw.in_channels, small.dw.out_channels, small.dw.groups) == (5, 5, 10, 5)
    assert small.head.in_channels == 10
    with torch.no_grad():
        assert rel_err(small(x), net(x)) <= 1e-6


def test_uneven_dead_inputs_keep_the_widest_group():
    net = _grouped_net()
    kill_channels(net, "a", "bn_a", [0, 1, 4, 7, 10])   # group 0 loses 2, groups 1-3 lose 1 each
    x = torch.randn(2, 3, 8, 8)
    small = shrink(net, x)
    assert (small.a.out_channels, small.g.in_channels, small.g.groups) == (8, 8, 4)
    with torch.no_grad():
        assert rel_err(small(x), net(x)) <= 1e-6


def test_round_to_must_be_a_positive_int():
    net = _grouped_net()
    with pytest.raises(ValueError, match="round_to"):
        shrink(net, torch.randn(1, 3, 8, 8), round_to=0)


def test_squeeze_excitation_and_stochastic_depth_are_followed():
    """EfficientNet: the SE gate multiplies the depthwise output channel-wise (one group), and
    torchvision's stochastic_depth passes channels through; a channel nobody reads goes everywhere."""
    torch.manual_seed(0)
    model = build_model("torchvision:efficientnet_b0", num_classes=10, in_channels=3)
    randomize_batchnorm(model, 1, mean_scale=0.2, bias_scale=0.3)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    graph = channel_graph(model, x)
    assert all(g.frozen in (None, "model output") or g.frozen.startswith("model input")
               for g in graph.groups.values()), [g.frozen for g in graph.groups.values() if g.frozen][:3]
    block = "features.1.0.block"
    assert graph.group_of(f"{block}.1.fc2", "out", 3) is graph.group_of(f"{block}.0.0", "out", 3)
    assert graph.group_of(f"{block}.0.0", "out", 3) is graph.group_of("features.0.0", "out", 3)
    kill_in(model, f"{block}.2.0", range(8))      # the project conv and the SE squeeze ignore 8 channels
    kill_in(model, f"{block}.1.fc1", range(8))
    small = shrink(model, x)
    with torch.no_grad():
        assert rel_err(small(x), model(x)) <= 1e-5
    assert widths(small, [("features.0.0", "out_channels"), (f"{block}.0.0", "groups"),
                          (f"{block}.1.fc1", "in_channels"), (f"{block}.1.fc2", "out_channels"),
                          (f"{block}.2.0", "in_channels")]) == {
        ("features.0.0", "out_channels"): 24, (f"{block}.0.0", "groups"): 24,
        (f"{block}.1.fc1", "in_channels"): 24, (f"{block}.1.fc2", "out_channels"): 24,
        (f"{block}.2.0", "in_channels"): 24}
