"""save(model, path) / load(path): tensors in safetensors, the architecture as a JSON recipe.

A penni checkpoint is one safetensors file. Its tensors are the model's state dict under the
plain names (a held mask's *effective* value ``original * mask`` is saved as ``<layer>.<tensor>``,
never as ``parametrizations.*.original``) plus one tensor ``<layer>.<tensor>::mask`` per held
mask. Its metadata holds ``penni_format`` and ``penni_recipe``: the JSON recipe (which
constructor built the model with which arguments, which layers were decomposed with which d,
which channels and bases were kept, which layers were given a bias).

``load`` rebuilds the model by replaying the recipe, loads the tensors and holds the masks again,
so a checkpoint of a pruned model resumes fine-tuning with its masks held. A file can never run
code: nothing is unpickled (a ``torch.save`` file is refused with :class:`PenniFormatError`), the
constructor is looked up by name in the registry of model factories (:mod:`penni.factories`),
never imported, and every other field of the recipe is checked as data. The model is first built
and edited on the meta device and compared with the file's tensors, so sizes that do not fit the
file are refused before any memory is allocated.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from .conv import FORWARD_MODES, PenniConv2d
from .decompose import decompose, is_decomposable
from .factories import UnknownFactoryError, build_within_budget, get_factory
from .masking import HeldMask, get_mask, hold_mask, iter_masks
from .recipe import RECIPE_ATTR, Recipe, check_constructor, check_layer_name, get_recipe
from .slicing import add_bias, slice_in, slice_out, slice_penni_basis
from .unwrap import unwrap_model

__all__ = [
    "PenniFormatError", "save", "load", "save_state", "load_state", "recipe_json", "read_metadata",
    "FORMAT_VERSION", "MASK_SUFFIX", "MAX_RECIPE_BYTES", "MAX_HEADER_BYTES",
]

FORMAT_VERSION = "1"
FORMAT_KEY = "penni_format"
RECIPE_KEY = "penni_recipe"
MODES_KEY = "penni_forward_modes"
RESERVED_PREFIX = "penni_"
MASK_SUFFIX = "::mask"
MAX_RECIPE_BYTES = 16 * 2**20      # the JSON recipe in a file; larger ones are refused unread
MAX_HEADER_BYTES = 64 * 2**20      # the safetensors header (tensor index + metadata)
MIN_BUILD_BYTES = 2 * 2**30        # tensors a recipe may build before slicing, at least ...
BUILD_RATIO = 64                   # ... or this many times the bytes of the file's tensors

_CONVERT_HINT = (
    "To convert a checkpoint you trust: in a trusted environment, build the model, load the file "
    "yourself (e.g. model.load_state_dict(torch.load(path, weights_only=True))) and write it with "
    "penni.save(model, 'model.safetensors')."
)


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


def _tensors_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
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


def _split_masks(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = {k: v for k, v in tensors.items() if not k.endswith(MASK_SUFFIX)}
    masks = {k[: -len(MASK_SUFFIX)]: v for k, v in tensors.items() if k.endswith(MASK_SUFFIX)}
    orphans = sorted(set(masks) - set(state))
    if orphans:
        raise PenniFormatError(f"masks without a tensor: {orphans[:5]}")
    return state, masks


def _check_fit(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
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


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], what: str, adopt_dtypes: bool) -> None:
    state, masks = _split_masks(tensors)
    _check_fit(model, state, what)
    _drop_held_masks(model)
    if adopt_dtypes:
        _adopt_dtypes(model, state)
    model.load_state_dict(state, strict=True)
    for full, mask in masks.items():
        module_name, _, tensor_name = full.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        hold_mask(module, tensor_name, mask)


def _forward_modes(model: nn.Module) -> dict[str, str]:
    return {name: m.forward_mode for name, m in model.named_modules()
            if isinstance(m, PenniConv2d) and m.forward_mode != "reconstruct"}


def _penni_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, PenniConv2d)]


def _restore_forward_modes(model: nn.Module, modes: Mapping[str, str] | None) -> None:
    """Set the saved forward modes (``None``: keep the model's); "dense" layers re-bake their kernels."""
    for name, m in model.named_modules():
        if isinstance(m, PenniConv2d):
            mode = m.forward_mode if modes is None else modes.get(name, "reconstruct")
            if mode != "reconstruct" or m.forward_mode != "reconstruct":
                m.set_forward_mode(mode)


# --------------------------------------------------------------------------------------------
# recipe


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
        plain = json.loads(_dumps(dict(kwargs or {})))  # tuples become lists, as in the file
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


def _dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def recipe_json(model: nn.Module, constructor: Any = None) -> str:
    """The JSON recipe ``save`` would embed for ``model`` (canonical: sorted keys, compact)."""
    data = _recipe_dict(model, constructor)
    try:
        return _dumps(data)
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


def _call_factory(fn: Callable, kwargs: Mapping[str, Any], name: str, budget: int | None) -> nn.Module:
    """``fn(**kwargs)`` (within ``budget`` bytes when given); anything it raises is a PenniFormatError."""
    try:
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


def _build_on_meta(fn: Callable, kwargs: Mapping[str, Any]) -> nn.Module | None:
    """``fn(**kwargs)`` on the meta device (shapes only, no memory); None if it cannot run there."""
    try:
        with torch.device("meta"):
            model = fn(**kwargs)
    except Exception:  # data-dependent constructors (e.g. torchvision's RegNets), or bad arguments
        return None
    if not isinstance(model, nn.Module):
        return None
    model = unwrap_model(model)
    real = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    if real:
        raise PenniFormatError(f"the constructor put tensors on a real device while building on meta: {real[:3]}")
    return model


def _build_checked(recipe: Recipe, factories: Mapping[str, Callable] | None,
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
    meta = _build_on_meta(fn, kwargs)
    if meta is not None:
        if _tensor_bytes(meta) > budget:
            raise PenniFormatError(f"the constructor {name} with the recipe's arguments builds "
                                   f"{_tensor_bytes(meta):,} bytes of tensors, more than the {budget:,} "
                                   "its file can justify")
        _check_fit(_replay_edits(meta, recipe, budget), state, what)
        if not for_real:
            return meta
    model = _replay_edits(_call_factory(fn, kwargs, name, budget), recipe, budget)
    if meta is None:
        _check_fit(model, state, what)
    return model


def _verify(model: nn.Module, recipe_text: str, tensors: Mapping[str, torch.Tensor],
            factories: Mapping[str, Callable] | None) -> None:
    """Check that ``load`` would rebuild this model: registered constructor, names and shapes."""
    recipe = Recipe.from_data(json.loads(recipe_text))
    name = recipe.constructor["factory"]
    try:
        get_factory(name, factories)
    except UnknownFactoryError as err:
        raise ValueError(f"cannot save this {type(model).__name__} so that penni.load can rebuild it: {err} "
                         "(to save and load; or save with constructor=(a registered name, kwargs))") from None
    state, _ = _split_masks(dict(tensors))
    try:
        _build_checked(recipe, factories, state, "the tensors being saved", for_real=False)
    except PenniFormatError as err:
        raise ValueError(
            f"the recipe of this {type(model).__name__} does not rebuild it, so the file could not be "
            f"loaded: {err}. Were layers changed outside penni (decompose/shrink)? Record such edits "
            "in the constructor, or pass verify=False to save anyway") from err


# --------------------------------------------------------------------------------------------
# files


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str; entry {key!r}: {type(value).__name__} "
                            "(encode other values yourself, e.g. with json.dumps)")
        if key.startswith(RESERVED_PREFIX):
            raise ValueError(f"metadata key {key!r}: keys starting with {RESERVED_PREFIX!r} are reserved for penni")
    return dict(metadata)


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write to a temporary file next to ``path``, then rename: ``path`` is never half-written."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write(model: nn.Module, path: Any, metadata: Mapping[str, str] | None,
           recipe_text: str | None, verify: bool,
           factories: Mapping[str, Callable[..., nn.Module]] | None = None) -> None:
    user = _check_metadata(metadata)
    model = unwrap_model(model)
    tensors = _tensors_for_file(model)
    meta = {**user, FORMAT_KEY: FORMAT_VERSION}
    if recipe_text is not None:
        if verify:
            _verify(model, recipe_text, tensors, factories)
        meta[RECIPE_KEY] = recipe_text
    modes = _forward_modes(model)
    if modes:
        meta[MODES_KEY] = _dumps(modes)
    _atomic_save_file(tensors, os.fspath(path), meta)


