"""prune_channels(): remove whole coupled channel groups until the dense-executable MACs (or parameters) fall by a target.

Element pruning is :func:`penni.prune`; the masks of the two combine. Groups come from ``penni.channel_graph``
(what is coupled), are scored by the norms of their weights (how to score) and removed by zeroing held masks that
``shrink`` then turns into narrower layers (how to slice). Depthwise convs lose the channels their input loses; a
grouped conv's channels go in matched sets (local position ``j`` of every group at once), the only removal
``shrink`` realizes exactly without dropping whole groups.
"""
from __future__ import annotations

import copy
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .conv import PenniConv2d
from .dependency import ChannelGraph, ChannelGroup, channel_graph
from .latency import LatencySettings, greedy_by_ratio, latency_table, measure_model, select_to_speedup
from .masking import bake_masks, hold_mask
from .profiling import profile
from .shrinking import shrink

#: ``importance(view, groups, graph) -> {group id: score}``: how ``prune_channels`` ranks channel groups (lowest
#: goes first; Torch-Pruning's ``Importance``). ``view`` is an eval-mode copy of the model with masks baked,
#: ``groups`` the prunable :class:`~penni.dependency.ChannelGroup` s, ``graph`` the ``ChannelGraph``.
Importance = Callable[[nn.Module, "list[ChannelGroup]", ChannelGraph], "dict[int, float]"]
CHANNEL_COSTS: tuple[str, ...] = ("dense_macs", "params", "latency")

@dataclass
class ChannelPruneReport:
    """What ``prune_channels`` did. Costs are per input image (MACs) or counts (params).

    ``cost_before``/``cost_after`` are computed from the channel graph (a layer's cost scales
    with its kept output x input widths); ``reduction`` is ``1 - after / before``, which
    ``penni.shrink`` followed by ``penni.profile`` reproduces. ``widths[layer] = (before, after)``
    output channels; ``removed_fraction[layer]`` the fraction of output channels removed.
    """

    cost: str
    target: float
    cost_before: float
    cost_after: float
    groups_total: int
    groups_prunable: int
    groups_removed: int
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: cost="latency": baseline_ms / pruned_ms / speedup per batch size (measured), round_to, rounds
    latency: dict = field(default_factory=dict)

    @property
    def reduction(self) -> float:
        return 1.0 - self.cost_after / self.cost_before if self.cost_before else 0.0

    @property
    def removed_fraction(self) -> dict[str, float]:
        return {name: 1.0 - after / before for name, (before, after) in self.widths.items()}

    def summary(self) -> str:
        lines = [f"prune channels: {self.cost} {self.cost_before:.4g} -> {self.cost_after:.4g} "
                 f"({100 * self.reduction:.1f}% fewer, target {100 * self.target:.1f}%); "
                 f"{self.groups_removed} of {self.groups_prunable} prunable channel groups removed"]
        lines += [f"  {name}: {b} -> {a}" for name, (b, a) in self.widths.items() if a != b]
        return "\n".join(lines)


