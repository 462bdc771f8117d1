"""The model factories ``penni.load`` may call: an explicit registry, never a dotted path from a file.

A recipe names its constructor (``"penni.models:build_model"``); ``load`` looks that name up here
and nowhere else. Nothing named in a file is ever imported. The registry holds:

- factories registered in code: ``penni.register_factory("mypkg:build", build)`` (``penni.models``
  registers its own ``"penni.models:build_model"`` when imported, and ``import penni`` imports it: this
  module never imports the models, which sit above it);
- torchvision's model builders, found only through ``torchvision.models.list_models()`` and
  ``get_model_builder``: ``"torchvision.models:resnet50"`` (or the defining module,
  ``"torchvision.models.resnet:resnet50"``). They are always built without pretrained weights
  (the file holds the weights; ``load`` never downloads).

``build_within_budget`` calls a factory while refusing any tensor allocation beyond a byte
budget, for constructors that cannot be built on the meta device first. :class:`ConstructionBudget`
bounds what any build may register (modules, tensors) and how long it may take, checked at every
registration, so a recipe asking for 200,000 tiny blocks stops within seconds.
"""
from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..recipe import FACTORY_NAME

__all__ = ["register_factory", "get_factory", "registered_factories", "UnknownFactoryError", "without_downloads",
           "TORCHVISION_PREFIX", "build_within_budget", "BuildBudgetExceeded", "ConstructionBudget"]

Factory = Callable[..., nn.Module]
TORCHVISION_PREFIX = "torchvision.models"
DOWNLOAD_ARGS = ("weights", "weights_backbone")

_REGISTRY: dict[str, Factory] = {}


class UnknownFactoryError(LookupError):
    """The recipe names a constructor that is not registered (and is therefore never called)."""


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not FACTORY_NAME.fullmatch(name):
        raise ValueError(f"a factory name looks like 'package.module:callable', got {name!r}")
    return name


def register_factory(name: str, fn: Factory, replace: bool = False) -> Factory:
    """Let ``penni.load`` rebuild models whose recipe names ``name`` by calling ``fn(**kwargs)``."""
    _check_name(name)
    if not callable(fn):
        raise TypeError(f"the factory registered as {name!r} must be callable, got {type(fn).__name__}")
    if name.startswith(TORCHVISION_PREFIX + ":") or name.startswith(TORCHVISION_PREFIX + "."):
        raise ValueError(f"{name!r}: names under {TORCHVISION_PREFIX} are torchvision's builders; "
                         "register your factory under your own package name")
    current = _REGISTRY.get(name)
    if current is not None and current is not fn and not replace:
        raise ValueError(f"a different factory is already registered as {name!r}; pass replace=True to replace it")
    _REGISTRY[name] = fn
    return fn


def _torchvision_builder(name: str) -> Factory | None:
    """torchvision's builder for ``torchvision.models[.<module>]:<model>``, looked up by model name only."""
    module_name, _, model_name = name.partition(":")
    if not (module_name == TORCHVISION_PREFIX or module_name.startswith(TORCHVISION_PREFIX + ".")):
        return None
    try:
        from torchvision import models
    except ImportError:
        return None
    if model_name not in models.list_models():
        return None
    builder = models.get_model_builder(model_name)
    home = getattr(builder, "__module__", "")
    if module_name != TORCHVISION_PREFIX and not (home == module_name or home.startswith(module_name + ".")):
        return None
    return _without_pretrained_weights(builder, name)


def _refuse_downloads(kwargs: Mapping[str, Any], name: str) -> None:
    for arg in DOWNLOAD_ARGS:
        if kwargs.get(arg) is not None:
            raise ValueError(f"{name} is rebuilt without pretrained weights (the file holds the weights; "
                             f"penni.load never downloads); got {arg}={kwargs[arg]!r}")


def without_downloads(fn: Factory, name: str) -> Factory:
    """``fn`` refusing ``weights=`` / ``weights_backbone=`` arguments that would download weights."""
    def build(**kwargs: Any) -> nn.Module:
        _refuse_downloads(kwargs, name)
        return fn(**kwargs)

    return build


def _without_pretrained_weights(builder: Factory, name: str) -> Factory:
    """``builder`` called with ``weights=None`` (and ``weights_backbone=None`` where it takes one)."""
    params = inspect.signature(builder).parameters

    def build(**kwargs: Any) -> nn.Module:
        _refuse_downloads(kwargs, name)
        kwargs.update({arg: None for arg in DOWNLOAD_ARGS if arg in params})
        return builder(**kwargs)

    return build