def save(model: nn.Module, path: Any, metadata: Mapping[str, str] | None = None,
         constructor: Any = None, verify: bool = True,
         factories: Mapping[str, Callable[..., nn.Module]] | None = None) -> None:
    """Write ``model`` to ``path`` (one safetensors file: tensors + held masks + JSON recipe).

    ``metadata`` adds your own ``str -> str`` entries (keys ``penni_*`` are reserved).
    ``constructor=("package.module:callable", kwargs)`` says how to rebuild a model that was not
    built by ``penni.models.build_model`` nor given ``penni.set_constructor`` (it is written to the
    file only; the model is not changed). ``verify`` replays the recipe on the meta device first and
    refuses to write a file ``load`` could not rebuild: its constructor must be a registered factory
    (``penni.register_factory``) or be given in ``factories`` (pass the same to ``load``).
    DDP / DataParallel / torch.compile wrappers are unwrapped. The write is atomic: ``path`` holds
    either the old file or the complete new one.
    """
    _write(model, path, metadata, recipe_json(model, constructor), verify, factories)


def save_state(model: nn.Module, path: Any, metadata: Mapping[str, str] | None = None) -> None:
    """Write only the tensors of ``model`` (and its held masks) to a safetensors file, atomically.

    For checkpoints loaded back into an existing model with :func:`load_state`; no recipe needed.
    """
    _write(model, path, metadata, None, verify=False)


