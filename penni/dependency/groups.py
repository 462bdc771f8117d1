"""What the dependency analysis finds: channel groups, their producers, norms and consumers."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Producer:
    """Output slot ``index`` of ``module``; ``kind``: "weights" (conv/linear row), "zero" (a rule's
    exactly-zero channel), "opaque" (a rule's channel of unknown value) or "depthwise" (a row of a
    depthwise conv that filters the group's channel: it creates no new channel, but a pruner that
    kills the group should zero it too)."""
    module: str
    index: int
    kind: str


@dataclass(frozen=True)
class ConsumerUse:
    """Call ``node`` of ``module`` reads the group at input ``positions`` (Linear: in-features)."""
    node: str
    module: str
    positions: tuple[int, ...]


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together."""
    id: int
    producers: list[Producer] = field(default_factory=list)
    norms: list[tuple[str, int]] = field(default_factory=list)        # (BatchNorm name, channel)
    consumers: list[ConsumerUse] = field(default_factory=list)
    frozen: str | None = None     # why the group must be kept (None: it may go)
    const_safe: bool = True       # False when an op on the way breaks constancy (e.g. zero padding)


@dataclass
class InputStats:
    """Per input position of a consumer call on the example inputs: mean over batch and space
    and the largest absolute deviation from it (float64)."""
    mean: torch.Tensor
    deviation: torch.Tensor


@dataclass
class ChannelGraph:
    """Result of :func:`channel_graph`.

    ``slots[module][axis]`` is the group id of every position of a sliceable module:
    axis "out" (conv/linear outputs, BatchNorm channels, a rule module's own channels) and
    "in" (conv/linear inputs). ``kinds[module]`` is "conv", "linear", "norm" or "rule".
    ``conv_groups[module]`` is the ``groups`` of every traced conv with ``groups > 1`` and
    ``depthwise[module]`` the channel multiplier ``k`` of those that are depthwise (input channel
    ``c`` and output channels ``k*c .. k*c+k-1`` are in one group).
    """
    graph_module: fx.GraphModule
    groups: dict[int, ChannelGroup]
    slots: dict[str, dict[str, list[int]]]
    kinds: dict[str, str]
    node_groups: dict[str, list[int] | None]
    input_stats: dict[str, InputStats]
    conv_groups: dict[str, int] = field(default_factory=dict)
    depthwise: dict[str, int] = field(default_factory=dict)

    def group_of(self, module: str, axis: str, index: int) -> ChannelGroup:
        return self.groups[self.slots[module][axis][index]]

    def describe(self) -> str:
        lines = []
        for g in self.groups.values():
            prods = ", ".join(f"{p.module}[{p.index}]" for p in g.producers[:4])
            more = "..." if len(g.producers) > 4 else ""
            cons = ", ".join(sorted({c.module for c in g.consumers}))
            state = f"frozen ({g.frozen})" if g.frozen else "free"
            lines.append(f"group {g.id}: {state}; producers {prods}{more}; consumers {cons}")
        return "\n".join(lines)
