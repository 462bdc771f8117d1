"""shrink(): physically remove dead channels and basis kernels, exactly preserving the function.

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
from .dependency import ChannelGraph, ChannelGroup, channel_graph
from .masking import bake_masks
from .recipe import Recipe, get_recipe
from .slicing import add_bias, slice_in, slice_out, slice_penni_basis

CONSTANT_TOLERANCE = 1e-6


@dataclass
class ShrinkReport:
    """What ``shrink`` did (``shrink(..., return_report=True)`` returns it with the model).

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
        """Bool per input position: some weight reading it is non-zero."""
        if name not in self._used_in:
            w = self.dense(name)
            self._used_in[name] = w.ne(0).transpose(0, 1).reshape(w.shape[1], -1).any(1)
        return self._used_in[name]

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


def _fold_plan(group: ChannelGroup, graph: ChannelGraph, weights: _Weights) -> dict[str, torch.Tensor] | str:
    """Bias deltas that replace a constant group at its consumers, or why it cannot be folded."""
    deltas: dict[str, list[torch.Tensor]] = {}
    for use in group.consumers:
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
        wd = w.double()[:, pos.to(w.device)]
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


def _decide(graph: ChannelGraph, weights: _Weights, report: ShrinkReport) -> dict[int, dict[str, torch.Tensor]]:
    removed: dict[int, dict[str, torch.Tensor]] = {}
    for gid, group in graph.groups.items():
        if group.frozen or not group.producers:
            continue
        if all(not bool(weights.used_in(u.module)[list(u.positions)].any()) for u in group.consumers):
            removed[gid] = {}
            continue
        constant = group.const_safe and all(
            p.kind == "zero" or (p.kind == "weights" and not bool(weights.used_out(p.module)[p.index]))
            for p in group.producers
        )
        if not constant:
            continue
        plan = _fold_plan(group, graph, weights)
        if isinstance(plan, str):
            where = ", ".join(f"{p.module}[{p.index}]" for p in group.producers[:3])
            report.kept_constant.append(f"{where}: {plan}")
        else:
            removed[gid] = plan
    # every layer keeps at least one channel on each axis (a dead layer keeps one)
    for name, axes in graph.slots.items():
        if graph.kinds.get(name) == "rule":
            continue
        for gids in axes.values():
            if gids and all(g in removed for g in gids):
                removed.pop(gids[0])
    return removed


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
        for axis, gids in axes.items():
            kept = [i for i, g in enumerate(gids) if g not in removed]
            if len(kept) == len(gids):
                continue
            (slice_out if axis == "out" else slice_in)(module, kept)
            recipe.record_kept(name, axis, kept)
            report.note(name, axis, len(gids), len(kept))
    report.removed_groups += len(removed)


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


def shrink(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    max_rounds: int = 10,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ShrinkReport]:
    """A smaller copy of ``model`` without dead channels and unused basis kernels.

    Removes output channels whose weights are all zero (with their BatchNorm channels and the
    matching input channels of every consumer; a constant channel is folded into its consumers'
    biases), input channels no weight reads, and basis kernels no coefficient uses. Residual
    additions keep a channel if any branch needs it; concatenation, pooling, activations and a
    Linear head are followed (see :mod:`penni.dependency`; unknown ops keep their channels).

    ``model`` is not modified: the result is a deep copy with held masks baked into plain
    parameters, in the same train/eval mode (module by module) as ``model``. In eval mode it
    computes the same function (up to float rounding). ``example_inputs`` (a tensor or a tuple of
    forward arguments) drive the trace and the constant measurement; use a few real or random
    samples. Every layer keeps at least one channel per axis and one basis kernel, so a
    completely dead layer stays as a one-channel layer. The kept indices are recorded in the
    copy's recipe (``penni.get_recipe``) so ``penni.load`` can rebuild the shapes; biases that
    had to be created for folding are listed in ``recipe.added_bias``.

    With ``return_report=True`` returns ``(small_model, ShrinkReport)``.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
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
        removed = _decide(graph, _Weights(small), report)
        if removed:
            _apply(small, graph, removed, recipe, report)
        bases = _drop_bases(small, recipe, report)
        if not removed and not bases:
            report.converged = True
            break
    else:
        warnings.warn(f"shrink stopped after max_rounds={max_rounds} rounds; more channels may be removable",
                      RuntimeWarning, stacklevel=2)
    for name, m in small.named_modules():
        m.training = modes.get(name, m.training)
    report.params_after = _count(small)
    return (small, report) if return_report else small
