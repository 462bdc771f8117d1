"""Held masks: pruned entries stay exactly zero through any optimizer, resumed state and DDP.

A mask is a ``torch.nn.utils.parametrize`` parametrization, so the tensor a layer computes with
is ``original * mask``: whatever SGD momentum, AdamW's decoupled decay or a resumed optimizer
state do to ``original``, the effective value at a pruned entry is exactly 0 (the reference
code only masked gradients, which breaks with Adam and resumed momentum).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class HeldMask(nn.Module):
    """Parametrization multiplying a tensor by a fixed 0/1 mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def _held(module: nn.Module, name: str) -> HeldMask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, HeldMask):
            return p
    return None


def hold_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Hold ``module.<name>`` at zero where ``mask`` is 0 (combined with any mask already held)."""
    tensor = getattr(module, name)
    mask = mask.to(device=tensor.device, dtype=tensor.dtype)
    if mask.shape != tensor.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} {tuple(tensor.shape)}")
    existing = _held(module, name)
    with torch.no_grad():
        if existing is not None:
            existing.mask.mul_(mask)
            module.parametrizations[name].original.mul_(existing.mask)
            return
        getattr(module, name).mul_(mask)  # zero the raw values too, so state_dicts are clean
        parametrize.register_parametrization(module, name, HeldMask(mask))


def get_mask(module: nn.Module, name: str) -> torch.Tensor | None:
    """The mask held on ``module.<name>``, or None."""
    held = _held(module, name)
    return None if held is None else held.mask


def iter_masks(model: nn.Module):
    """Yield ``(module_name, module, tensor_name, mask)`` for every held mask in ``model``."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            held = _held(module, tensor_name)
            if held is not None:
                yield module_name, module, tensor_name, held.mask


def _unshare_parametrized_class(module: nn.Module) -> None:
    """Give a parametrized module its own class before removing a parametrization.

    ``copy.deepcopy`` keeps the dynamic ``Parametrized<Layer>`` class of the original, and
    ``remove_parametrizations`` deletes the property from that class: baking a copy's masks
    would break the original model. A private class per module avoids that.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def bake_masks(model: nn.Module) -> nn.Module:
    """Remove every held mask, leaving the masked values in plain parameters (in place).

    Safe on deep copies: the original model keeps its masks.
    """
    for _, module, tensor_name, _ in list(iter_masks(model)):
        _unshare_parametrized_class(module)
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model


def raw_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """The trainable parameter behind ``module.<name>`` (the parametrization's original, if any)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)
