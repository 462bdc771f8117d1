"""The recipe: which constructor built a model and which architecture edits penni made to it, replayed on load.

Like ModelOpt's modelopt_state, the edits (decompositions, kept channels and bases, added biases) are saved as data and
replayed on a freshly built model; the build happens on the meta device first, so a file's sizes are checked before
any memory is allocated.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..conv import PenniConv2d
from ..decomposition import decompose, is_decomposable
from ..recipe import RECIPE_ATTR, Recipe, check_constructor, get_recipe
from ..slicing import add_bias, slice_in, slice_out, slice_penni_basis
from ..unwrap import unwrap_model
from .factories import BuildBudgetExceeded, ConstructionBudget, UnknownFactoryError, build_within_budget, get_factory
from .tensors import PenniFormatError, check_fit, split_masks

MIN_BUILD_BYTES = 2 * 2**30        # tensors a recipe may build before slicing, at least ...
BUILD_RATIO = 64                   # ... or this many times the bytes of the file's tensors
MIN_BUILD_REGISTRATIONS = 20_000   # submodules, and parameters + buffers, a build may register, at least ...
REGISTRATIONS_PER_TENSOR = 16      # ... or this many per tensor of the file (a model has about 1-3)
BUILD_SECONDS = 60.0               # wall clock of one build (constructor and edits), on meta or for real


def _normalize_constructor(constructor: Any) -> dict[str, Any]:
    if isinstance(constructor, Mapping):
        factory, kwargs = constructor.get("factory"), constructor.get("kwargs", {})
    elif isinstance(constructor, (tuple, list)) and len(constructor) == 2:
        factory, kwargs = constructor
    else:
        raise TypeError(f"constructor must be ('package.module:callable', kwargs), got {constructor!r}")
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"constructor kwargs must be a dict, got {type(kwargs).__name__}")
    try:
        plain = json.loads(dumps_recipe(dict(kwargs or {})))  # tuples become lists, as in the file
    except (TypeError, ValueError) as err:
        raise TypeError(f"the constructor arguments of {factory} must be plain JSON data "
                        f"(str, int, float, bool, None, lists, dicts) to be saved: {err}") from None
    normalized = {"factory": factory, "kwargs": plain}
    check_constructor(normalized)
    return normalized


def _recipe_dict(model: nn.Module, constructor: Any = None) -> dict[str, Any]:
    model = unwrap_model(model)
    recipe = getattr(model, RECIPE_ATTR, None) or Recipe()
    data = recipe.to_dict()
    if constructor is not None:
        data["constructor"] = _normalize_constructor(constructor)
    if data.get("constructor") is None:
        raise ValueError(
            f"penni does not know how to rebuild this {type(model).__name__}: build it with "
            "penni.models.build_model, call penni.set_constructor(model, 'package.module:callable', **kwargs) "
            "before decomposing, or pass constructor=('package.module:callable', kwargs) to save")
    data["constructor"] = _normalize_constructor(data["constructor"])
    data["decomposed"] = {str(k): int(v) for k, v in data["decomposed"].items()}
    data["kept"] = {str(layer): {str(axis): [int(i) for i in idx] for axis, idx in axes.items()}
                    for layer, axes in data["kept"].items()}
    data["added_bias"] = [str(layer) for layer in data["added_bias"]]
    return data


def dumps_recipe(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def recipe_json(model: nn.Module, constructor: Any = None) -> str:
    """The JSON recipe ``save`` would embed for ``model`` (canonical: sorted keys, compact)."""
    data = _recipe_dict(model, constructor)
    try:
        return dumps_recipe(data)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"the constructor arguments of {data['constructor']['factory']} must be plain JSON data "
            f"(str, int, float, bool, None, lists, dicts) to be saved: {err}") from err


def _resolve_factory(factory: str, factories: Mapping[str, Callable] | None) -> Callable:
    """The registered factory named ``factory``; nothing is ever imported from a name in a file."""
    try:
        return get_factory(factory, factories)
    except UnknownFactoryError as err:
        raise PenniFormatError(str(err)) from None


def _tensor_bytes(module_or_state: nn.Module | Mapping[str, torch.Tensor]) -> int:
    tensors = (module_or_state.values() if isinstance(module_or_state, Mapping)
               else [*module_or_state.parameters(), *module_or_state.buffers()])
    return sum(t.numel() * t.element_size() for t in tensors)


def _build_budget(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensors a model rebuilt for these tensors may need before slicing (generous, bounded)."""
    return max(MIN_BUILD_BYTES, BUILD_RATIO * _tensor_bytes(state))


