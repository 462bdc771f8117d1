"""How to slice each layer type: keep given output channels, input channels or basis kernels.

Torch-Pruning's "how to slice" concern: one small function per layer type, looked up in a
registry so custom layers can plug in (``register_slicer``). All edits are in place.

Grouped convs (depthwise included, Conv2d and PenniConv2d) are sliced outputs first, then
inputs: every kept group must keep the same number of outputs and of inputs (the kept input
positions may differ between groups), and a group is dropped by dropping all its outputs and
all its inputs, which lowers ``groups``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import conv as conv_module
from .conv import PenniConv2d

Indices = torch.Tensor


def _keep(param: nn.Parameter | None, dim: int, idx: Indices) -> nn.Parameter | None:
    if param is None:
        return None
    data = param.detach().index_select(dim, idx.to(param.device)).clone()
    return nn.Parameter(data, requires_grad=param.requires_grad)


def _keep_buffer(buf: torch.Tensor | None, idx: Indices) -> torch.Tensor | None:
    return None if buf is None else buf.index_select(0, idx.to(buf.device)).clone()


def _kept_groups(idx: Indices, per_group: int, what: str, m: nn.Module) -> tuple[list[int], int]:
    """Groups that keep some of ``idx`` (channels numbered group-major) and the common kept width.

    Grouped convs stay grouped only if every kept group keeps the same number of channels.
    """
    counts: dict[int, int] = {}
    for i in idx.tolist():
        counts[i // per_group] = counts.get(i // per_group, 0) + 1
    widths = set(counts.values())
    if len(widths) > 1:
        raise ValueError(f"slicing {what} channels of the grouped conv {m} would leave groups of different widths "
                         f"{sorted(widths)}: keep the same number of channels in every kept group")
    return sorted(counts), widths.pop() if widths else 0


def _slice_grouped_out(m: nn.Module, weight_name: str, idx: Indices) -> None:
    """Keep output channels ``idx`` of a grouped conv; groups left without outputs are dropped
    (their inputs must then be dropped by :func:`_slice_grouped_in` right after)."""
    kept_groups, _ = _kept_groups(idx, m.out_channels // m.groups, "output", m)
    setattr(m, weight_name, _keep(getattr(m, weight_name), 0, idx))
    m.bias = _keep(m.bias, 0, idx)
    m.out_channels = len(idx)
    m.groups = len(kept_groups)
    if isinstance(m, PenniConv2d):
        if m._baked_weight is not None:
            m._baked_weight = m._baked_weight.index_select(0, idx.to(m._baked_weight.device))
        _rebake(m)


def _slice_grouped_in(m: nn.Module, weight_name: str, idx: Indices) -> None:
    """Keep input channels ``idx`` of a grouped conv (called after the outputs were sliced).

    Every kept group may keep different positions, but the same number of them: each output
    row gathers the columns of its own group.
    """
    weight = getattr(m, weight_name)
    per_group_in = weight.shape[1]
    kept_groups, width = _kept_groups(idx, per_group_in, "input", m)
    if len(kept_groups) != m.groups:
        raise ValueError(f"the grouped conv {m} keeps inputs of {len(kept_groups)} groups but outputs of {m.groups}: "
                         "drop a group's outputs and inputs together (outputs first)")
    local = (idx % per_group_in).reshape(len(kept_groups), width)            # kept positions per group
    rows_per_group = m.out_channels // m.groups if m.groups else 0
    columns = local.repeat_interleave(rows_per_group, dim=0)                 # (out, width)

    def gather(t: torch.Tensor) -> torch.Tensor:
        index = columns.to(t.device).reshape(*columns.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        return t.detach().gather(1, index).clone()

    setattr(m, weight_name, nn.Parameter(gather(weight), requires_grad=weight.requires_grad))
    m.in_channels = len(idx)
    if isinstance(m, PenniConv2d):
        if m._baked_weight is not None:
            m._baked_weight = gather(m._baked_weight)
        _rebake(m)


def _rebake(m: PenniConv2d) -> None:
    """Re-bake a baked forward form other than "dense" (e.g. a sparse coefficient matrix) after
    slicing, once the layer's shapes are consistent again ("dense" keeps its sliced kernel)."""
    if m.forward_mode in getattr(conv_module, "BAKED_MODES", ("dense",)) and m.forward_mode != "dense":
        if m.in_channels == m.groups * m.coefficients.shape[1] and m.out_channels % m.groups == 0:
            m.set_forward_mode(m.forward_mode)