def _open_checked(path: Any) -> str:
    """Refuse anything that is not a safetensors file, naming pickles as such."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            _check_header(path, header_len)
            return path
    if head[:4] == b"PK\x03\x04":
        raise PenniFormatError(
            f"{path} is a torch.save checkpoint (a zip archive holding pickled code); penni will not "
            f"unpickle it. {_CONVERT_HINT}")
    if head[:1] == b"\x80":
        raise PenniFormatError(
            f"{path} is a pickle file (pickled Python code, e.g. an old-style torch.save checkpoint); "
            f"penni will not unpickle it. {_CONVERT_HINT}")
    raise PenniFormatError(f"{path} is not a safetensors file (penni reads only safetensors checkpoints written "
                           f"by penni.save / penni.save_state). {_CONVERT_HINT}")


def _check_header(path: str, header_len: int) -> None:
    """Refuse oversized headers unread, and headers that are not UTF-8 text."""
    if header_len > MAX_HEADER_BYTES:
        raise PenniFormatError(f"{path}: its safetensors header is {header_len:,} bytes, more than the "
                               f"{MAX_HEADER_BYTES:,} penni reads (a penni recipe is at most {MAX_RECIPE_BYTES:,})")
    with open(path, "rb") as fh:
        fh.seek(8)
        header = fh.read(header_len)
    try:
        header.decode("utf-8", errors="strict")
    except UnicodeDecodeError as err:
        raise PenniFormatError(f"{path}: its safetensors header (tensor index and metadata) is not "
                               f"UTF-8 text: {err}") from None


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except PenniFormatError:
        raise
    except Exception as err:  # safetensors_rust.SafetensorError and friends
        raise PenniFormatError(f"{path} is not a readable safetensors file: {err}") from err
    version = metadata.get(FORMAT_KEY)
    if version is not None and version != FORMAT_VERSION:
        raise PenniFormatError(f"{path} has penni format {version!r}; this penni reads format {FORMAT_VERSION!r}")
    return metadata, tensors


def read_metadata(path: Any) -> dict[str, str]:
    """The user metadata stored in a penni file (without the ``penni_*`` entries). Reads no tensors."""
    path = _open_checked(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
    except Exception as err:
        raise PenniFormatError(f"{path} is not a readable safetensors file: {err}") from err
    return {k: v for k, v in metadata.items() if not k.startswith(RESERVED_PREFIX)}


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a JSON object repeats a key: {sorted(k for k in set(keys) if keys.count(k) > 1)[:3]}")
    return dict(pairs)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number penni accepts")


def _strict_json(text: str, what: str, path: str) -> Any:
    """Parse metadata JSON strictly: bounded size, no NaN/Infinity, no repeated keys."""
    if not isinstance(text, str):
        raise PenniFormatError(f"{path}: {what} is not text")
    if len(text.encode("utf-8", errors="surrogatepass")) > MAX_RECIPE_BYTES:
        raise PenniFormatError(f"{path}: {what} is larger than {MAX_RECIPE_BYTES:,} bytes")
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        raise PenniFormatError(f"{path} has an unreadable {what}: {err}") from None


def _parse_modes(metadata: Mapping[str, str], path: str) -> dict[str, str]:
    """The saved forward modes: layer name -> one of FORWARD_MODES."""
    if MODES_KEY not in metadata:
        return {}
    modes = _strict_json(metadata[MODES_KEY], f"{MODES_KEY} metadata", path)
    try:
        if not isinstance(modes, dict):
            raise TypeError("not a JSON object")
        for layer, mode in modes.items():
            check_layer_name(layer, MODES_KEY)
            if mode not in FORWARD_MODES:
                raise ValueError(f"unknown forward mode {str(mode)[:20]!r} (one of {FORWARD_MODES})")
    except (TypeError, ValueError) as err:
        raise PenniFormatError(f"{path}: bad {MODES_KEY} metadata: {err}") from None
    return modes


def _parse_recipe(text: str, path: str) -> Recipe:
    """The recipe in a file, with every field checked to be plain data of the expected shape."""
    data = _strict_json(text, "penni recipe", path)
    try:
        return Recipe.from_data(data)
    except (TypeError, ValueError) as err:
        raise PenniFormatError(f"{path} has an unreadable penni recipe: {err}") from None


def load(path: Any, map_location: Any = "cpu",
         factories: Mapping[str, Callable[..., nn.Module]] | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save` from its recipe, load its tensors, hold its masks.

    Nothing is unpickled: pickled files (``torch.save``) are refused with :class:`PenniFormatError`.
    The recipe's constructor must be a registered factory (penni's ``build_model``, torchvision's
    builders, or one registered with ``penni.register_factory``), or be given explicitly as
    ``factories={"package.module:callable": callable}``; nothing named in the file is imported.
    Every field of the recipe is checked, and the model is built and edited on the meta device
    and compared with the file's tensors before it is built for real; anything that does not fit
    raises :class:`PenniFormatError`.
    The model adopts the file's dtypes and is moved to ``map_location``; it is in the train/eval
    mode its constructor leaves it in (train), with the forward modes it was saved with.
    """
    path = _open_checked(path)
    metadata, tensors = _read(path)
    if RECIPE_KEY not in metadata:
        raise PenniFormatError(
            f"{path} holds tensors but no penni recipe (written by penni.save_state or another tool?): "
            "load it into a model you build yourself with penni.load_state(model, path)")
    recipe = _parse_recipe(metadata[RECIPE_KEY], path)
    modes = _parse_modes(metadata, path)
    state, _ = _split_masks(tensors)
    model = _build_checked(recipe, factories, state, f"the tensors in {path}")
    _load_tensors(model, tensors, f"the tensors in {path}", adopt_dtypes=True)
    unknown = sorted(set(modes) - set(_penni_layer_names(model)))
    if unknown:
        raise PenniFormatError(f"{path}: {MODES_KEY} names layers that are not PenniConv2d layers of the "
                               f"model: {unknown[:5]}")
    _restore_forward_modes(model, modes)
    object.__setattr__(model, RECIPE_ATTR, recipe)
    return model if map_location is None else model.to(map_location)


def load_state(model: nn.Module, path: Any) -> nn.Module:
    """Load the tensors of a safetensors file into ``model`` (in place, strict), holding its masks.

    After loading, the masks held on ``model`` are exactly those in the file (masks the model
    held before are replaced; its Parameter objects are kept, so an existing optimizer stays
    valid). Tensors keep the model's dtypes and devices. Returns the (unwrapped) model.
    """
    path = _open_checked(path)
    _, tensors = _read(path)
    inner = unwrap_model(model)
    _load_tensors(inner, tensors, f"the tensors in {path}", adopt_dtypes=False)
    _restore_forward_modes(inner, None)  # keep the model's modes; re-bake "dense" kernels
    return inner
