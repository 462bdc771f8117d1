"""shrink(): exact in eval mode, really smaller, coupling from the fx trace, recipe replayable."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import penni
from penni.conv import PenniConv2d
from penni.dependency import channel_graph
from penni.models import build_model
from penni.shrinking import shrink, shrink_with_report
from penni.slicing import slice_in, slice_out
from tests.helpers import kill_in, kill_out
from tests.helpers import randomize_batchnorm as _randomize

# ----------------------------------------------------------------------------- helpers



def randomize_batchnorm(model, seed: int = 1) -> None:
    _randomize(model, seed, mean_scale=0.2, bias_scale=0.3)

def sparsify(model: nn.Module, fraction: float = 0.9, seed: int = 2) -> None:
    """Zero ``fraction`` of every PenniConv2d's coefficients at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in penni.penni_layers(model).values():
            keep = torch.rand(layer.coefficients.shape, generator=g) >= fraction
            layer.coefficients.mul_(keep)


def bn_constant(model: nn.Module, name: str, channels, value: float, pre: float = 0.0) -> None:
    """Make BN map the constant ``pre`` (a dead conv's output) to ``value`` on ``channels``."""
    bn = model.get_submodule(name)
    with torch.no_grad():
        for c in channels:
            scale = bn.weight[c] / torch.sqrt(bn.running_var[c] + bn.eps)
            bn.bias[c] = value - (pre - bn.running_mean[c]) * scale


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def width(model: nn.Module, name: str, attr: str) -> int:
    return getattr(model.get_submodule(name), attr)


def check_recipe(original: nn.Module, small: nn.Module) -> None:
    """Kept indices are sorted, unique, inside the original widths, and match the new shapes."""
    recipe = penni.get_recipe(small)
    assert recipe.kept, "shrink recorded nothing"
    for name, axes in recipe.kept.items():
        before, after = original.get_submodule(name), small.get_submodule(name)
        for axis, kept in axes.items():
            assert kept == sorted(set(kept)), (name, axis)
            if isinstance(after, nn.BatchNorm2d):
                assert (axis, len(kept)) == ("out", after.num_features) and kept[-1] < before.num_features
            elif isinstance(after, nn.Linear):
                attr = "out_features" if axis == "out" else "in_features"
                n_new, n_old = getattr(after, attr), getattr(before, attr)
                assert len(kept) == n_new and kept[-1] < n_old, (name, axis)
            elif isinstance(after, (nn.Conv2d, PenniConv2d)):
                if axis == "basis":
                    assert len(kept) == after.d and kept[-1] < before.d
                else:
                    attr = "out_channels" if axis == "out" else "in_channels"
                    assert len(kept) == getattr(after, attr) and kept[-1] < getattr(before, attr), (name, axis)
            else:  # ChannelPadShortcut: its own zero channels
                assert axis == "out" and len(kept) == after.pad_before + after.pad_after
                assert kept[-1] < before.pad_before + before.pad_after


# ----------------------------------------------------------------------------- model scenarios
# Each scenario kills channels / bases in a decomposed model and returns
# (expected widths {(layer, attribute): value}, layers whose bias must absorb a constant).

def scenario_vgg16(m):
    # dead outputs whose BN constant is <= 0: ReLU makes them 0, so the padded conv2_1 loses them
    kill_out(m, "features.conv1_2", [0, 1, 2])
    bn_constant(m, "features.bn1_2", [0, 1, 2], -0.5)
    # dead outputs with a positive constant: max-pool, global pool, flatten -> folded into the head
    kill_out(m, "features.conv5_3", range(5))
    bn_constant(m, "features.bn5_3", range(5), 0.7)
    # consumer side: nobody reads conv2_2's channels 5, 6
    kill_in(m, "features.conv3_1", [5, 6])
    with torch.no_grad():
        m.features.conv4_1.coefficients[:, :, 2] = 0
    return {
        ("features.conv1_2", "out_channels"): 61, ("features.bn1_2", "num_features"): 61,
        ("features.conv2_1", "in_channels"): 61,
        ("features.conv5_3", "out_channels"): 507, ("features.bn5_3", "num_features"): 507,
        ("classifier", "in_features"): 507,
        ("features.conv2_2", "out_channels"): 126, ("features.conv3_1", "in_channels"): 126,
        ("features.conv4_1", "d"): 4, ("features.conv4_2", "d"): 5,
    }, {"classifier"}