def slice_conv_out(m: nn.Conv2d, idx: Indices) -> None:
    if m.groups != 1:
        return _slice_grouped_out(m, "weight", idx)
    m.weight = _keep(m.weight, 0, idx)
    m.bias = _keep(m.bias, 0, idx)
    m.out_channels = len(idx)


def slice_conv_in(m: nn.Conv2d, idx: Indices) -> None:
    if m.groups != 1:
        return _slice_grouped_in(m, "weight", idx)
    m.weight = _keep(m.weight, 1, idx)
    m.in_channels = len(idx)


def slice_penni_out(m: PenniConv2d, idx: Indices) -> None:
    if m.groups != 1:
        return _slice_grouped_out(m, "coefficients", idx)
    m.coefficients = _keep(m.coefficients, 0, idx)
    m.bias = _keep(m.bias, 0, idx)
    m.out_channels = len(idx)
    m._baked_weight = None if m._baked_weight is None else m._baked_weight.index_select(0, idx)
    _rebake(m)


def slice_penni_in(m: PenniConv2d, idx: Indices) -> None:
    if m.groups != 1:
        return _slice_grouped_in(m, "coefficients", idx)
    m.coefficients = _keep(m.coefficients, 1, idx)
    m.in_channels = len(idx)
    m._baked_weight = None if m._baked_weight is None else m._baked_weight.index_select(1, idx)
    _rebake(m)


def slice_penni_basis(m: PenniConv2d, idx: Indices) -> None:
    """Keep only basis kernels ``idx`` (and their coefficient slices)."""
    m.basis = _keep(m.basis, 0, idx)
    m.coefficients = _keep(m.coefficients, 2, idx)
    _rebake(m)


def slice_linear_out(m: nn.Linear, idx: Indices) -> None:
    m.weight = _keep(m.weight, 0, idx)
    m.bias = _keep(m.bias, 0, idx)
    m.out_features = len(idx)


def slice_linear_in(m: nn.Linear, idx: Indices) -> None:
    m.weight = _keep(m.weight, 1, idx)
    m.in_features = len(idx)


def slice_batchnorm(m: nn.modules.batchnorm._BatchNorm, idx: Indices) -> None:
    m.weight = _keep(m.weight, 0, idx)
    m.bias = _keep(m.bias, 0, idx)
    m.running_mean = _keep_buffer(m.running_mean, idx)
    m.running_var = _keep_buffer(m.running_var, idx)
    m.num_features = len(idx)


SLICE_OUT: dict[type, Callable[[nn.Module, Indices], None]] = {
    nn.Conv2d: slice_conv_out, PenniConv2d: slice_penni_out, nn.Linear: slice_linear_out,
    nn.BatchNorm2d: slice_batchnorm, nn.BatchNorm1d: slice_batchnorm,
}
SLICE_IN: dict[type, Callable[[nn.Module, Indices], None]] = {
    nn.Conv2d: slice_conv_in, PenniConv2d: slice_penni_in, nn.Linear: slice_linear_in,
    nn.BatchNorm2d: slice_batchnorm, nn.BatchNorm1d: slice_batchnorm,
}


def register_slicer(layer_type: type, out_fn: Callable, in_fn: Callable) -> None:
    """Teach penni how to slice the output and input channels of a custom layer type."""
    SLICE_OUT[layer_type] = out_fn
    SLICE_IN[layer_type] = in_fn


def _lookup(table: dict[type, Callable], module: nn.Module) -> Callable:
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    raise TypeError(f"penni cannot slice {type(module).__name__}: register it with penni.slicing.register_slicer")


def slice_out(module: nn.Module, idx: Indices) -> None:
    """Keep output channels ``idx`` of ``module`` (BatchNorm: its channels)."""
    _lookup(SLICE_OUT, module)(module, torch.as_tensor(idx, dtype=torch.long))


def slice_in(module: nn.Module, idx: Indices) -> None:
    """Keep input channels (Linear: input features) ``idx`` of ``module``."""
    _lookup(SLICE_IN, module)(module, torch.as_tensor(idx, dtype=torch.long))


def add_bias(module: nn.Module, delta: torch.Tensor) -> bool:
    """Add ``delta`` to the bias of a conv or linear layer, creating the bias if needed.

    Returns True when a bias had to be created (the recipe records it for ``load``).
    """
    created = module.bias is None
    if created:
        ref = module.weight if hasattr(module, "weight") else module.coefficients
        module.bias = nn.Parameter(torch.zeros(delta.shape[0], dtype=ref.dtype, device=ref.device))
    with torch.no_grad():
        module.bias.add_(delta.to(module.bias))
    return created
