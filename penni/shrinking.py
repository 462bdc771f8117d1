"""shrink(): physically remove dead channels and basis kernels, exactly preserving the function
(``shrink_with_report`` also says what it removed).

Pruning only zeroes coefficients; ``shrink`` turns the zeros into a smaller model. Per channel
group of :mod:`penni.dependency` (the channels that must go together), a group is removed when

(a) it is *unused*: every consumer's weights for it are exactly zero (PenniConv2d coefficients
    ``[:, c, :]``, Conv2d ``weight[:, c]``, Linear columns); then nothing reads it, or
(b) it is *constant*: every producer's weights for it are exactly zero (the conv outputs its bias,
    BatchNorm maps that to a constant, ReLU keeps it constant; ChannelPadShortcut's pad channels
    are zero). The constant is measured at every consumer's input on the example inputs (eval
    mode; it must be constant over batch and space) and folded into the consumer's bias:
    Linear ``b += W[:, feats] @ v``, conv without zero padding ``b += sum_hw W[:, c] * v``.
    A zero-padded conv cannot absorb a non-zero constant exactly (its border pixels see the
    padding), so such a group is kept unless the constant is exactly 0 there. The reference
    implementation silently dropped these channels, which changes the function.

Grouped convs: a depthwise conv's channel is one group with its input channel (it goes when
the group is unused downstream, or constant: then the depthwise conv must not see a non-zero
constant through zero padding, unless its rows for it are zero). Other grouped convs keep equal
per-group widths: a group is dropped when all its inputs and outputs go, and otherwise every kept
group keeps as many inputs (and outputs) as the widest one; removable channels beyond that are
kept (they are unused or constant, so keeping them is exact). ``round_to`` keeps further removable
channels so that every conv's widths are multiples of it (or the full width).

Then every PenniConv2d drops the basis kernels that no coefficient uses. Rounds repeat (each on
a fresh trace) until nothing changes, because removing an output row can free an input column.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .conv import PenniConv2d, penni_layers
from .dependency import ChannelGraph, ChannelGroup, ConsumerUse, channel_graph
from .masking import bake_masks
from .recipe import Recipe, get_recipe
from .slicing import add_bias, slice_in, slice_out, slice_penni_basis

CONSTANT_TOLERANCE = 1e-6


@dataclass
class ShrinkReport:
    """What ``shrink`` did (:func:`shrink_with_report` returns it with the model).

    ``widths[layer][axis] = (before, after)`` for every axis that changed ("out", "in",
    "basis"); ``folded[layer]`` counts constant channels folded into that layer's bias;
    ``kept_constant`` describes constant groups kept because a zero-padded conv reads them
    (or because they were not constant on the example inputs); ``rounds`` is the number of
    analysis rounds and ``converged`` whether the last one found nothing left to remove.
    """

    rounds: int = 0
    converged: bool = False
    params_before: int = 0
    params_after: int = 0
    widths: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    folded: dict[str, int] = field(default_factory=dict)
    kept_constant: list[str] = field(default_factory=list)
    removed_groups: int = 0

    def note(self, layer: str, axis: str, before: int, after: int) -> None:
        entry = self.widths.setdefault(layer, {})
        first = entry[axis][0] if axis in entry else before
        entry[axis] = (first, after)

    def summary(self) -> str:
        lines = [f"shrink: {self.params_before} -> {self.params_after} parameters in {self.rounds} round(s)"]
        for layer, axes in self.widths.items():
            parts = ", ".join(f"{axis} {a}->{b}" for axis, (a, b) in axes.items())
            lines.append(f"  {layer}: {parts}")
        for layer, n in self.folded.items():
            lines.append(f"  {layer}: bias absorbed {n} constant channel(s)")
        return "\n".join(lines)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _Weights:
    """Dense weights and their per-position "is any entry non-zero" masks, computed once per round."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._dense: dict[str, torch.Tensor] = {}
        self._used_in: dict[str, torch.Tensor] = {}
        self._used_out: dict[str, torch.Tensor] = {}

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def dense(self, name: str) -> torch.Tensor:
        if name not in self._dense:
            m = self.module(name)
            if isinstance(m, PenniConv2d):  # the kernel the forward really uses
                baked = m._baked_weight if m.forward_mode == "dense" else None
                w = baked if baked is not None else m.reconstructed_weight()
            else:
                w = m.weight
            self._dense[name] = w.detach()
        return self._dense[name]

    def used_in(self, name: str) -> torch.Tensor:
        """Bool per input position: some weight reading it is non-zero (grouped convs: the rows of
        the position's group)."""
        if name not in self._used_in:
            w = self.dense(name)
            groups = getattr(self.module(name), "groups", 1)
            per_row = w.ne(0).reshape(w.shape[0], w.shape[1], -1).any(2)          # (out, in / groups)
            self._used_in[name] = per_row.reshape(groups, -1, w.shape[1]).any(1).flatten()
        return self._used_in[name]

    def columns(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """The weights reading input ``positions`` as ``(out, len(positions), ...)`` in float64
        (grouped convs: zero outside the position's group)."""
        w = self.dense(name).double()
        groups = getattr(self.module(name), "groups", 1)
        positions = positions.to(w.device)
        if groups == 1:
            return w[:, positions]
        per_in, per_out = w.shape[1], w.shape[0] // groups
        cols = torch.zeros(w.shape[0], len(positions), *w.shape[2:], dtype=w.dtype, device=w.device)
        for k, p in enumerate(positions.tolist()):
            rows = slice(p // per_in * per_out, (p // per_in + 1) * per_out)
            cols[rows, k] = w[rows, p % per_in]
        return cols

    def used_out(self, name: str) -> torch.Tensor:
        """Bool per output position: some weight writing it is non-zero."""
        if name not in self._used_out:
            w = self.dense(name)
            self._used_out[name] = w.ne(0).reshape(w.shape[0], -1).any(1)
        return self._used_out[name]


def _absorbs_constant(module: nn.Module) -> bool:
    """True when a constant input channel reaches every output pixel through the full kernel."""
    if isinstance(module, nn.Linear):
        return True
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return True  # reflect / replicate / circular padding of a constant is the same constant
    padding = module.padding
    if isinstance(padding, str):
        return padding == "valid" or tuple(module.kernel_size) == (1, 1)
    return all(p == 0 for p in padding)


def _depthwise_passes_constant(use: ConsumerUse, graph: ChannelGraph, weights: _Weights) -> str | None:
    """None when a depthwise conv turns its constant input channel into a constant output (its rows
    for it are zero, or the constant is exactly 0, or no zero padding), else why not."""
    pos = list(use.positions)
    if not bool(weights.used_in(use.module)[pos].any()):
        return None
    stats = graph.input_stats.get(use.node)
    if stats is None:
        return f"no measurement at {use.node}"
    mean, dev = stats.mean[pos], stats.deviation[pos]
    if bool((dev > CONSTANT_TOLERANCE * (1 + mean.abs())).any()):
        return f"not constant at the input of {use.module} on the example inputs"
    if (bool((mean == 0).all()) and bool((dev == 0).all())) or _absorbs_constant(weights.module(use.module)):
        return None
    return f"constant {mean.tolist()[:4]} read by the zero-padded depthwise conv {use.module}"


def _fold_plan(group: ChannelGroup, graph: ChannelGraph, weights: _Weights) -> dict[str, torch.Tensor] | str:
    """Bias deltas that replace a constant group at its consumers, or why it cannot be folded.

    A depthwise conv in the group needs no delta (its output channel goes too, and its readers,
    also in the group, absorb the constant it outputs), only a constant output."""
    deltas: dict[str, list[torch.Tensor]] = {}
    for use in group.consumers:
        if use.module in graph.depthwise:
            why = _depthwise_passes_constant(use, graph, weights)
            if why is not None:
                return why
            continue
        pos = torch.tensor(use.positions, dtype=torch.long)
        w = weights.dense(use.module)
        if not weights.used_in(use.module)[pos].any():
            deltas.setdefault(use.module, []).append(torch.zeros(w.shape[0], dtype=torch.float64, device=w.device))
            continue
        stats = graph.input_stats.get(use.node)
        if stats is None:
            return f"no measurement at {use.node}"
        mean = stats.mean[pos.to(stats.mean.device)]
        dev = stats.deviation[pos.to(stats.deviation.device)]
        if bool((dev > CONSTANT_TOLERANCE * (1 + mean.abs())).any()):
            return f"not constant at the input of {use.module} on the example inputs"
        module = weights.module(use.module)
        wd = weights.columns(use.module, pos)
        if isinstance(module, nn.Linear):
            delta = wd @ mean.to(wd)
        else:
            if bool((mean == 0).all()) and bool((dev == 0).all()):
                delta = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
            elif not _absorbs_constant(module):
                return f"constant {mean.tolist()[:4]} read by the zero-padded conv {use.module}"
            else:
                delta = wd.sum((2, 3)) @ mean.to(wd)
        deltas.setdefault(use.module, []).append(delta)
    plan = {}
    for name, ds in deltas.items():
        if any(not torch.equal(ds[0], d) for d in ds[1:]):
            return f"{name} is called several times with different constants"
        if bool(ds[0].ne(0).any()):
            plan[name] = ds[0]
    return plan


def _unused(group: ChannelGroup, graph: ChannelGraph, weights: _Weights) -> bool:
    """No consumer reads the group (a depthwise conv in it only filters it for the others)."""
    return all(not bool(weights.used_in(u.module)[list(u.positions)].any())
               for u in group.consumers if u.module not in graph.depthwise)


def _constant(group: ChannelGroup, weights: _Weights) -> bool:
    """Every producer makes the group constant (dead rows, zero channels; depthwise rows only filter)."""
    sources = [p for p in group.producers if p.kind != "depthwise"]
    return group.const_safe and bool(sources) and all(
        p.kind == "zero" or (p.kind == "weights" and not bool(weights.used_out(p.module)[p.index]))
        for p in sources
    )


def _decide(graph: ChannelGraph, weights: _Weights, report: ShrinkReport,
            round_to: int | None = None) -> dict[int, dict[str, torch.Tensor]]:
    removed: dict[int, dict[str, torch.Tensor]] = {}
    for gid, group in graph.groups.items():
        if group.frozen or not group.producers:
            continue
        if _unused(group, graph, weights):
            removed[gid] = {}
            continue
        if not _constant(group, weights):
            continue
        plan = _fold_plan(group, graph, weights)
        if isinstance(plan, str):
            where = ", ".join(f"{p.module}[{p.index}]" for p in group.producers[:3])
            report.kept_constant.append(f"{where}: {plan}")
        else:
            removed[gid] = plan
    while any([_keep_one_per_layer(graph, removed), _balance_groups(graph, removed),
               _round_widths(graph, removed, round_to)]):
        pass  # each step only keeps more; repeat until all three hold together
    return removed


def _restore(removed: dict, gids) -> bool:
    """Keep these groups after all (always exact); True if one was marked for removal."""
    found = False
    for gid in gids:
        found = removed.pop(gid, None) is not None or found
    return found


def _keep_one_per_layer(graph: ChannelGraph, removed: dict) -> bool:
    """Every layer keeps at least one channel on each axis (a dead layer keeps one)."""
    changed = False
    for name, axes in graph.slots.items():
        if graph.kinds.get(name) == "rule":
            continue
        for gids in axes.values():
            if gids and all(g in removed for g in gids):
                changed = _restore(removed, gids[:1]) or changed
    return changed


def _balance_groups(graph: ChannelGraph, removed: dict) -> bool:
    """Grouped convs keep equal widths in every kept group; a group goes only as a whole."""
    changed = False
    for name, groups in graph.conv_groups.items():
        if name in graph.depthwise or name not in graph.slots:
            continue  # a depthwise conv's channel is one group with its input: always balanced
        per_group = {axis: _split(graph.slots[name].get(axis, []), groups) for axis in ("out", "in")}
        kept = {axis: [[g for g in part if g not in removed] for part in parts] for axis, parts in per_group.items()}
        alive = [i for i in range(groups) if kept["out"][i] or kept["in"][i]]
        for axis, parts in per_group.items():
            need = max([len(kept[axis][i]) for i in alive] + [1])
            for i in alive:
                missing = need - len(kept[axis][i])
                if missing > 0:
                    gone = [g for g in parts[i] if g in removed]
                    changed = _restore(removed, gone[:missing]) or changed
    return changed


def _split(gids: list[int], groups: int) -> list[list[int]]:
    size = len(gids) // groups
    return [gids[i * size:(i + 1) * size] for i in range(groups)]


def _round_widths(graph: ChannelGraph, removed: dict, round_to: int | None) -> bool:
    """Keep removable channels (lowest positions first) until every conv/linear axis that shrinks
    has a multiple of ``round_to`` positions. Axes where a group fills several positions (a
    Linear after a spatial flatten) are left as they are."""
    if not round_to or round_to <= 1:
        return False
    changed = False
    for name, axes in graph.slots.items():
        if graph.kinds.get(name) not in ("conv", "linear"):
            continue
        for gids in axes.values():
            if len(set(gids)) != len(gids):
                continue
            kept = sum(g not in removed for g in gids)
            if kept == len(gids) or kept % round_to == 0:
                continue
            gone = [g for g in gids if g in removed]
            changed = _restore(removed, gone[:round_to - kept % round_to]) or changed
    return changed


def _apply(model: nn.Module, graph: ChannelGraph, removed: dict[int, dict[str, torch.Tensor]],
           recipe: Recipe, report: ShrinkReport) -> None:
    for plan in removed.values():
        for name, delta in plan.items():
            module = model.get_submodule(name)
            if add_bias(module, delta) and name not in recipe.added_bias:
                recipe.added_bias.append(name)
            report.folded[name] = report.folded.get(name, 0) + 1
    for name, axes in graph.slots.items():
        module = model.get_submodule(name)
        for axis in sorted(axes, key=lambda a: a != "out"):  # outputs first: grouped convs drop groups there
            gids = axes[axis]
            kept = [i for i, g in enumerate(gids) if g not in removed]
            if len(kept) == len(gids):
                continue
            (slice_out if axis == "out" else slice_in)(module, kept)
            recipe.record_kept(name, axis, kept)
            report.note(name, axis, len(gids), len(kept))
        _check_grouped(name, module)
    report.removed_groups += len(removed)


def _check_grouped(name: str, module: nn.Module) -> None:
    """A grouped conv must come out of slicing with whole groups of equal widths."""
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return
    weight = module.coefficients if isinstance(module, PenniConv2d) else module.weight
    if module.in_channels != groups * weight.shape[1] or module.out_channels % groups:
        raise RuntimeError(f"shrink left the grouped conv {name} inconsistent ({module}); please report this")


def _drop_bases(model: nn.Module, recipe: Recipe, report: ShrinkReport) -> bool:
    """Drop basis kernels no coefficient uses (or that are zero); every layer keeps one."""
    changed = False
    for name, layer in penni_layers(model).items():
        coefficients, basis = layer.coefficients.detach(), layer.basis.detach()
        used = coefficients.ne(0).reshape(-1, layer.d).any(0) & basis.ne(0).reshape(layer.d, -1).any(1)
        kept = used.nonzero().flatten().tolist() or [0]
        if len(kept) == layer.d:
            continue
        before = layer.d
        slice_penni_basis(layer, torch.tensor(kept, dtype=torch.long))
        recipe.record_kept(name, "basis", kept)
        report.note(name, "basis", before, layer.d)
        changed = True
    return changed


def _check_shrink_args(max_rounds: int, round_to: int | None) -> None:
    """Refuse arguments shrink cannot honour, before any work."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")


def shrink(model: nn.Module, example_inputs: torch.Tensor | tuple, *, max_rounds: int = 10,
           round_to: int | None = None) -> nn.Module:
    """A smaller copy of ``model`` without dead channels and unused basis kernels.

    Removes output channels whose weights are all zero (with their BatchNorm channels and the
    matching input channels of every consumer; a constant channel is folded into its consumers'
    biases), input channels no weight reads, and basis kernels no coefficient uses. Residual
    additions keep a channel if any branch needs it; concatenation, pooling, activations and a
    Linear head are followed (see :mod:`penni.dependency`; unknown ops keep their channels).
    A depthwise conv loses the channels its input loses; a grouped conv loses whole groups or
    the same number of channels in every group (see the module docstring).

    ``model`` is not modified: the result is a deep copy with held masks baked into plain
    parameters, in the same train/eval mode (module by module) as ``model``. In eval mode it
    computes the same function (up to float rounding). ``example_inputs`` (a tensor or a tuple of
    forward arguments) drive the trace and the constant measurement; use a few real or random
    samples. Every layer keeps at least one channel per axis and one basis kernel, so a
    completely dead layer stays as a one-channel layer. The kept indices are recorded in the
    copy's recipe (``penni.get_recipe``) so ``penni.load`` can rebuild the shapes; biases that
    had to be created for folding are listed in ``recipe.added_bias``.

    ``round_to`` (e.g. 8, for GPU tensor cores) keeps some removable channels so that every conv
    and Linear width that shrinks stays a multiple of it (or the full width); the extra channels
    are unused or constant, so the result is still exact. ``None`` or 1: remove all it can.

    :func:`shrink_with_report` does the same and also returns what was removed (a :class:`ShrinkReport`).
    """
    return _shrink(model, example_inputs, max_rounds, round_to)[0]


def shrink_with_report(model: nn.Module, example_inputs: torch.Tensor | tuple, *, max_rounds: int = 10,
                       round_to: int | None = None) -> tuple[nn.Module, ShrinkReport]:
    """:func:`shrink`, returning ``(small_model, report)``: the widths before and after, the constant channels
    folded, the rounds it took (see :class:`ShrinkReport`)."""
    return _shrink(model, example_inputs, max_rounds, round_to)


def _shrink(model: nn.Module, example_inputs: torch.Tensor | tuple, max_rounds: int,
            round_to: int | None) -> tuple[nn.Module, ShrinkReport]:
    _check_shrink_args(max_rounds, round_to)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    modes = {name: m.training for name, m in model.named_modules()}
    small = copy.deepcopy(model)
    bake_masks(small)
    small.eval()
    recipe = get_recipe(small)
    report = ShrinkReport(params_before=_count(small))
    for _ in range(max_rounds):
        report.rounds += 1
        report.kept_constant = []
        graph = channel_graph(small, inputs, record_inputs=True)
        removed = _decide(graph, _Weights(small), report, round_to)
        if removed:
            _apply(small, graph, removed, recipe, report)
        bases = _drop_bases(small, recipe, report)
        if not removed and not bases:
            report.converged = True
            break
    else:
        warnings.warn(f"shrink stopped after max_rounds={max_rounds} rounds; more channels may be removable",
                      RuntimeWarning, stacklevel=3)  # the caller of shrink / shrink_with_report
    for name, m in small.named_modules():
        m.training = modes.get(name, m.training)
    report.params_after = _count(small)
    return small, report
