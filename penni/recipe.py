"""The architecture recipe: the edits penni made to a model, saved as state and replayed on load.

Like ModelOpt's ``modelopt_state``: instead of pickling a model, we record which constructor
built it, which layers were decomposed with which d, and which channels and bases each layer
kept; ``penni.load`` rebuilds the model by replaying these edits, then loads the tensors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

RECIPE_ATTR = "_penni_recipe"
RECIPE_VERSION = 1


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
