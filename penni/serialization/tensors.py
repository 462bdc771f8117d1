"""A model's tensors as penni files hold them: held masks saved as effective values plus ``::mask`` tensors."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..conv import PenniConv2d
from ..masking import HeldMask, get_mask, hold_mask, iter_masks

MASK_SUFFIX = "::mask"


class PenniFormatError(ValueError):
    """The file is not a penni checkpoint penni is willing to load (pickle, foreign data, bad recipe)."""



# --------------------------------------------------------------------------------------------
# model <-> tensors




def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _effective_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(state under plain names with parametrized tensors' effective values, masks)``."""
    state = dict(model.state_dict())
    masks: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            full = _join(module_name, tensor_name)
            prefix = _join(module_name, f"parametrizations.{tensor_name}.")
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
            with torch.no_grad():
                state[full] = getattr(module, tensor_name).detach()
            mask = get_mask(module, tensor_name)
            if mask is not None:
                masks[full + MASK_SUFFIX] = mask.detach()
    return state, masks


def tensors_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    """Effective state + masks, as independent contiguous CPU tensors (safetensors refuses
    tensors that share memory, e.g. tied weights, and non-contiguous ones)."""
    state, masks = _effective_state(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for key, tensor in {**state, **masks}.items():
        t = tensor.detach()
        if t.device.type == "meta":
            raise ValueError(f"cannot save {key!r}: it is a meta tensor (no data)")
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu()
        storage = (t.device.type, t.untyped_storage().data_ptr()) if t.numel() else None
        if (storage is not None and storage in seen) or not t.is_contiguous():
            t = t.contiguous().clone()
        elif storage is not None:
            seen.add(storage)
        out[key] = t
    return out


def split_masks(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = {k: v for k, v in tensors.items() if not k.endswith(MASK_SUFFIX)}
    masks = {k[: -len(MASK_SUFFIX)]: v for k, v in tensors.items() if k.endswith(MASK_SUFFIX)}
    orphans = sorted(set(masks) - set(state))
    if orphans:
        raise PenniFormatError(f"masks without a tensor: {orphans[:5]}")
    return state, masks


def check_fit(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a readable error unless ``state`` has exactly the model's names and shapes."""
    expected, _ = _effective_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing from the file: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"shape mismatches: {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise PenniFormatError(f"{what} do not fit the model ({len(missing)} missing, {len(unexpected)} "
                               f"unexpected, {len(wrong)} wrong shapes): " + "; ".join(parts))


def _drop_held_masks(model: nn.Module) -> None:
    for module_name, module, tensor_name, _ in list(iter_masks(model)):
        if not all(isinstance(p, HeldMask) for p in module.parametrizations[tensor_name]):
            raise ValueError(f"{_join(module_name, tensor_name)} has parametrizations other than a held mask; "
                             "penni cannot load tensors into it")
        # keeps the same Parameter object, so optimizers built before loading stay valid
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)


def _adopt_dtypes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give the model's tensors the dtypes of the file (in place, keeping tied tensors tied)."""
    for key, value in state.items():
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        target = getattr(module, name)
        if isinstance(target, torch.Tensor) and target.dtype != value.dtype:
            target.data = target.data.to(value.dtype)


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], what: str, adopt_dtypes: bool) -> None:
    state, masks = split_masks(tensors)
    check_fit(model, state, what)
    _drop_held_masks(model)
    if adopt_dtypes:
        _adopt_dtypes(model, state)
    model.load_state_dict(state, strict=True)
    for full, mask in masks.items():
        module_name, _, tensor_name = full.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        hold_mask(module, tensor_name, mask)


def forward_modes(model: nn.Module) -> dict[str, str]:
    return {name: m.forward_mode for name, m in model.named_modules()
            if isinstance(m, PenniConv2d) and m.forward_mode != "reconstruct"}


def penni_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, PenniConv2d)]


def restore_forward_modes(model: nn.Module, modes: Mapping[str, str] | None) -> None:
    """Set the saved forward modes (``None``: keep the model's); "dense" layers re-bake their kernels."""
    for name, m in model.named_modules():
        if isinstance(m, PenniConv2d):
            mode = m.forward_mode if modes is None else modes.get(name, "reconstruct")
            if mode != "reconstruct" or m.forward_mode != "reconstruct":
                m.set_forward_mode(mode)