def _resnet_stage4(m, channels, blocks=("layer4.0", "layer4.1")):
    """Kill a residual-stream channel in every producer of the last stage (the 1x1 shortcut conv and
    every block's conv2) and in the padded consumers, so only the head reads its (positive) constant."""
    kill_out(m, "layer4.0.downsample.0", channels)
    bn_constant(m, "layer4.0.downsample.1", channels, 0.2)
    for b in blocks:
        kill_out(m, f"{b}.conv2", channels)
        bn_constant(m, f"{b}.bn2", channels, 0.1)
    for b in blocks[1:]:
        kill_in(m, f"{b}.conv1", channels)


def scenario_resnet18(m):
    _resnet_stage4(m, [3, 7])
    kill_out(m, "layer2.0.conv1", range(4))
    bn_constant(m, "layer2.0.bn1", range(4), -0.2)
    kill_in(m, "layer3.1.conv2", [0, 1])
    with torch.no_grad():
        m.layer1[0].conv1.coefficients[:, :, 0] = 0
    return {
        ("layer4.0.downsample.0", "out_channels"): 510, ("layer4.0.downsample.1", "num_features"): 510,
        ("layer4.0.conv2", "out_channels"): 510, ("layer4.1.bn2", "num_features"): 510,
        ("layer4.1.conv1", "in_channels"): 510, ("fc", "in_features"): 510,
        ("layer2.0.conv1", "out_channels"): 124, ("layer2.0.conv2", "in_channels"): 124,
        ("layer3.1.conv1", "out_channels"): 254, ("layer3.1.bn1", "num_features"): 254,
        ("layer1.0.conv1", "d"): 4,
    }, {"fc"}


def scenario_resnet56(m):
    # stage 3 channels 0 and 63 are the option-A shortcut's zero pad: dead in all nine conv2s
    for i in range(9):
        kill_out(m, f"layer3.{i}.conv2", [0, 63])
        bn_constant(m, f"layer3.{i}.bn2", [0, 63], 0.1 * (i + 1))
        if i:
            kill_in(m, f"layer3.{i}.conv1", [0, 63])
    kill_out(m, "layer2.3.conv1", [1, 2])
    bn_constant(m, "layer2.3.bn1", [1, 2], -1.0)
    with torch.no_grad():
        m.layer1[0].conv2.coefficients[:, :, 4] = 0
    return {
        ("layer3.0.downsample", "pad_before"): 15, ("layer3.0.downsample", "pad_after"): 15,
        ("layer3.4.conv2", "out_channels"): 62, ("layer3.8.bn2", "num_features"): 62,
        ("layer3.5.conv1", "in_channels"): 62, ("fc", "in_features"): 62,
        ("layer3.0.conv1", "in_channels"): 32,
        ("layer2.3.conv1", "out_channels"): 30, ("layer2.3.conv2", "in_channels"): 30,
        ("layer1.0.conv2", "d"): 4,
    }, {"fc"}


def scenario_tv_resnet18(m):
    _resnet_stage4(m, [3, 7])
    # stage-1 stream (stem conv, max-pool, two blocks): dead everywhere with constant 0 after ReLU,
    # read by padded 3x3 convs and the 1x1 shortcut of layer2 -> removable since the constant is 0
    kill_out(m, "conv1", [5, 9])
    bn_constant(m, "bn1", [5, 9], -0.5)
    for b in ("layer1.0", "layer1.1"):
        kill_out(m, f"{b}.conv2", [5, 9])
        bn_constant(m, f"{b}.bn2", [5, 9], -0.5)
    with torch.no_grad():
        m.layer2[1].conv2.coefficients[:, :, 3] = 0
    return {
        ("layer4.0.downsample.0", "out_channels"): 510, ("fc", "in_features"): 510,
        ("layer4.1.conv1", "in_channels"): 510,
        ("conv1", "out_channels"): 62, ("bn1", "num_features"): 62, ("layer1.1.conv2", "out_channels"): 62,
        ("layer1.0.conv1", "in_channels"): 62, ("layer2.0.conv1", "in_channels"): 62,
        ("layer2.0.downsample.0", "in_channels"): 62,
        ("layer2.1.conv2", "d"): 4,
    }, {"fc"}


