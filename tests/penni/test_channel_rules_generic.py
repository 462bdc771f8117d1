"""The dependency analysis follows what real CNN code contains, without naming modules: functions on a module's
parameters (timm's norm + activation layers), channels-last blocks (permute, LayerNorm, Linear), chunk and
channel slicing; and prune_channels takes a custom importance."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import penni
from tests.helpers import randomize_batchnorm


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: a BatchNorm2d subclass calling F.batch_norm, then an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.relu(x)


class ChannelsLast(nn.Module):
    """A ConvNeXt-style MLP: permute to NHWC, LayerNorm over the channels, Linear, GELU, Linear, permute back."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.gelu(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))
        return x + y.permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = NormAct(8)
        self.a = nn.Conv2d(8, 12, 3, padding=1)
        self.bn_a = NormAct(12)
        self.b = nn.Conv2d(6, 8, 3, padding=1)
        self.mlp = ChannelsLast(8, 32)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        left, right = self.bn_a(self.a(x)).chunk(2, dim=1)       # position j of both halves goes together
        x = x + self.b(left * torch.sigmoid(right))[:, :8]        # a slice over all channels
        x = self.mlp(x)
        return self.head(x.mean((2, 3)))


def _net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = Net()
    randomize_batchnorm(net)
    return net.eval(), torch.randn(2, 3, 8, 8)


def test_functional_norms_chunk_and_channels_last_are_followed_and_shrink_exactly() -> None:
    net, x = _net()
    graph = penni.channel_graph(net, x)
    free = [g for g in graph.groups.values() if not g.frozen and g.producers]
    producers = {p.module for g in free for p in g.producers}
    assert {"a", "mlp.fc1"} <= producers           # chunked halves and the channels-last hidden units
    assert any(name == "bn_a" for g in free for name, _ in g.norms)  # F.batch_norm found its module
    report = penni.prune_channels(net, 0.3, x)
    assert report.groups_removed > 0
    small = penni.shrink(net, x)
    assert small.a.out_channels < 12 and small.a.out_channels % 2 == 0 and small.b.in_channels * 2 == \
        small.a.out_channels
    assert small.mlp.fc1.out_features < 32
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-6)


def _dead_rows(net: nn.Module) -> dict[str, list[int]]:
    """Output rows of every conv / linear that prune_channels zeroed."""
    return {name: m.weight.detach().flatten(1).eq(0).all(1).nonzero().flatten().tolist()
            for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_a_custom_importance_changes_which_channels_go() -> None:
    from penni.channel_pruning import _group_scores

    default_scores = {}

    def default(view, groups, graph):  # the default score, passed in as an importance
        default_scores.update(_group_scores(view, groups, graph.depthwise))
        return dict(default_scores)

    def reversed_(view, groups, graph):  # the most important groups go first
        return {gid: -score for gid, score in _group_scores(view, groups, graph.depthwise).items()}

    dead = {}
    for label, importance in (("none", None), ("default", default), ("reversed", reversed_)):
        net, x = _net()
        penni.prune_channels(net, 0.3, x, importance=importance)
        dead[label] = _dead_rows(net)
    assert dead["none"] == dead["default"]
    assert dead["reversed"] != dead["none"]
    net, x = _net()
    try:
        penni.prune_channels(net, 0.3, x, importance=lambda view, groups, graph: {})
    except ValueError as err:
        assert "no score" in str(err)
    else:
        raise AssertionError("an importance that scores no group must be refused")
