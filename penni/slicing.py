"""How to slice each layer type: keep given output channels, input channels or basis kernels.

Torch-Pruning's "how to slice" concern: one small function per layer type, looked up in a
registry so custom layers can plug in (``register_slicer``). All edits are in place.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .conv import PenniConv2d

Indices = torch.Tensor


def _keep(param: nn.Parameter | None, dim: int, idx: Indices) -> nn.Parameter | None:
    if param is None:
        return None
    data = param.detach().index_select(dim, idx.to(param.device)).clone()
    return nn.Parameter(data, requires_grad=param.requires_grad)


def _keep_buffer(buf: torch.Tensor | None, idx: Indices) -> torch.Tensor | None:
    return None if buf is None else buf.index_select(0, idx.to(buf.device)).clone()


def _check_groups(module: nn.Module) -> None:
    if getattr(module, "groups", 1) != 1:
        raise ValueError(f"slicing channels of a grouped conv ({module}) is not supported")


def slice_conv_out(m: nn.Conv2d, idx: Indices) -> None:
    _check_groups(m)
    m.weight = _keep(m.weight, 0, idx)
    m.bias = _keep(m.bias, 0, idx)
    m.out_channels = len(idx)


def slice_conv_in(m: nn.Conv2d, idx: Indices) -> None:
    _check_groups(m)
    m.weight = _keep(m.weight, 1, idx)
    m.in_channels = len(idx)


def slice_penni_out(m: PenniConv2d, idx: Indices) -> None:
    _check_groups(m)
    m.coefficients = _keep(m.coefficients, 0, idx)
    m.bias = _keep(m.bias, 0, idx)
    m.out_channels = len(idx)
    m._baked_weight = None if m._baked_weight is None else m._baked_weight.index_select(0, idx)


def slice_penni_in(m: PenniConv2d, idx: Indices) -> None:
    _check_groups(m)
    m.coefficients = _keep(m.coefficients, 1, idx)
    m.in_channels = len(idx)
    m._baked_weight = None if m._baked_weight is None else m._baked_weight.index_select(1, idx)


def slice_penni_basis(m: PenniConv2d, idx: Indices) -> None:
    """Keep only basis kernels ``idx`` (and their coefficient slices)."""
    m.basis = _keep(m.basis, 0, idx)
    m.coefficients = _keep(m.coefficients, 2, idx)


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
