"""prune(): zero small coefficients and hold them at zero (per-layer std rule or global sparsity)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .conv import PenniConv2d
from .masking import get_mask, hold_mask
from .regularization import is_pointwise


def prunable_tensors(model: nn.Module, include_pointwise: bool = False) -> list[tuple[str, nn.Module, str]]:
    """``(layer name, module, tensor name)`` of every tensor ``prune`` may sparsify."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, PenniConv2d):
            found.append((name, module, "coefficients"))
        elif include_pointwise and is_pointwise(module):
            found.append((name, module, "weight"))
    return found


def prune(
    model: nn.Module,
    rule: str = "std",
    s: float = 1.0,
    target: float | None = None,
    include_pointwise: bool = False,
    exclude: Iterable[str] = (),
) -> dict[str, float]:
    """Zero small coefficients of ``model`` in place and hold them at zero; returns layer -> sparsity.

    ``rule="std"``: per layer, zero entries with ``|c| < s * std(c)`` (the reference's rule).
    ``rule="sparsity"``: zero the smallest magnitudes over all layers together so that a
    fraction ``target`` of the prunable entries is zero. Masks combine with masks already held.
    ``include_pointwise`` also prunes the weights of 1x1 convs.
    """
    exclude = set(exclude)
    tensors = [t for t in prunable_tensors(model, include_pointwise) if t[0] not in exclude]
    if not tensors:
        raise ValueError("prune found nothing to prune: decompose the model first (penni.decompose)")
    if rule == "std":
        if s <= 0:
            raise ValueError(f"s must be > 0, got {s}")
        thresholds = {name: s * getattr(m, t).detach().float().std(unbiased=False) for name, m, t in tensors}
    elif rule == "sparsity":
        if target is None or not 0.0 < target < 1.0:
            raise ValueError(f"rule='sparsity' needs a target in (0, 1), got {target!r}")
        magnitudes = torch.cat([getattr(m, t).detach().abs().flatten().float() for _, m, t in tensors])
        k = int(round(target * magnitudes.numel()))
        threshold = magnitudes.kthvalue(k).values if k > 0 else magnitudes.new_tensor(-1.0)
        thresholds = {name: threshold for name, _, _ in tensors}
    else:
        raise ValueError(f"unknown pruning rule {rule!r}: use 'std' or 'sparsity'")
    sparsity = {}
    for name, module, tensor_name in tensors:
        values = getattr(module, tensor_name).detach()
        if rule == "std":
            keep = values.abs() >= thresholds[name]
        else:
            keep = values.abs() > thresholds[name]
        hold_mask(module, tensor_name, keep.to(values.dtype))
        sparsity[name] = 1.0 - float(get_mask(module, tensor_name).mean())
    return sparsity


def hold_zeros(model: nn.Module, include_pointwise: bool = False) -> None:
    """Hold every entry that is exactly zero now (e.g. after loading a pruned checkpoint)."""
    for _, module, tensor_name in prunable_tensors(model, include_pointwise):
        values = getattr(module, tensor_name).detach()
        hold_mask(module, tensor_name, (values != 0).to(values.dtype))


def coefficient_sparsity(model: nn.Module, include_pointwise: bool = False) -> float:
    """Fraction of exactly-zero entries over all prunable tensors (with ``abs``: the reference's
    log forgot it and counted every negative coefficient as zero)."""
    total = zeros = 0
    for _, module, tensor_name in prunable_tensors(model, include_pointwise):
        values = getattr(module, tensor_name).detach()
        total += values.numel()
        zeros += int((values == 0).sum())
    return zeros / total if total else 0.0
