"""The architecture recipe: the edits penni made to a model, saved as state and replayed on load.

Like ModelOpt's ``modelopt_state``: instead of pickling a model, we record which constructor
built it, which layers were decomposed with which d, and which channels and bases each layer
kept; ``penni.load`` rebuilds the model by replaying these edits, then loads the tensors.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

RECIPE_ATTR = "_penni_recipe"
RECIPE_VERSION = 1
AXES = ("out", "in", "basis")
MAX_D = 10_000                      # basis kernels per layer (kh*kw caps it further at replay)
MAX_INDEX = 2**31 - 1               # a kept channel / basis index
MAX_KWARGS_DEPTH = 16               # nesting of lists / dicts in constructor arguments
MAX_INT = 2**63 - 1                 # ints in constructor arguments fit an int64
LAYER_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
FACTORY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
KWARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Recipe:
    """Edits applied to a model since it was built by ``constructor``."""

    constructor: dict[str, Any] | None = None        # {"factory": "module:callable", "kwargs": {...}}
    decomposed: dict[str, int] = field(default_factory=dict)        # layer name -> d at decomposition
    kept: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # layer -> {"out"|"in"|"basis": indices}
    added_bias: list[str] = field(default_factory=list)             # layers given a bias by shrink's folding
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        version = data.get("version")
        if version != RECIPE_VERSION:
            raise ValueError(f"unsupported recipe version {version!r} (this penni reads version {RECIPE_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_data(cls, data: Any) -> "Recipe":
        """A recipe from untrusted JSON data, every field checked to be plain data of the expected shape."""
        if not isinstance(data, dict):
            raise TypeError(f"the recipe must be a JSON object, got {type(data).__name__}")
        recipe = cls.from_dict(data)
        check_constructor(recipe.constructor)
        check_decomposed(recipe.decomposed)
        check_kept(recipe.kept)
        check_added_bias(recipe.added_bias)
        return recipe

    def record_kept(self, layer: str, axis: str, kept: list[int]) -> None:
        """Compose newly kept indices (relative to the current layer) with earlier ones."""
        entry = self.kept.setdefault(layer, {})
        previous = entry.get(axis)
        entry[axis] = [previous[i] for i in kept] if previous is not None else list(kept)


def get_recipe(model: nn.Module) -> Recipe:
    """The recipe attached to ``model`` (created empty if missing)."""
    recipe = getattr(model, RECIPE_ATTR, None)
    if recipe is None:
        recipe = Recipe()
        object.__setattr__(model, RECIPE_ATTR, recipe)
    return recipe


def set_constructor(model: nn.Module, factory: str, **kwargs: Any) -> nn.Module:
    """Record how to rebuild ``model``: ``factory`` is ``"package.module:callable"``."""
    if ":" not in factory:
        raise ValueError(f"factory must look like 'package.module:callable', got {factory!r}")
    get_recipe(model).constructor = {"factory": factory, "kwargs": kwargs}
    return model


# --------------------------------------------------------------------------------------------
# checks of untrusted recipe data (ValueError / TypeError name the field)


def check_layer_name(name: Any, field_name: str) -> str:
    """A module path such as ``features.0.conv`` (no globs, no dunder tricks, bounded length)."""
    if (not isinstance(name, str) or len(name) > 1024 or not LAYER_NAME.fullmatch(name)
            or any(part.startswith("__") for part in name.split("."))):
        raise ValueError(f"{field_name}: {str(name)[:80]!r} is not a layer name (dotted letters, digits, _ and -)")
    return name


def check_plain_json(value: Any, where: str, depth: int = 0) -> None:
    """Only str, int, float, bool, None, lists and dicts with str keys, nested at most MAX_KWARGS_DEPTH."""
    if depth > MAX_KWARGS_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_KWARGS_DEPTH} levels")
    if value is None or isinstance(value, (str, bool)):
        return
    if type(value) is int:
        if abs(value) > MAX_INT:
            raise ValueError(f"{where}: the int {value} does not fit an int64")
    elif type(value) is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{where}: {value} is not a finite number")
    elif type(value) is list:
        for i, item in enumerate(value):
            check_plain_json(item, f"{where}[{i}]", depth + 1)
    elif type(value) is dict:
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
            check_plain_json(item, f"{where}[{key!r}]", depth + 1)
    else:
        raise TypeError(f"{where}: a {type(value).__name__} is not plain JSON data")


def check_constructor(constructor: Any) -> None:
    """``{"factory": "package.module:callable", "kwargs": {identifier: plain JSON}}``."""
    if not isinstance(constructor, dict) or set(constructor) != {"factory", "kwargs"}:
        raise TypeError("'constructor' must be {\"factory\": ..., \"kwargs\": {...}}")
    factory, kwargs = constructor["factory"], constructor["kwargs"]
    if not isinstance(factory, str) or len(factory) > 256 or not FACTORY_NAME.fullmatch(factory):
        raise ValueError(f"'constructor.factory' must look like 'package.module:callable', got {str(factory)[:80]!r}")
    if not isinstance(kwargs, dict):
        raise TypeError("'constructor.kwargs' must be a JSON object")
    for key in kwargs:
        if not isinstance(key, str) or not KWARG_NAME.fullmatch(key) or key.startswith("__"):
            raise ValueError(f"'constructor.kwargs': {str(key)[:80]!r} is not an argument name")
    check_plain_json(kwargs, "'constructor.kwargs'")


def check_decomposed(decomposed: Any) -> None:
    """Layer name -> d, an int in 1..MAX_D."""
    if not isinstance(decomposed, dict):
        raise TypeError("'decomposed' must map layer names to ints")
    for layer, d in decomposed.items():
        check_layer_name(layer, "'decomposed'")
        if type(d) is not int or not 1 <= d <= MAX_D:
            raise ValueError(f"'decomposed': d of {layer!r} must be an int in 1..{MAX_D}, got {d!r}")


def check_indices(idx: Any, where: str) -> None:
    """A strictly increasing list of ints in 0..MAX_INDEX (shrink keeps indices sorted and unique)."""
    if type(idx) is not list or not all(type(i) is int for i in idx):
        raise TypeError(f"{where} must be a list of ints")
    if any(i < 0 or i > MAX_INDEX for i in idx):
        raise ValueError(f"{where}: indices must be in 0..{MAX_INDEX}")
    if any(a >= b for a, b in zip(idx, idx[1:])):
        raise ValueError(f"{where}: indices must be sorted and unique")


def check_kept(kept: Any) -> None:
    """Layer name -> {axis: indices} with axis in AXES."""
    if not isinstance(kept, dict):
        raise TypeError("'kept' must map layer names to {axis: [int, ...]}")
    for layer, axes in kept.items():
        check_layer_name(layer, "'kept'")
        if not isinstance(axes, dict):
            raise TypeError(f"'kept'[{layer!r}] must map axes to lists of ints")
        for axis, idx in axes.items():
            if axis not in AXES:
                raise ValueError(f"'kept'[{layer!r}]: unknown axis {str(axis)[:20]!r} (one of {AXES})")
            check_indices(idx, f"'kept'[{layer!r}][{axis!r}]")


def check_added_bias(added_bias: Any) -> None:
    """A list of unique layer names."""
    if not isinstance(added_bias, list):
        raise TypeError("'added_bias' must be a list of layer names")
    for layer in added_bias:
        check_layer_name(layer, "'added_bias'")
    if len(set(added_bias)) != len(added_bias):
        raise ValueError("'added_bias' names a layer twice")
