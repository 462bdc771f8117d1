"""The sparsity terms of PENNI retraining: L1 on the coefficients, and group lasso on whole channels.

``l1_penalty`` (the paper's term) zeroes single coefficients, which no dense kernel skips;
``group_l1_penalty`` pushes whole output (and optionally input) channels to zero, so that
``prune_channels`` and ``shrink`` can remove them and the model really gets cheaper.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from .conv import PenniConv2d

GROUP_DIMS: tuple[str, ...] = ("out", "in")


def is_pointwise(module: nn.Module) -> bool:
    """A 1x1 nn.Conv2d (the bottleneck and shortcut convs of ResNets)."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _sparsified_tensors(model: nn.Module, include_pointwise: bool) -> Iterable[torch.Tensor]:
    """Coefficients of every PenniConv2d (``(out, in/groups, d)``), and 1x1 conv weights if asked."""
    for module in model.modules():
        if isinstance(module, PenniConv2d):
            yield module.coefficients
        elif include_pointwise and is_pointwise(module):
            yield module.weight


def l1_penalty(model: nn.Module, include_pointwise: bool = False) -> torch.Tensor:
    """Sum of |coefficients| over all PenniConv2d layers (a sum, as the paper, not a mean).

    With ``include_pointwise`` the weights of 1x1 convs are added, as the reference does for
    ResNet50 on ImageNet. Works on DDP-wrapped models.
    """
    terms = [t.abs().sum() for t in _sparsified_tensors(model, include_pointwise)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def _channel_norms(tensor: torch.Tensor, dim: str) -> torch.Tensor:
    """L2 norm of every output (dim 0) or input (dim 1) channel slice of a weight tensor.

    ``torch.linalg.vector_norm`` has the subgradient 0 at an all-zero slice (a hand-written
    ``sqrt(sum(x**2))`` gives NaN gradients there, which would poison training once a channel
    is pruned or has collapsed).
    """
    if dim == "out":
        return torch.linalg.vector_norm(tensor.reshape(tensor.shape[0], -1), dim=1)
    return torch.linalg.vector_norm(tensor.transpose(0, 1).reshape(tensor.shape[1], -1), dim=1)


def group_l1_penalty(model: nn.Module, dims: Sequence[str] = ("out",), include_pointwise: bool = False) -> torch.Tensor:
    """Group lasso: the sum over channels of the L2 norm of each channel's coefficients.

    ``dims`` picks the groups: ``"out"`` (one group per output channel, ``coefficients[o]``)
    and/or ``"in"`` (one per input channel, ``coefficients[:, i]``). Like L1 on single
    entries, the norm's constant pull drives whole groups exactly to zero (Yuan & Lin's group
    lasso; Torch-Pruning's group-norm sparse learning), which lets ``prune_channels``
    and ``shrink`` remove channels. A plain sum, not weighted by group size. With
    ``include_pointwise`` the weights of 1x1 convs are added. Works on DDP-wrapped models.
    """
    dims = tuple(dims)
    bad = [d for d in dims if d not in GROUP_DIMS]
    if not dims or bad:
        raise ValueError(f"dims must be a non-empty subset of {GROUP_DIMS}, got {dims!r}")
    terms = [_channel_norms(t, d).sum() for t in _sparsified_tensors(model, include_pointwise) for d in dims]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def sparsity_penalty(model: nn.Module, l1: float = 0.0, group_l1: float = 0.0,
                     include_pointwise: bool = False, group_dims: Sequence[str] = ("out",)) -> torch.Tensor:
    """``l1 * l1_penalty + group_l1 * group_l1_penalty`` (terms with a zero weight are skipped)."""
    if l1 < 0 or group_l1 < 0:
        raise ValueError(f"penalty weights must be >= 0, got l1={l1}, group_l1={group_l1}")
    total = torch.zeros(())
    if l1 > 0:
        total = total + l1 * l1_penalty(model, include_pointwise)
    if group_l1 > 0:
        total = total + group_l1 * group_l1_penalty(model, group_dims, include_pointwise)
    return total