@dataclass
class _LayerCost:
    """Cost of one layer as a function of its kept widths: ``full * ko/out * ki/in + linear * ko/out``."""
    full: float
    linear: float
    out: int
    inp: int
    kept_out: int = 0
    kept_in: int = 0
    curve: Callable[[int, int], float] | None = None  # cost="latency": interpolated from the latency table

    def value(self) -> float:
        if self.curve is not None:
            return self.curve(self.kept_out, self.kept_in)
        o = self.kept_out / self.out if self.out else 1.0
        i = self.kept_in / self.inp if self.inp else 1.0
        return self.full * o * i + self.linear * o


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The dense kernel a layer computes with (PenniConv2d: coefficients @ basis), masks applied."""
    w = module.reconstructed_weight() if isinstance(module, PenniConv2d) else module.weight
    return w.detach().float()


def _layer_costs(model: nn.Module, graph: ChannelGraph, cost: str, example_inputs) -> tuple[dict[str, _LayerCost], float]:
    """Per sliceable layer: its cost split into the parts that scale with out x in and with out."""
    measured = profile(model, example_inputs)
    rows = {r.name: r for r in measured.rows}
    total = float(measured.dense_macs if cost == "dense_macs" else measured.params)
    layers: dict[str, _LayerCost] = {}
    for name, axes in graph.slots.items():
        kind = graph.kinds.get(name)
        module = model.get_submodule(name)
        out, inp = len(axes.get("out", ())), len(axes.get("in", ()))
        if kind == "norm":
            n = sum(p.numel() for p in module.parameters(recurse=False)) if cost == "params" else 0
            layers[name] = _LayerCost(0.0, float(n), out, 0)
            continue
        if kind not in ("conv", "linear"):
            continue
        if cost == "dense_macs":
            main, bias = float(rows[name].dense_macs) if name in rows else 0.0, 0.0
        else:
            main = float(module.coefficients.numel() if isinstance(module, PenniConv2d) else module.weight.numel())
            bias = float(module.bias.numel()) if getattr(module, "bias", None) is not None else 0.0
        if name in graph.depthwise:  # one filter per channel: its cost follows the kept channels
            layers[name] = _LayerCost(0.0, main + bias, out, inp)
        else:
            layers[name] = _LayerCost(main, bias, out, inp)
    for layer in layers.values():
        layer.kept_out, layer.kept_in = layer.out, layer.inp
    return layers, total


def _normalised(values: torch.Tensor) -> torch.Tensor:
    """``values / mean(values)``: puts layers of different scale on one footing (Torch-Pruning's "mean")."""
    return values / values.mean().clamp_min(1e-12)


def _column_norms(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """L2 norm of the weights reading each input position; a grouped conv's input ``p`` is read by
    the rows of group ``p // (in/groups)`` at column ``p % (in/groups)``."""
    out, per_in = weight.shape[0], weight.shape[1]
    return torch.linalg.vector_norm(weight.reshape(groups, out // groups, per_in, -1), dim=(1, 3)).flatten()


def _group_scores(model: nn.Module, groups: list[ChannelGroup], depthwise: dict[str, int]) -> dict[int, float]:
    """Importance of each group: producer rows x BatchNorm |gamma| x consumer columns.

    Each factor is the mean, over the group's members of that kind, of a magnitude normalised
    by its layer's mean: the L2 norm of the producer's output row of the dense kernel
    (PenniConv2d: coefficients @ basis; depthwise rows that filter the channel count as
    producers), the BatchNorm |gamma|, and the L2 norm of the consumers' input columns (grouped
    convs: within the position's group; a depthwise consumer is already counted as a producer).
    A factor with no member counts as 1. A product, so a channel dead in any of these ways
    scores 0 and goes first.
    """
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    gammas: dict[str, torch.Tensor] = {}

    def row_norms(name: str) -> torch.Tensor:
        if name not in rows:
            w = _dense_weight(model.get_submodule(name))
            rows[name] = _normalised(torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1))
        return rows[name]

    def col_norms(name: str) -> torch.Tensor:
        if name not in cols:
            module = model.get_submodule(name)
            cols[name] = _normalised(_column_norms(_dense_weight(module), getattr(module, "groups", 1)))
        return cols[name]

    def gamma(name: str) -> torch.Tensor | None:
        if name not in gammas:
            weight = getattr(model.get_submodule(name), "weight", None)
            gammas[name] = None if weight is None else _normalised(weight.detach().float().abs())
        return gammas[name]

    scores = {}
    for g in groups:
        producers = [row_norms(p.module)[p.index] for p in g.producers if p.kind in ("weights", "depthwise")]
        norms = [gm[c] for name, c in g.norms if (gm := gamma(name)) is not None]
        consumers = [col_norms(u.module)[list(u.positions)].mean() for u in g.consumers if u.module not in depthwise]
        score = 1.0
        for factor in (producers, norms, consumers):
            if factor:
                score *= float(torch.stack(factor).mean())
        scores[g.id] = score
    return scores


def _scores(view: nn.Module, groups: list[ChannelGroup], graph: ChannelGraph,
            importance: Importance | None) -> dict[int, float]:
    """The groups' scores: ``importance``'s, or :func:`_group_scores` by default; every group needs one."""
    scores = _group_scores(view, groups, graph.depthwise) if importance is None else importance(view, groups, graph)
    if missing := [g.id for g in groups if g.id not in scores]:
        raise ValueError(f"importance gave no score for channel groups {missing[:5]}")
    return scores


def _prunable_groups(graph: ChannelGraph, exclude: set[str]) -> list[ChannelGroup]:
    """Groups whose channels can be zeroed: free, made by weights (with zero rules and depthwise
    filters), no excluded layer."""
    found = []
    for g in graph.groups.values():
        if g.frozen or not g.producers:
            continue
        kinds = {p.kind for p in g.producers}
        if not kinds <= {"weights", "zero", "depthwise"} or "weights" not in kinds:
            continue
        touched = {p.module for p in g.producers} | {u.module for u in g.consumers} | {n for n, _ in g.norms}
        if touched & exclude:
            continue
        found.append(g)
    return found


def _grouped_axes(graph: ChannelGraph) -> list[tuple[str, str, int, list[int]]]:
    """``(conv, axis, groups, group ids)`` of every axis of a grouped conv that is not depthwise."""
    return [(name, axis, n, gids) for name, n in graph.conv_groups.items()
            if name not in graph.depthwise and name in graph.slots
            for axis, gids in graph.slots[name].items()]


def _matched_units(graph: ChannelGraph, groups: list[ChannelGroup]) -> list[list[ChannelGroup]]:
    """The prunable groups joined into the sets that are removed together.

    A grouped conv's channels at local position ``j`` of every group form one set (transitively,
    union-find), so each of its groups loses as many channels as the others: the only partial
    removal ``shrink`` realizes. A set is left out (never pruned) when a member may not go or
    when it would still leave some grouped conv with unequal per-group widths.
    """
    parent = {gid: gid for gid in graph.groups}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    occurrences: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    for name, axis, n, gids in _grouped_axes(graph):
        per = len(gids) // n
        for i, gid in enumerate(gids):
            occurrences[gid].append((name, axis, i // per))
        for j in range(per):
            first = find(gids[j])
            for k in range(1, n):
                other = find(gids[k * per + j])
                if other != first:
                    parent[max(first, other)] = min(first, other)
                    first = min(first, other)
    sets: dict[int, list[int]] = defaultdict(list)
    for gid in graph.groups:
        sets[find(gid)].append(gid)
    prunable = {g.id: g for g in groups}
    return [[prunable[m] for m in members] for members in sets.values()
            if all(m in prunable for m in members) and _balanced(members, occurrences, graph.conv_groups)]


def _balanced(members: list[int], occurrences: dict, conv_groups: dict[str, int]) -> bool:
    """Removing ``members`` takes the same number of channels from every group of each grouped conv axis."""
    counts: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for m in members:
        for name, axis, k in occurrences.get(m, ()):
            counts[(name, axis)][k] += 1
    return all(len(per_group) == conv_groups[name] and len(set(per_group.values())) == 1
               for (name, _), per_group in counts.items())


def _footprints(graph: ChannelGraph) -> dict[int, list[tuple[str, str, int]]]:
    """Group id -> ``(layer, axis, positions)`` it occupies in every sliceable layer."""
    counts: dict[int, dict[tuple[str, str], int]] = defaultdict(lambda: defaultdict(int))
    for name, axes in graph.slots.items():
        for axis, gids in axes.items():
            for gid in gids:
                counts[gid][(name, axis)] += 1
    return {gid: [(name, axis, n) for (name, axis), n in c.items()] for gid, c in counts.items()}


def _unit_footprint(unit: list[ChannelGroup], footprints: dict) -> list[tuple[str, str, int]]:
    """``(layer, axis, positions)`` a set of groups occupies together."""
    merged: dict[tuple[str, str], int] = defaultdict(int)
    for g in unit:
        for name, axis, n in footprints.get(g.id, ()):
            merged[(name, axis)] += n
    return [(name, axis, n) for (name, axis), n in merged.items()]


def _select_units(units: list[list[ChannelGroup]], scores: dict[int, float], layers: dict[str, _LayerCost],
                  footprints: dict, total: float, target: float, slack: float) -> tuple[list, float]:
    """Least important sets first (mean score of their groups), until the cost falls by ``target``
    (skipping a set that would overshoot by more than ``slack`` or leave a layer without
    channels); returns the chosen groups and the cost."""
    cost = total
    goal = total * (1.0 - target)
    chosen = []
    ranked = sorted(units, key=lambda u: (sum(scores[g.id] for g in u) / len(u), min(g.id for g in u)))
    for unit in ranked:
        if cost <= goal:
            break
        affected = [(layers[n], axis, k) for n, axis, k in _unit_footprint(unit, footprints) if n in layers]
        if any((lc.kept_out if axis == "out" else lc.kept_in) - k < 1 for lc, axis, k in affected):
            continue  # every conv, linear and norm layer keeps a channel on each axis
        before = sum(lc.value() for lc in {id(lc): lc for lc, _, _ in affected}.values())
        _shift(affected, -1)
        after = sum(lc.value() for lc in {id(lc): lc for lc, _, _ in affected}.values())
        if cost - before + after < total * (1.0 - target - slack):
            _shift(affected, +1)
            continue
        cost += after - before
        chosen.extend(unit)
    return chosen, cost


def _shift(affected: list, sign: int) -> None:
    for lc, axis, k in affected:
        if axis == "out":
            lc.kept_out += sign * k
        else:
            lc.kept_in += sign * k


def _chunks(units: list[list[ChannelGroup]], scores: dict[int, float], graph: ChannelGraph,
            multiple: int) -> list[deque]:
    """Per channel space (units with one footprint): its units, least important first, in chunks that keep
    the space's width a multiple of ``multiple``; a chunk is ``(score, groups, footprint)``."""
    footprints = _footprints(graph)
    spaces: dict[tuple, list] = defaultdict(list)
    for unit in units:
        spaces[tuple(sorted(_unit_footprint(unit, footprints)))].append(unit)
    queues = []
    def unit_score(unit: list[ChannelGroup]) -> float:
        return sum(scores[g.id] for g in unit) / len(unit)

    for (name, axis, k), *_ in spaces:
        members = sorted(spaces[((name, axis, k), *_)], key=lambda u: (unit_score(u), u[0].id))
        size, first = max(1, multiple // k), (len(graph.slots[name][axis]) % multiple) // k
        bounds = [0] + list(range(first or size, len(members) + size, size))
        queue: deque = deque()
        for lo, hi in zip(bounds, bounds[1:]):
            chunk = [g for u in members[lo:hi] for g in u]
            queue.append((sum(map(unit_score, members[lo:hi])), chunk, _unit_footprint(chunk, footprints)))
        queues.append(queue)
    return queues


def _chunk_saving(chunk: tuple, layers: dict[str, _LayerCost], apply: bool = False) -> float | None:
    """Modelled cost that removing ``chunk`` saves (None: a layer would lose its last channel); ``apply`` removes it."""
    affected = [(layers[n], axis, k) for n, axis, k in chunk[2] if n in layers]
    if any((lc.kept_out if axis == "out" else lc.kept_in) - k < 1 for lc, axis, k in affected):
        return None
    distinct = list({id(lc): lc for lc, _, _ in affected}.values())
    before = sum(lc.value() for lc in distinct)
    _shift(affected, -1)
    after = sum(lc.value() for lc in distinct)
    _shift(affected, 0 if apply else +1)
    return before - after


def _prune_to_latency(view: nn.Module, graph: ChannelGraph, units: list, scores: dict[int, float], inputs: tuple,
                      settings: LatencySettings | None, target: float) -> tuple[list[ChannelGroup], dict, dict]:
    """Chunks by importance per latency saved (the table's, interpolated) to a goal; the shrunk copy timed, and
    the selection continued while it misses ``target`` (:func:`penni.latency.select_to_speedup`)."""
    settings = settings or LatencySettings()
    table = latency_table(view, inputs, settings)
    base = measure_model(view, inputs, settings)
    layers = {name: _LayerCost(0.0, 0.0, len(axes.get("out", ())), len(axes.get("in", ())),
                               len(axes.get("out", ())), len(axes.get("in", ())), table.curve(name, base))
              for name, axes in graph.slots.items() if graph.kinds.get(name) in ("conv", "linear") and name in table.specs}
    queues = _chunks(units, scores, graph, settings.multiple)
    total = sum(lc.value() for lc in layers.values())
    chosen: list[ChannelGroup] = []

    def select(goal: float) -> tuple[bool, float]:
        cost = sum(lc.value() for lc in layers.values())
        taken = greedy_by_ratio(queues, lambda c: c[0], lambda c: _chunk_saving(c, layers),
                                lambda c: _chunk_saving(c, layers, apply=True), cost - total * goal, 1e-9 * total)
        chosen.extend(g for chunk in taken for g in chunk[1])
        return bool(taken), sum(lc.value() for lc in layers.values()) / total

    def measure() -> tuple[dict[int, float], dict[int, float]]:
        trial = copy.deepcopy(view)
        _zero_masks(trial, chosen, graph.depthwise)
        small = shrink(trial, inputs)
        return measure_model(view, inputs, settings), measure_model(small, inputs, settings)

    return chosen, layers, select_to_speedup(select, measure, base, target, settings)


def _zero_columns(mask: torch.Tensor, positions: tuple[int, ...], groups: int) -> None:
    """Zero the weights reading input ``positions`` (grouped conv: only the rows of each position's group)."""
    if groups == 1:
        mask[:, list(positions)] = 0
        return
    per_in, per_out = mask.shape[1], mask.shape[0] // groups
    for p in positions:
        k = p // per_in
        mask[k * per_out:(k + 1) * per_out, p % per_in] = 0


def _zero_masks(model: nn.Module, chosen: list[ChannelGroup], depthwise: dict[str, int]) -> None:
    """Hold at zero everything that writes or reads the chosen channels.

    Producers: the output row and bias (PenniConv2d coefficients, Conv2d/Linear weight), the
    rows of depthwise convs that filter the channel included (a non-zero constant would not
    pass their zero padding exactly, and shrink would keep the channel); BatchNorm: weight and
    bias, so the channel is exactly 0 in train and eval mode; consumers: the input columns
    (grouped convs: within the position's group). ``shrink`` then finds the channel unused and
    removes it exactly.
    """
    masks: dict[tuple[str, str], torch.Tensor] = {}

    def mask(name: str, tensor_name: str) -> torch.Tensor:
        key = (name, tensor_name)
        if key not in masks:
            masks[key] = torch.ones_like(getattr(model.get_submodule(name), tensor_name).detach())
        return masks[key]

    def main_tensor(name: str) -> str:
        return "coefficients" if isinstance(model.get_submodule(name), PenniConv2d) else "weight"

    for g in chosen:
        for p in g.producers:
            if p.kind not in ("weights", "depthwise"):
                continue
            mask(p.module, main_tensor(p.module))[p.index] = 0
            if getattr(model.get_submodule(p.module), "bias", None) is not None:
                mask(p.module, "bias")[p.index] = 0
        for name, c in g.norms:
            norm = model.get_submodule(name)
            for tensor_name in ("weight", "bias"):
                if getattr(norm, tensor_name, None) is not None:
                    mask(name, tensor_name)[c] = 0
        for use in g.consumers:
            if use.module in depthwise:
                continue  # its rows for the channel are producers of the group, zeroed above
            groups = getattr(model.get_submodule(use.module), "groups", 1)
            _zero_columns(mask(use.module, main_tensor(use.module)), use.positions, groups)
    for (name, tensor_name), m in masks.items():
        hold_mask(model.get_submodule(name), tensor_name, m)
    for module in model.modules():  # a baked dense kernel must see the new zeros
        if isinstance(module, PenniConv2d) and module.forward_mode == "dense":
            module.set_forward_mode("dense")


def prune_channels(
    model: nn.Module,
    target: float,
    example_inputs: torch.Tensor | tuple,
    cost: str = "dense_macs",
    exclude: Iterable[str] = (),
    slack: float = 0.01,
    latency: LatencySettings | None = None, importance: Importance | None = None,
) -> ChannelPruneReport:
    """Zero the least important coupled channel groups of ``model`` (in place, masks held) until
    ``cost`` falls by the fraction ``target``.

    Groups come from ``penni.channel_graph`` (a residual channel is one group across all its
    branches; frozen groups are never touched), ranked by :data:`Importance` (default :func:`_group_scores`). The cost
    of removing channels is computed from the graph, not by re-profiling: a conv/linear layer's
    cost scales with kept output x kept input channels (depthwise: with kept channels),
    starting from ``penni.profile``'s per-layer dense MACs (``cost="dense_macs"``) or the
    parameter counts (``cost="params"``; bases that ``shrink`` drops as well are not counted).
    Every layer keeps at least one channel per axis; a group whose removal would overshoot the
    target by more than ``slack`` is skipped for a cheaper one. A depthwise conv loses the
    channels of its input group (its rows are zeroed with them); a grouped conv's channels go in
    matched sets, local position ``j`` of every group at once (see :func:`_matched_units`), so
    each group keeps the same width and ``shrink`` removes exactly what the cost model counts;
    sets that cannot be balanced are left alone. Apply ``penni.prune(model, rule="std")``
    afterwards for element-wise sparsity on the surviving channels.

    ``cost="latency"``: ``target`` is the fraction of measured latency to remove (``penni.speedup_target(2.0)``: 0.5)
    where ``latency`` (``penni.LatencySettings``) says; see :func:`_prune_to_latency`. ``report.latency``: the timings.
    """
    if target is None or not 0.0 < target < 1.0:
        raise ValueError(f"prune_channels needs a target in (0, 1) (the fraction of {cost} to remove), got {target!r}")
    if cost not in CHANNEL_COSTS:
        raise ValueError(f"unknown cost {cost!r}: use one of {CHANNEL_COSTS}")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    view = bake_masks(copy.deepcopy(model)).eval()  # effective weights, no BatchNorm update
    graph = channel_graph(view, inputs)
    layers, total = _layer_costs(view, graph, cost, inputs)
    units = _matched_units(graph, _prunable_groups(graph, set(exclude)))
    if not units:
        raise ValueError("prune_channels found no channel it may remove: every channel group is frozen "
                         "(see penni.channel_graph(model, x).describe())")
    groups = [g for unit in units for g in unit]
    scores = _scores(view, groups, graph, importance)
    if cost == "latency":
        chosen, layers, measured = _prune_to_latency(view, graph, units, scores, inputs, latency, target)
        total, after = measured.pop("worst_ms")
    else:
        (chosen, after), measured = _select_units(units, scores, layers, _footprints(graph), total, target, slack), {}
    _zero_masks(model, chosen, graph.depthwise)
    report = ChannelPruneReport(cost, target, total, after, len(graph.groups), len(groups), len(chosen),
                                latency=measured)
    for name, lc in layers.items():
        if graph.kinds.get(name) in ("conv", "linear"):
            report.widths[name] = (lc.out, lc.kept_out)
    if report.reduction < target - slack:
        warnings.warn(f"prune_channels reached only {100 * report.reduction:.1f}% fewer {cost} "
                      f"(target {100 * target:.1f}%): the remaining channels are frozen, the last of their layer"
                      + (", or save no latency on this device (its floor)" if cost == "latency" else ""),
                      RuntimeWarning, stacklevel=2)
    return report
