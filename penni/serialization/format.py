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
constructor is looked up by name in the registry of model factories (:mod:`penni.serialization.factories`),
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

from ..conv import FORWARD_MODES
from ..recipe import RECIPE_ATTR, Recipe, check_layer_name
from ..unwrap import unwrap_model
from .replay import build_checked, dumps_recipe, recipe_json, verify_rebuild
from .tensors import (
    PenniFormatError,
    forward_modes,
    load_tensors,
    penni_layer_names,
    restore_forward_modes,
    split_masks,
    tensors_for_file,
)

__all__ = [
    "save", "load", "save_state", "load_state", "read_metadata", "FORMAT_VERSION", "MAX_RECIPE_BYTES",
    "MAX_HEADER_BYTES",
]

FORMAT_VERSION = "1"
FORMAT_KEY = "penni_format"
RECIPE_KEY = "penni_recipe"
MODES_KEY = "penni_forward_modes"
RESERVED_PREFIX = "penni_"
MAX_RECIPE_BYTES = 16 * 2**20      # the JSON recipe in a file; larger ones are refused unread
MAX_HEADER_BYTES = 64 * 2**20      # the safetensors header (tensor index + metadata)

_CONVERT_HINT = (
    "To convert a checkpoint you trust: in a trusted environment, build the model, load the file "
    "yourself (e.g. model.load_state_dict(torch.load(path, weights_only=True))) and write it with "
    "penni.save(model, 'model.safetensors')."
)


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
    tensors = tensors_for_file(model)
    meta = {**user, FORMAT_KEY: FORMAT_VERSION}
    if recipe_text is not None:
        if verify:
            verify_rebuild(model, recipe_text, tensors, factories)
        meta[RECIPE_KEY] = recipe_text
    modes = forward_modes(model)
    if modes:
        meta[MODES_KEY] = dumps_recipe(modes)
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
    state, _ = split_masks(tensors)
    model = build_checked(recipe, factories, state, f"the tensors in {path}")
    load_tensors(model, tensors, f"the tensors in {path}", adopt_dtypes=True)
    unknown = sorted(set(modes) - set(penni_layer_names(model)))
    if unknown:
        raise PenniFormatError(f"{path}: {MODES_KEY} names layers that are not PenniConv2d layers of the "
                               f"model: {unknown[:5]}")
    restore_forward_modes(model, modes)
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
    load_tensors(inner, tensors, f"the tensors in {path}", adopt_dtypes=False)
    restore_forward_modes(inner, None)  # keep the model's modes; re-bake "dense" kernels
    return inner