def _construction_budget(state: Mapping[str, torch.Tensor]) -> ConstructionBudget:
    """What a build for these tensors may register and how long it may take (generous, bounded by the file)."""
    bound = max(MIN_BUILD_REGISTRATIONS, REGISTRATIONS_PER_TENSOR * len(state))
    return ConstructionBudget(modules=bound, tensors=bound, seconds=BUILD_SECONDS)


def _call_factory(fn: Callable, kwargs: Mapping[str, Any], name: str, budget: int | None,
                  limits: ConstructionBudget | None = None) -> nn.Module:
    """``fn(**kwargs)`` (within ``budget`` bytes and ``limits`` when given); anything it raises is a PenniFormatError."""
    try:
        with limits or contextlib.nullcontext():
            model = build_within_budget(fn, kwargs, budget) if budget is not None else fn(**kwargs)
    except Exception as err:
        raise PenniFormatError(f"the constructor {name} refused the recipe's arguments: "
                               f"{type(err).__name__}: {str(err)[:300]}") from err
    if not isinstance(model, nn.Module):
        raise PenniFormatError(f"the constructor {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return unwrap_model(model)


def _axis_size(module: nn.Module, axis: str) -> int | None:
    """Current length of ``module``'s output channels, input channels or basis kernels.

    A custom layer sliced by a registered slicer tells its size with ``penni_axis_size(axis)``;
    a channel-padding shortcut's "out" axis is the zero channels it creates.
    """
    custom = getattr(type(module), "penni_axis_size", None)
    if callable(custom):
        size = custom(module, axis)
        return size if type(size) is int else None
    if axis == "basis":
        return module.d if isinstance(module, PenniConv2d) else None
    pads = (getattr(module, "pad_before", None), getattr(module, "pad_after", None))
    if axis == "out" and all(type(p) is int for p in pads):
        return pads[0] + pads[1]
    names = (("out_channels", "out_features", "num_features") if axis == "out"
             else ("in_channels", "in_features", "num_features"))
    for attr in names:
        value = getattr(module, attr, None)
        if type(value) is int:
            return value
    weight = getattr(module, "weight", None)
    dim = 0 if axis == "out" else 1
    return weight.shape[dim] if isinstance(weight, torch.Tensor) and weight.dim() > dim else None


def _replay_decompositions(model: nn.Module, decomposed: Mapping[str, int]) -> None:
    modules = dict(model.named_modules())
    for layer, d in decomposed.items():
        conv = modules.get(layer)
        if conv is None or not is_decomposable(conv):
            raise PenniFormatError(f"the recipe decomposes {layer!r}, which the rebuilt model does not have "
                                   "as a decomposable convolution")
        kh, kw = conv.kernel_size
        if d > kh * kw:
            raise PenniFormatError(f"the recipe decomposes {layer!r} with d={d}, more than its "
                                   f"{kh}x{kw} kernel allows")
    wanted = dict(decomposed)
    try:
        decompose(model, d=lambda name, conv: wanted.get(name), init="empty")
    except (RuntimeError, ValueError, TypeError) as err:
        raise PenniFormatError(f"cannot replay the recipe's decompositions: {err}") from err
    done = get_recipe(model).decomposed
    wrong = sorted(k for k, v in wanted.items() if done.get(k) != v)
    if wrong:
        raise PenniFormatError(f"the recipe decomposes layers that the rebuilt model cannot decompose "
                               f"that way: {wrong[:5]}")


def _replay_slicing(model: nn.Module, kept: Mapping[str, Mapping[str, list[int]]]) -> None:
    modules = dict(model.named_modules())
    for layer, axes in kept.items():
        module = modules.get(layer)
        if module is None:
            raise PenniFormatError(f"the recipe slices layer {layer!r}, which the rebuilt model does not have")
        for axis in ("basis", "out", "in"):
            if axis not in axes:
                continue
            idx, size = axes[axis], _axis_size(module, axis)
            if size is None:
                raise PenniFormatError(f"the recipe slices {axis!r} of layer {layer!r}, a "
                                       f"{type(module).__name__} that has no such axis")
            if idx and idx[-1] >= size:
                raise PenniFormatError(f"the recipe keeps index {idx[-1]} of {axis!r} of layer {layer!r}, "
                                       f"which has only {size}")
            try:
                if axis == "basis":
                    slice_penni_basis(module, torch.as_tensor(idx, dtype=torch.long))
                else:
                    (slice_out if axis == "out" else slice_in)(module, idx)
            except (IndexError, RuntimeError, TypeError, ValueError) as err:
                raise PenniFormatError(f"cannot replay the kept indices of layer {layer!r}: {err}") from err


def _replay_biases(model: nn.Module, added_bias: list[str]) -> None:
    modules = dict(model.named_modules())
    for layer in added_bias:
        module = modules.get(layer)
        if module is None or not hasattr(module, "bias"):
            raise PenniFormatError(f"the recipe adds a bias to {layer!r}, which the rebuilt model lacks "
                                   "or which takes no bias")
        if module.bias is None:
            ref = module.coefficients if isinstance(module, PenniConv2d) else module.weight
            count = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
            if count is None:
                raise PenniFormatError(f"cannot tell the output size of {layer!r} to add its bias")
            add_bias(module, torch.zeros(count, dtype=ref.dtype, device=ref.device))


def _replay_edits(model: nn.Module, recipe: Recipe, budget: int) -> nn.Module:
    """Decompose, slice and add biases as the recipe says, checking each step against the model."""
    if recipe.decomposed:
        _replay_decompositions(model, recipe.decomposed)
        if _tensor_bytes(model) > budget:
            raise PenniFormatError(f"the recipe's decompositions need {_tensor_bytes(model):,} bytes of "
                                   f"tensors, more than the {budget:,} its file can justify")
    _replay_slicing(model, recipe.kept)
    _replay_biases(model, recipe.added_bias)
    return model


def _build_on_meta(fn: Callable, kwargs: Mapping[str, Any], name: str, limits: ConstructionBudget) -> nn.Module | None:
    """``fn(**kwargs)`` on the meta device (shapes only, no memory), within ``limits``; None if it cannot run there."""
    try:
        with torch.device("meta"), limits:
            model = fn(**kwargs)
    except BuildBudgetExceeded as err:
        raise PenniFormatError(f"the constructor {name} with the recipe's arguments: {err}") from None
    except Exception:  # noqa: BLE001 - data-dependent constructors (e.g. torchvision's RegNets), or bad arguments
        return None
    if not isinstance(model, nn.Module):
        return None
    model = unwrap_model(model)
    real = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    if real:
        raise PenniFormatError(f"the constructor put tensors on a real device while building on meta: {real[:3]}")
    return model


def build_checked(recipe: Recipe, factories: Mapping[str, Callable] | None,
                   state: Mapping[str, torch.Tensor], what: str, for_real: bool = True) -> nn.Module:
    """Build the model the recipe describes, refusing before allocating if it cannot fit ``state``.

    The constructor and every edit run first on the meta device, and the result's names and
    shapes are compared with ``state``; only then is the model built for real. A constructor that
    cannot run on meta is built for real within a byte budget (see :func:`_build_budget`).
    """
    if not recipe.constructor:
        raise PenniFormatError("the recipe has no constructor")
    name, kwargs = recipe.constructor["factory"], recipe.constructor["kwargs"]
    fn = _resolve_factory(name, factories)
    budget = _build_budget(state)
    meta = _build_on_meta(fn, kwargs, name, _construction_budget(state))
    if meta is not None:
        if _tensor_bytes(meta) > budget:
            raise PenniFormatError(f"the constructor {name} with the recipe's arguments builds "
                                   f"{_tensor_bytes(meta):,} bytes of tensors, more than the {budget:,} "
                                   "its file can justify")
        check_fit(_replay_edits(meta, recipe, budget), state, what)
        if not for_real:
            return meta
    model = _replay_edits(_call_factory(fn, kwargs, name, budget, _construction_budget(state)), recipe, budget)
    if meta is None:
        check_fit(model, state, what)
    return model


def verify_rebuild(model: nn.Module, recipe_text: str, tensors: Mapping[str, torch.Tensor],
            factories: Mapping[str, Callable] | None) -> None:
    """Check that ``load`` would rebuild this model: registered constructor, names and shapes."""
    recipe = Recipe.from_data(json.loads(recipe_text))
    name = recipe.constructor["factory"]
    try:
        get_factory(name, factories)
    except UnknownFactoryError as err:
        raise ValueError(f"cannot save this {type(model).__name__} so that penni.load can rebuild it: {err} "
                         "(to save and load; or save with constructor=(a registered name, kwargs))") from None
    state, _ = split_masks(dict(tensors))
    try:
        build_checked(recipe, factories, state, "the tensors being saved", for_real=False)
    except PenniFormatError as err:
        raise ValueError(
            f"the recipe of this {type(model).__name__} does not rebuild it, so the file could not be "
            f"loaded: {err}. Were layers changed outside penni (decompose/shrink)? Record such edits "
            "in the constructor, or pass verify=False to save anyway") from err
