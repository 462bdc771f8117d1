"""prune(): zero small coefficients (per-layer std rule or global sparsity) and hold them at zero.

Element-wise rules (``std``, ``sparsity``) give the paper's sparse MACs, which no dense kernel
skips. Whole coupled channel groups are removed by :func:`penni.prune_channels` (``channel_pruning``),
aimed at a dense-MAC or parameter target, so that ``shrink`` really narrows the network; the two
combine (masks held by one are kept by the other).
"""
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
    """Zero small coefficients of ``model`` in place and hold them at zero.

    ``rule="std"``: per layer, zero entries with ``|c| < s * std(c)`` (the reference's rule).
    ``rule="sparsity"``: zero the smallest magnitudes over all layers together so that a
    fraction ``target`` of the prunable entries is zero. ``include_pointwise`` also prunes the
    weights of 1x1 convs. Returns layer -> fraction of zero entries.
    Masks combine with masks already held (e.g. by :func:`penni.prune_channels`, which removes
    whole channel groups), so rules can be applied one after the other.
    """
    exclude = set(exclude)
    if rule == "channels":
        raise ValueError("prune() zeroes single coefficients (rule 'std' or 'sparsity'); whole channels are "
                         "removed by penni.prune_channels(model, target, example_inputs, cost=...)")
    tensors = [t for t in prunable_tensors(model, include_pointwise) if t[0] not in exclude]
    if not tensors:
        raise ValueError("prune found nothing to prune: decompose the model first (penni.decompose)")
    thresholds = _element_thresholds(tensors, rule, s, target)
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


def _element_thresholds(tensors: list[tuple[str, nn.Module, str]], rule: str, s: float,
                        target: float | None) -> dict[str, torch.Tensor]:
    """Per prunable tensor, the magnitude under which the element rule ``rule`` zeroes an entry."""
    if rule == "std":
        if s <= 0:
            raise ValueError(f"s must be > 0, got {s}")
        return {name: s * getattr(m, t).detach().float().std(unbiased=False) for name, m, t in tensors}
    elif rule == "sparsity":
        if target is None or not 0.0 < target < 1.0:
            raise ValueError(f"rule='sparsity' needs a target in (0, 1), got {target!r}")
        magnitudes = torch.cat([getattr(m, t).detach().abs().flatten().float() for _, m, t in tensors])
        k = int(round(target * magnitudes.numel()))
        threshold = magnitudes.kthvalue(k).values if k > 0 else magnitudes.new_tensor(-1.0)
        return {name: threshold for name, _, _ in tensors}
    else:
        raise ValueError(f"unknown pruning rule {rule!r}: use 'std' or 'sparsity' (channels: penni.prune_channels)")


def prunable_fraction(model: nn.Module, rule: str = "std", s: float = 1.0, target: float | None = None,
                      include_pointwise: bool = False) -> float:
    """Fraction of the prunable entries that the element rule ``rule`` ("std" or "sparsity") would zero now.

    Leaves the model unchanged: during sparse retraining it shows how far the L1 penalty has pushed the
    coefficients towards what pruning will remove (entries already zero count as removed).
    """
    tensors = prunable_tensors(model, include_pointwise)
    if not tensors:
        return 0.0
    thresholds = _element_thresholds(tensors, rule, s, target)
    removed = total = 0
    with torch.no_grad():
        for name, module, tensor_name in tensors:
            values = getattr(module, tensor_name).detach().float().abs()
            below = values < thresholds[name] if rule == "std" else values <= thresholds[name]
            removed += int((below | (values == 0)).sum())
            total += values.numel()
    return removed / total


def hold_zeros(model: nn.Module, include_pointwise: bool = False) -> None:
    """Hold every entry that is exactly zero now (e.g. after loading a pruned checkpoint)."""
    for _, module, tensor_name in prunable_tensors(model, include_pointwise):
        values = getattr(module, tensor_name).detach()
        hold_mask(module, tensor_name, (values != 0).to(values.dtype))


def layer_sparsity(model: nn.Module, include_pointwise: bool = False) -> dict[str, float]:
    """Layer -> fraction of exactly-zero entries of its prunable tensor (whatever rule zeroed them)."""
    return {name: float((getattr(m, t).detach() == 0).float().mean())
            for name, m, t in prunable_tensors(model, include_pointwise)}


def coefficient_sparsity(model: nn.Module, include_pointwise: bool = False) -> float:
    """Fraction of exactly-zero entries over all prunable tensors (with ``abs``: the reference's
    log forgot it and counted every negative coefficient as zero)."""
    total = zeros = 0
    for _, module, tensor_name in prunable_tensors(model, include_pointwise):
        values = getattr(module, tensor_name).detach()
        total += values.numel()
        zeros += int((values == 0).sum())
    return zeros / total if total else 0.0
