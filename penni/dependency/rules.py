"""How channels flow through a module the analysis does not know: the channel-rule registry and the fx tracer.

A model file registers its own modules here (e.g. penni/models/resnet.py's ChannelPadShortcut) through
:func:`register_channel_rule`; registered modules become torch.fx leaves.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import fx, nn

from ..conv import PenniConv2d
from ..slicing import SLICE_OUT, register_slicer

# ----------------------------------------------------------------------------- what a channel rule sees

class RuleContext:
    """What a channel rule sees for one call of its module, and how it answers.

    ``inputs`` holds the atom list of every tensor argument (None when untracked),
    ``input_shapes`` their shapes and ``output_shape`` the shape of the result. The rule
    returns the atom list of its output (one atom per output channel), built from input atoms
    and from :meth:`fresh` channels, or None to say "unknown" (the channels are then frozen).
    """

    def __init__(self, analysis: Any, name: str, module: nn.Module, inputs: list,
                 input_shapes: list, output_shape: tuple | None) -> None:
        self._analysis = analysis
        self.name = name
        self.module = module
        self.inputs = inputs
        self.input_shapes = input_shapes
        self.output_shape = output_shape
        self._used = 0

    def fresh(self, n: int, zero: bool = False) -> list[int]:
        """``n`` channels this module creates itself (its own output slots, numbered in the order
        of the calls to ``fresh``; removing some calls ``slicing.slice_out(module, kept_slots)``).
        ``zero=True`` declares them exactly zero for every input (shrink may then drop them)."""
        return self._analysis.own_atoms(self, n, "zero" if zero else "opaque")

    def freeze(self, atoms: Sequence[int], reason: str) -> None:
        """Keep these channels whatever their weights say."""
        for a in atoms:
            self._analysis.freeze(a, f"{self.name}: {reason}")


# ----------------------------------------------------------------------------- rule registry

#: ``rule(module, ctx) -> atoms``; ``ctx`` is a :class:`RuleContext` (the analysis makes one per call).
ChannelRule = Callable[[nn.Module, Any], "list[int] | None"]
CHANNEL_RULES: dict[type, ChannelRule] = {}


def register_channel_rule(module_type: type, rule: ChannelRule,
                          slice_out_fn: Callable | None = None, slice_in_fn: Callable | None = None) -> None:
    """Teach the dependency analysis how channels flow through ``module_type``.

    ``rule(module, ctx) -> atoms`` (see :class:`penni.dependency.RuleContext`). Modules of this type become fx
    leaves. A module that creates channels with ``ctx.fresh`` must be sliceable on them: pass
    ``slice_out_fn(module, kept_slots)`` (and optionally ``slice_in_fn``; a no-op by default)
    here or register them with ``penni.slicing.register_slicer``.
    """
    CHANNEL_RULES[module_type] = rule
    if slice_out_fn is not None:
        register_slicer(module_type, slice_out_fn, slice_in_fn or (lambda m, idx: None))


def lookup_rule(module: nn.Module) -> ChannelRule | None:
    for cls in type(module).__mro__:
        if cls in CHANNEL_RULES:
            return CHANNEL_RULES[cls]
    return None


def has_slicer(module: nn.Module) -> bool:
    return any(cls in SLICE_OUT for cls in type(module).__mro__)


# ----------------------------------------------------------------------------- tracing

class ChannelTracer(fx.Tracer):
    """torch.fx tracer that keeps penni layers and modules with a channel rule as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, PenniConv2d) or lookup_rule(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with :class:`ChannelTracer` (the GraphModule shares the model's modules)."""
    tracer = ChannelTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, ... on dynamic control flow
        raise RuntimeError(
            f"penni could not trace {type(model).__name__} with torch.fx ({err}); make the offending "
            "submodule a leaf with penni.dependency.register_channel_rule") from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
