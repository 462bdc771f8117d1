"""How channels flow through a module the analysis does not know: the channel-rule registry and the fx tracer.

A model file registers its own modules here (e.g. penni/models/resnet.py's ChannelPadShortcut) through
:func:`register_channel_rule`; registered modules become torch.fx leaves.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from ..conv import PenniConv2d
from ..slicing import SLICE_OUT, register_slicer

# ----------------------------------------------------------------------------- rule registry

#: ``rule(module, ctx) -> atoms``; ``ctx`` is a :class:`penni.dependency.RuleContext` (defined by the analysis,
#: which calls the rules: this module does not import it).
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