def scenario_tv_resnet50(m):
    # bottleneck: dead 3x3 outputs with a positive constant, read by a 1x1 conv (no bias): folded
    kill_out(m, "layer1.0.conv2", range(4))
    bn_constant(m, "layer1.0.bn2", range(4), 0.4)
    # last stage stream: all four 1x1 producers dead; 1x1 consumers and the head absorb the constant
    channels = [10, 20]
    kill_out(m, "layer4.0.downsample.0", channels)
    bn_constant(m, "layer4.0.downsample.1", channels, 0.2)
    for i in range(3):
        kill_out(m, f"layer4.{i}.conv3", channels)
        bn_constant(m, f"layer4.{i}.bn3", channels, 0.1)
    kill_in(m, "layer2.0.conv3", range(8))
    with torch.no_grad():
        m.layer3[0].conv2.coefficients[:, :, 1] = 0
    return {
        ("layer1.0.conv2", "out_channels"): 60, ("layer1.0.conv3", "in_channels"): 60,
        ("layer4.0.downsample.0", "out_channels"): 2046, ("layer4.2.bn3", "num_features"): 2046,
        ("layer4.1.conv1", "in_channels"): 2046, ("layer4.2.conv1", "in_channels"): 2046,
        ("fc", "in_features"): 2046,
        ("layer2.0.conv2", "out_channels"): 120, ("layer2.0.conv3", "in_channels"): 120,
        ("layer3.0.conv2", "d"): 4,
    }, {"layer1.0.conv3", "layer4.1.conv1", "layer4.2.conv1", "fc"}


MODELS = [
    ("vgg16", 32, scenario_vgg16),
    ("resnet18", 32, scenario_resnet18),
    ("resnet56", 32, scenario_resnet56),
    ("torchvision:resnet18", 64, scenario_tv_resnet18),
    ("torchvision:resnet50", 64, scenario_tv_resnet50),
]


@pytest.mark.parametrize("arch,size,scenario", MODELS, ids=[m[0] for m in MODELS])
def test_shrink_is_exact_and_smaller(arch, size, scenario, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=3)
    randomize_batchnorm(model)
    penni.decompose(model, d=5)
    model.eval()
    sparsify(model, 0.9)
    expected_widths, folded = scenario(model)
    x = torch.randn(2, 3, size, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    architecture = copy.deepcopy(model)  # un-shrunk shapes, for the recipe checks

    small, report = shrink_with_report(model, x)

    with torch.no_grad():
        expected, got = model(x), small(x)
    assert rel_err(got, expected) <= 1e-5
    assert report.converged and report.params_after < report.params_before
    widths = {key: width(small, *key) for key in expected_widths}
    assert widths == expected_widths
    assert folded <= set(report.folded), report.folded
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not penni.get_recipe(model).kept
    assert not small.training
    # the recipe alone rebuilds the small model
    check_recipe(architecture, small)
    penni.save(small, tmp_path / "small.safetensors")  # penni.load rebuilds it from the recipe alone
    rebuilt = penni.load(tmp_path / "small.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), got)


# ----------------------------------------------------------------------------- small cases

def _sequential() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),   # 0 1 2
        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),              # 3 4 5: 1x1, no padding
        nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),                                  # 6 7: padded 3x3
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4),                   # 8 9 10
    )
    randomize_batchnorm(net)
    penni.decompose(net, d=4)
    return net.eval()


@pytest.mark.parametrize("mode", penni.FORWARD_MODES)
def test_constant_channel_is_folded_into_a_1x1_consumer_and_kept_before_a_padded_conv(mode):
    net = _sequential()
    kill_out(net, "0", [2, 5])
    bn_constant(net, "1", [2, 5], 0.8)      # constant 0.8 read by the 1x1 conv "3": folded, removed
    kill_out(net, "3", [1])
    bn_constant(net, "4", [1], 0.6)         # constant 0.6 read by the padded conv "6": must stay
    kill_out(net, "3", [4])
    bn_constant(net, "4", [4], -0.3)        # constant 0 after ReLU: the padded conv loses nothing
    penni.set_forward_mode(net, mode)
    x = torch.randn(3, 3, 12, 12)
    assert net[3].bias is None
    small, report = shrink_with_report(net, x)
    with torch.no_grad():
        assert rel_err(small(x), net(x)) <= 1e-6
    assert small[0].out_channels == 6 and small[1].num_features == 6 and small[3].in_channels == 6
    assert small[3].bias is not None and "3" in penni.get_recipe(small).added_bias
    assert small[3].out_channels == 5 and small[6].in_channels == 5  # channel 1 kept, channel 4 gone
    assert any("6" in line and "padded" in line for line in report.kept_constant), report.kept_constant
    assert report.folded == {"3": 2}


