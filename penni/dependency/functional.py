"""Torch functions that carry a module's parameters: which module owns them.

timm's norm + activation layers (``BatchNormAct2d`` and relatives) subclass the norm layers and call
``F.batch_norm`` on their own buffers and parameters; same-padding and weight-standardized convs call
``F.conv2d`` on ``self.weight``. torch.fx traces through such a module, so the graph holds the function with
``get_attr`` arguments. When every parameter argument is the attribute of that role (``weight``, ``bias``,
``running_mean``, ``running_var``) of one module of the matching kind, the call is that module's call for the
channel analysis: the module's slicer slices exactly the tensors the function reads.
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["PARAMETER_FUNCTIONS", "ACROSS_CHANNELS", "owner"]

#: function -> (positional index, keyword and attribute name) of each parameter argument, and the module type
#: that must own them all.
PARAMETER_FUNCTIONS: dict[Any, tuple[tuple[tuple[int, str], ...], type]] = {
    F.batch_norm: (((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")), _BatchNorm),
    F.conv2d: (((1, "weight"), (2, "bias")), nn.Conv2d),
    F.linear: (((1, "weight"), (2, "bias")), nn.Linear),
}

#: normalizations whose statistics mix the channels: removing one changes the others.
ACROSS_CHANNELS = {F.layer_norm, F.group_norm, F.local_response_norm}


def _argument(node: fx.Node, index: int, name: str) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def owner(root: nn.Module, node: fx.Node) -> tuple[str, nn.Module] | str:
    """``(name, module)`` whose parameters ``node`` (a call of a :data:`PARAMETER_FUNCTIONS` function) reads
    in their own roles, or a one-line reason why there is no such module."""
    roles, kind = PARAMETER_FUNCTIONS[node.target]
    fn = getattr(node.target, "__name__", str(node.target))
    owners = set()
    for index, role in roles:
        arg = _argument(node, index, role)
        if arg is None:
            continue
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            return f"F.{fn} with a {role} computed in the graph"
        path, _, attr = str(arg.target).rpartition(".")
        if attr != role:
            return f"F.{fn} reads {arg.target} as its {role}"
        owners.add(path)
    if len(owners) != 1:
        return f"F.{fn} without parameters of one module"
    (path,) = owners
    module = root.get_submodule(path)
    if not isinstance(module, kind):
        return f"F.{fn} on the parameters of {type(module).__name__}, not a {kind.__name__}"
    return path, module