def get_factory(name: str, factories: Mapping[str, Factory] | None = None) -> Factory:
    """The callable registered as ``name`` (``factories`` first, then the registry, then torchvision)."""
    if factories and name in factories:
        fn = factories[name]
        if not callable(fn):
            raise TypeError(f"factories[{name!r}] is not callable")
        return fn
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    builder = _torchvision_builder(name) if isinstance(name, str) else None
    if builder is not None:
        return builder
    raise UnknownFactoryError(
        f"the constructor {name!r} is not a registered model factory (registered: "
        f"{', '.join(sorted(_REGISTRY)) or 'none'}, and torchvision.models:<name> for torchvision's "
        f"builders); if you trust it, register it in code with penni.register_factory({name!r}, fn) "
        f"or pass factories={{{name!r}: fn}}")


def registered_factories() -> list[str]:
    """The names of the factories registered in code (torchvision's builders come on top)."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------
# building with a memory budget


class BuildBudgetExceeded(MemoryError):
    """A constructor asked for more tensor memory than the budget allows (nothing was allocated)."""


def _requested_bytes(func: Any, args: tuple, kwargs: dict) -> int | None:
    """Bytes a tensor-creating op (one with a ``size`` argument, or ``arange``) will allocate."""
    schema = func._schema
    if any(ret.alias_info is not None for ret in schema.returns):
        return None  # views and in-place ops allocate nothing
    values = {arg.name: (args[i] if i < len(args) else kwargs.get(arg.name))
              for i, arg in enumerate(schema.arguments)}
    if "size" in values and values["size"] is not None:
        size = values["size"]
        numel = math.prod(int(s) for s in size) if not any(int(s) < 0 for s in size) else -1
    elif schema.name == "aten::arange":
        start = values.get("start") or 0
        end, step = values.get("end"), values.get("step") or 1
        numel = max(0, math.ceil((float(end) - float(start)) / float(step))) if end is not None else 0
    else:
        return None
    dtype = values.get("dtype")
    if dtype is None:
        first = values.get("self")
        dtype = first.dtype if isinstance(first, torch.Tensor) else torch.get_default_dtype()
    return numel * dtype.itemsize if numel >= 0 else -1


class _AllocationBudget(TorchDispatchMode):
    """Refuse ops that would take the tensors created so far beyond ``budget`` bytes.

    Creation ops (``empty``, ``zeros``, ``full``, ``rand``, ``arange``...) are checked before they
    allocate; other new tensors (``clone``, ``cat``...) are counted after. Temporaries count too.
    """

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget, self.used = budget, 0

    def _charge(self, nbytes: int, what: Any) -> None:
        if nbytes < 0:
            raise BuildBudgetExceeded(f"{what} was asked for a negative size")
        self.used += nbytes
        if self.used > self.budget:
            raise BuildBudgetExceeded(f"building the model needs more than {self.budget:,} bytes of tensors "
                                      f"({what} asked for {nbytes:,} bytes)")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        requested = _requested_bytes(func, args, kwargs)
        if requested is not None:
            self._charge(requested, func)
        out = func(*args, **kwargs)
        if requested is None:
            inputs = {t.untyped_storage().data_ptr() for t in (*args, *kwargs.values())
                      if isinstance(t, torch.Tensor) and t.device.type != "meta"}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if (isinstance(t, torch.Tensor) and t.device.type != "meta"
                        and t.untyped_storage().data_ptr() not in inputs):
                    self._charge(t.untyped_storage().nbytes(), func)
        return out


class ConstructionBudget:
    """``with ConstructionBudget(modules, tensors, seconds):`` refuses (with :class:`BuildBudgetExceeded`) a build
    that registers more submodules or parameters and buffers than given, or runs longer than ``seconds``.

    Counted through torch's global registration hooks, so the check runs while the constructor builds, on meta or
    for real, and stops it at the first registration over a bound. (A build in another thread meanwhile counts too.)
    """

    def __init__(self, modules: int, tensors: int, seconds: float) -> None:
        self.limits = {"submodules": modules, "parameters and buffers": tensors}
        self.counts = dict.fromkeys(self.limits, 0)
        self.seconds = seconds
        self._handles: list[Any] = []

    def _count(self, what: str) -> None:
        self.counts[what] += 1
        if self.counts[what] > self.limits[what]:
            raise BuildBudgetExceeded(f"building the model registers more than {self.limits[what]:,} {what}, more "
                                      "than its file's tensors can justify")
        if time.monotonic() > self._deadline:
            raise BuildBudgetExceeded(f"building the model took more than {self.seconds:g} s")

    def __enter__(self) -> "ConstructionBudget":
        from torch.nn.modules import module as registry

        self._deadline = time.monotonic() + self.seconds
        self._handles = [
            registry.register_module_module_registration_hook(lambda *_: self._count("submodules")),
            registry.register_module_parameter_registration_hook(lambda *_: self._count("parameters and buffers")),
            registry.register_module_buffer_registration_hook(lambda *_: self._count("parameters and buffers")),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def build_within_budget(fn: Factory, kwargs: Mapping[str, Any], budget: int) -> nn.Module:
    """``fn(**kwargs)``, refusing (with :class:`BuildBudgetExceeded`) to allocate more than ``budget`` bytes."""
    with _AllocationBudget(budget):
        return fn(**kwargs)