def test_the_reference_behaviour_would_not_be_exact():
    """Dropping the constant channel without folding (the reference) changes the output."""
    net = _sequential()
    kill_out(net, "0", [2])
    bn_constant(net, "1", [2], 0.8)
    x = torch.randn(2, 3, 12, 12)
    dropped = copy.deepcopy(net)
    keep = [c for c in range(8) if c != 2]
    slice_out(dropped[0], keep), slice_out(dropped[1], keep), slice_in(dropped[3], keep)
    with torch.no_grad():
        assert rel_err(dropped(x), net(x)) > 1e-3
        assert rel_err(shrink(net, x)(x), net(x)) <= 1e-6


class Branchy(nn.Module):
    """Concatenation, a residual sum, functional ops, a flatten with H*W > 1 and a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(9, 6, 1)
        self.d = nn.Conv2d(9, 6, 1)
        self.e = nn.Conv2d(3, 4, 1)
        self.g = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(6 * 2 * 2, 3)
        self.h = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
        z = F.max_pool2d(F.relu(self.c(y) + self.d(y)), 4)
        u = self.g(self.e(x)).mean((2, 3))
        return self.fc(z.view(z.size(0), -1)) + self.h(u)


def test_concat_residual_flatten_and_grouped_conv():
    torch.manual_seed(0)
    net = Branchy().eval()
    kill_in(net, "fc", range(8, 12))       # channel 2 of z (features 8..11) is read by nobody
    kill_in(net, "c", [6])
    kill_in(net, "d", [6])                 # concat position 6 = b's channel 2
    kill_out(net, "c", [4])                # only one branch of the residual sum: must stay
    kill_out(net, "e", [1])                # its bias, read by a zero-padded grouped conv: must stay
    x = torch.randn(2, 3, 8, 8)
    graph = channel_graph(net, x)
    assert graph.group_of("c", "out", 3) is graph.group_of("d", "out", 3)   # residual union
    assert graph.slots["c"]["in"][4:] == graph.slots["b"]["out"]             # concat positions
    assert graph.slots["fc"]["in"][8:12] == [graph.slots["c"]["out"][2]] * 4  # flatten blocks
    assert graph.conv_groups == {"g": 2} and not graph.group_of("e", "out", 1).frozen
    small = shrink(net, x)
    with torch.no_grad():
        assert rel_err(small(x), net(x)) <= 1e-6
    assert (small.c.out_channels, small.d.out_channels, small.fc.in_features) == (5, 5, 20)
    assert (small.b.out_channels, small.c.in_channels, small.d.in_channels) == (4, 8, 8)
    assert small.a.out_channels == 4 and small.e.out_channels == 4


def test_masks_are_baked_and_mode_is_restored():
    net = _sequential()
    with torch.no_grad():
        mask = torch.ones_like(net[6].coefficients)
        mask[:, 2] = 0                      # held mask: nobody reads channel 2 of conv "3"
    penni.hold_mask(net[6], "coefficients", mask)
    net.train()
    x = torch.randn(2, 3, 12, 12)
    small = shrink(net, x)
    assert small.training and all(m.training for m in small.modules())
    assert small[3].out_channels == 5 and small[6].in_channels == 5
    assert penni.masking.get_mask(small[6], "coefficients") is None
    assert penni.masking.get_mask(net[6], "coefficients") is not None  # the input keeps its mask
    net.eval(), small.eval()
    with torch.no_grad():
        assert rel_err(small(x), net(x)) <= 1e-6


class Opaque(nn.Module):
    """Channel slicing and a hard-coded view: the analysis cannot follow them, so it keeps them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.fa = nn.Linear(3, 2)
        self.fb = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        first = self.a(x)[:, :3].mean((2, 3))
        return self.fa(first) + self.fb(self.b(x).view(-1, 64))


def test_untraceable_channel_ops_freeze_their_channels():
    torch.manual_seed(0)
    net = Opaque().eval()
    kill_in(net, "fa", [0])
    kill_in(net, "fb", range(16))           # channel 0 of b, but behind a hard-coded view
    x = torch.randn(2, 3, 4, 4)
    graph = channel_graph(net, x)
    assert graph.group_of("a", "out", 0).frozen and graph.group_of("b", "out", 0).frozen
    assert graph.group_of("fb", "out", 0).frozen == "model output"
    small = shrink(net, x)
    assert (small.a.out_channels, small.b.out_channels, small.fb.in_features) == (6, 4, 64)
    with torch.no_grad():
        assert rel_err(small(x), net(x)) <= 1e-6
