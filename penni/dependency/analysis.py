"""How channels flow through traced ops: :func:`channel_graph` and the atom (union-find) analysis behind it. The
design is in the package docstring (``penni/dependency/__init__.py``); the op tables are in :mod:`.ops`, the
functions that carry a module's parameters in :mod:`.functional`, the rules of custom modules in :mod:`.rules`."""
from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from ..conv import PenniConv2d
from . import functional, ops
from .groups import ChannelGraph, ChannelGroup, ConsumerUse, InputStats, Producer
from .rules import RuleContext, has_slicer, lookup_rule, trace
from .shapes import ShapeOps, Unknown

__all__ = ["channel_graph"]

# ----------------------------------------------------------------------------- the entry point

def channel_graph(model: nn.Module, example_inputs: torch.Tensor | tuple, record_inputs: bool = False) -> ChannelGraph:
    """Trace ``model``, run it once on ``example_inputs`` and return its channel groups.

    The model runs as it is (put it in eval mode first: a training-mode run would update
    BatchNorm statistics). ``record_inputs`` also measures, for every conv/linear call, the
    per-channel mean and spread of its input (``ChannelGraph.input_stats``), which ``shrink``
    uses to fold constant channels.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    gm = trace(model)
    analysis = _Analysis(gm, model)
    prop = _Propagate(gm, analysis, record_inputs)
    with torch.no_grad():
        prop.propagate(*inputs)
    return analysis.finish(gm, prop.stats)


# ----------------------------------------------------------------------------- analysis

def _is(module: nn.Module, cls: type, method: str = "forward") -> bool:
    """isinstance with an unmodified ``method`` (a subclass overriding forward is not ``cls``)."""
    return isinstance(module, cls) and getattr(type(module), method) is getattr(cls, method)


def _is_conv(m: nn.Module) -> bool:
    return (_is(m, nn.Conv2d) and _is(m, nn.Conv2d, "_conv_forward")) or _is(m, PenniConv2d)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Analysis(ShapeOps):
    """Atom bookkeeping filled in node by node while the graph runs on the example inputs."""

    def __init__(self, root: nn.Module, model: nn.Module) -> None:
        self.root = root
        self.model = model   # the traced model: owns the parameters that functions read (``get_attr``)
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}
        self.const_unsafe: set[int] = set()
        self.producers: dict[int, Producer] = {}
        self.filters: list[tuple[int, Producer]] = []   # depthwise rows: (atom they filter, row)
        self.conv_groups: dict[str, int] = {}
        self.depthwise: dict[str, int] = {}
        self.atoms: dict[fx.Node, list[int] | None] = {}
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
        self.parts: dict[fx.Node, list[list[int]]] = {}   # split / chunk results: the atoms of each part
        self.cdim: dict[fx.Node, int] = {}   # channels-last nodes: the dim that holds the channels
        self.module_out: dict[str, list[int]] = {}   # producer/norm/rule module -> out atoms (own slots)
        self.module_in: dict[str, list[int]] = {}    # conv/linear -> input atoms
        self.kinds: dict[str, str] = {}
        self.uses: list[tuple[str, str, list[int]]] = []   # (node, module, input atoms)

    # union-find -------------------------------------------------------------
    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_lists(self, a: Sequence[int], b: Sequence[int]) -> None:
        for x, y in zip(a, b, strict=True):
            self.union(x, y)

    def freeze(self, atom: int, reason: str) -> None:
        self.frozen.setdefault(atom, reason)

    def fresh_frozen(self, shape: tuple | None, reason: str) -> list[int] | None:
        if shape is None or len(shape) < 2:
            return None
        atoms = [self.new() for _ in range(shape[1])]
        for a in atoms:
            self.freeze(a, reason)
        return atoms

    def own_atoms(self, ctx: RuleContext, n: int, kind: str) -> list[int]:
        stored = self.module_out.setdefault(ctx.name, [])
        start, ctx._used = ctx._used, ctx._used + n
        while len(stored) < ctx._used:  # first call: create; later calls reuse (weight sharing)
            atom = self.new()
            self.producers[atom] = Producer(ctx.name, len(stored), kind)
            stored.append(atom)
        return stored[start:ctx._used]

    # helpers ----------------------------------------------------------------
    def channels(self, shape: tuple | None) -> int | None:
        return shape[1] if shape is not None and len(shape) >= 2 else None

    def input_nodes(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
        return found

    def tracked(self, node: Any) -> list[int]:
        if not isinstance(node, fx.Node) or self.atoms.get(node) is None:
            raise Unknown("an input whose channels are not tracked")
        return self.atoms[node]

    def passthrough(self, node: fx.Node, x: Any, out_shape: tuple | None, const_safe: bool = True) -> list[int] | None:
        atoms = self.tracked(x)
        in_shape = self.shapes[x]
        if self.channels(out_shape) != len(atoms) or out_shape[0] != in_shape[0]:
            raise Unknown("changes the channel dimension")
        other_tensors = [n for n in self.input_nodes(node) if n is not x and self.shapes.get(n) is not None]
        if not const_safe or other_tensors:  # e.g. clamp(x, max=t): t may depend on the input
            self.const_unsafe.update(atoms)
        return list(atoms)

    # per node ---------------------------------------------------------------
    def visit(self, node: fx.Node, result: Any) -> None:
        out_shape = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        self.shapes[node] = out_shape
        try:
            if node.op == "placeholder":
                atoms = self.fresh_frozen(out_shape, f"model input {node.name}")
            elif node.op == "get_attr":
                atoms = None
            elif node.op == "output":
                for n in self.input_nodes(node):
                    for a in self.atoms.get(n) or ():
                        self.freeze(a, "model output")
                atoms = None
            elif (x := self.channels_last_input(node)) is not None:
                module = self.root.get_submodule(str(node.target)) if node.op == "call_module" else None
                atoms = self.channels_last(node, x, module, out_shape)
            elif node.op == "call_module":
                atoms = self.call_module(node, out_shape)
            elif node.op == "call_function":
                atoms = self.call_function(node, result, out_shape)
            else:
                atoms = self.call_method(node, result, out_shape)
        except Unknown as why:
            reason = f"{node.format_node()}: {why}"
            for n in self.input_nodes(node):
                for a in self.atoms.get(n) or ():
                    self.freeze(a, reason)
            channels_last = any(n in self.cdim for n in self.input_nodes(node)) or node in self.cdim
            self.cdim.pop(node, None)
            atoms = None if channels_last else self.fresh_frozen(out_shape, reason)
        self.atoms[node] = atoms

    def channels_last_input(self, node: fx.Node) -> fx.Node | None:
        """The first argument when its channels are not on dim 1 (permute has its own rule)."""
        x = node.args[0] if node.args else None
        if node.op == "output" or not isinstance(x, fx.Node) or x not in self.cdim:
            return None
        return None if node.target in ("permute", torch.permute) else x

    def is_plain_linear(self, module: nn.Module) -> bool:
        return _is(module, nn.Linear)

    def is_channelwise(self, node: fx.Node, module: nn.Module | None) -> bool:
        """Works channel by channel whatever dim holds the channels (activations, dropout, contiguous)."""
        if node.op == "call_module":
            return isinstance(module, (*ops.ACTIVATIONS, nn.Identity, nn.Dropout))
        if node.op == "call_function":
            return node.target in ops.ELEMENTWISE_FUNCTIONS
        return node.target in ops.ELEMENTWISE_METHODS

    def call_module(self, node: fx.Node, out_shape: tuple | None) -> list[int] | None:
        name = str(node.target)
        module = self.root.get_submodule(name)
        rule = lookup_rule(module)
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and self.shapes.get(a) is not None]
        if rule is not None:
            ctx = RuleContext(self, name, module, [self.atoms.get(a) for a in tensor_args],
                              [self.shapes[a] for a in tensor_args], out_shape)
            atoms = rule(module, ctx)
            if atoms is None or len(atoms) != self.channels(out_shape):
                raise Unknown(f"channel rule for {type(module).__name__} gave no answer")
            self.kinds[name] = "rule"
            return list(atoms)
        if len(node.args) != 1 or node.kwargs:
            raise Unknown("module called with several arguments")
        x = node.args[0]
        if _is_conv(module) or _is(module, nn.Linear):
            return self.weighted(node, name, module, x, out_shape)
        if isinstance(module, _BatchNorm) and _is(module, _BatchNorm) and has_slicer(module):
            return self.norm(node, name, x, out_shape)
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            return self.passthrough(node, x, out_shape)
        if isinstance(module, ops.PASSTHROUGH_MODULES):
            return self.passthrough(node, x, out_shape)
        if isinstance(module, ops.CONST_BREAKING_MODULES):
            return self.passthrough(node, x, out_shape, const_safe=False)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, x, module.start_dim, out_shape)
        raise Unknown(f"no channel rule for module {type(module).__name__}")

    def weighted(self, node: fx.Node, name: str, module: nn.Module, x: Any, out_shape: tuple | None) -> list[int]:
        """A conv or linear call of ``module`` (its own or a function on its parameters) reading ``x``."""
        atoms = self.tracked(x)
        in_shape = self.shapes[x]
        if isinstance(module, nn.Linear) and len(in_shape) != 2 and self.cdim.get(x) != len(in_shape) - 1:
            raise Unknown("Linear on a tensor whose last dim is not the channels")
        if not isinstance(module, nn.Linear) and len(in_shape) != 4:
            raise Unknown("convolution on a tensor that is not (N, C, H, W)")
        self.kinds[name] = "linear" if isinstance(module, nn.Linear) else "conv"
        if name in self.module_in:
            self.union_lists(self.module_in[name], atoms)
        else:
            self.module_in[name] = list(atoms)
        self.uses.append((node.name, name, list(atoms)))
        groups = getattr(module, "groups", 1)
        if groups != 1:
            self.conv_groups[name] = groups
        if groups != 1 and groups == module.in_channels:
            return self.depthwise_conv(name, module, atoms)
        if name not in self.module_out:
            width = module.out_features if isinstance(module, nn.Linear) else self.channels(out_shape)
            out = [self.new() for _ in range(width)]
            for i, a in enumerate(out):
                self.producers[a] = Producer(name, i, "weights")
            self.module_out[name] = out
        return list(self.module_out[name])

    def norm(self, node: fx.Node, name: str, x: Any, out_shape: tuple | None) -> list[int]:
        """A per-channel BatchNorm call of ``name`` (its own, or F.batch_norm on its parameters)."""
        atoms = self.tracked(x)
        if self.channels(out_shape) != len(atoms) or tuple(out_shape) != tuple(self.shapes[x]):
            raise Unknown("a BatchNorm that changes the shape")
        others = [n for n in self.input_nodes(node) if n is not x and n.op != "get_attr" and self.shapes.get(n)]
        if others:
            self.const_unsafe.update(atoms)
        if name in self.module_out:
            self.union_lists(self.module_out[name], atoms)
        else:
            self.module_out[name] = list(atoms)
        self.kinds[name] = "norm"
        return list(atoms)

    def parameter_function(self, node: fx.Node, out_shape: tuple | None) -> list[int]:
        """F.batch_norm / F.conv2d / F.linear on one module's parameters: that module's call."""
        found = functional.owner(self.model, node)
        if isinstance(found, str):
            raise Unknown(found)
        name, module = found
        x = _arg(node, 0, "input")
        if node.target is F.batch_norm:
            if not has_slicer(module):
                raise Unknown(f"F.batch_norm on {type(module).__name__}, which penni cannot slice")
            return self.norm(node, name, x, out_shape)
        return self.weighted(node, name, module, x, out_shape)

    def depthwise_conv(self, name: str, module: nn.Module, atoms: list[int]) -> list[int]:
        """Output channel ``o`` of a depthwise conv filters input channel ``o // k``: same atom."""
        k = module.out_channels // module.in_channels
        out = [atoms[o // k] for o in range(module.out_channels)]
        if name in self.module_out:
            self.union_lists(self.module_out[name], out)
        else:
            self.module_out[name] = list(out)
            self.filters.extend((a, Producer(name, o, "depthwise")) for o, a in enumerate(out))
        self.depthwise[name] = k
        return out

    def binary(self, operands: Sequence[Any], out_shape: tuple | None) -> list[int] | None:
        lists, scalar_tensor = [], False
        for op in operands:
            if not isinstance(op, fx.Node):
                if isinstance(op, torch.Tensor):
                    raise Unknown("a tensor constant operand")
                continue  # a python number
            shape = self.shapes.get(op)
            if shape is None:
                continue  # a python number computed in the graph (e.g. from x.size(0))
            atoms = self.atoms.get(op)
            if atoms is None:
                if math.prod(shape) == 1:
                    scalar_tensor = True  # broadcast to every channel; may depend on the input
                    continue
                raise Unknown("an operand whose channels are not tracked")
            if len(shape) != len(out_shape) or len(atoms) != out_shape[1]:
                raise Unknown("broadcasts over the channel dimension")
            lists.append(atoms)
        if not lists:
            return None
        for other in lists[1:]:
            self.union_lists(lists[0], other)
        if scalar_tensor:
            self.const_unsafe.update(lists[0])
        return list(lists[0])

    def call_function(self, node: fx.Node, result: Any, out_shape: tuple | None) -> list[int] | None:
        fn = node.target
        x = node.args[0] if node.args else None
        if fn in functional.PARAMETER_FUNCTIONS:
            return self.parameter_function(node, out_shape)
        if fn in functional.ACROSS_CHANNELS:
            raise Unknown(f"F.{fn.__name__} normalizes across the channels")
        if fn in ops.BINARY_FUNCTIONS:
            return self.binary([_arg(node, 0, "input"), _arg(node, 1, "other")], out_shape)
        if fn in ops.PASSTHROUGH_FUNCTIONS:
            return self.passthrough(node, _arg(node, 0, "input"), out_shape)
        if fn in ops.CONST_BREAKING_FUNCTIONS:
            return self.passthrough(node, _arg(node, 0, "input"), out_shape, const_safe=False)
        if ops.is_stochastic_depth(fn):  # torchvision's (fx-wrapped) per-sample drop: per channel
            training = _arg(node, 3, "training", True)
            return self.passthrough(node, _arg(node, 0, "input"), out_shape, const_safe=training is False)
        if fn is F.pad:
            pad = _arg(node, 1, "pad")
            x = _arg(node, 0, "input")
            in_shape = self.shapes.get(x)
            if in_shape is None or not isinstance(pad, (tuple, list)) or len(pad) > 2 * (len(in_shape) - 2):
                raise Unknown("pads the batch or channel dimension")
            mode = _arg(node, 2, "mode", "constant")
            return self.passthrough(node, x, out_shape, const_safe=mode != "constant")
        if fn is torch.cat or fn is torch.concat:
            tensors = _arg(node, 0, "tensors")
            dim = _arg(node, 1, "dim", 0)
            lists = [self.tracked(t) for t in tensors]
            if out_shape is None or not isinstance(dim, int):
                raise Unknown("concatenation")
            if dim % len(out_shape) == 1:
                return [a for atoms in lists for a in atoms]
            for other in lists[1:]:
                if len(other) != len(lists[0]):
                    raise Unknown("concatenation")
                self.union_lists(lists[0], other)
            return list(lists[0])
        if fn is torch.flatten:
            return self.flatten(node, x, _arg(node, 1, "start_dim", 0), out_shape)
        if fn is torch.reshape:
            return self.view(x, [_arg(node, 1, "shape")], out_shape)
        if fn in ops.REDUCE_FUNCTIONS:
            return self.reduce(node, x, _arg(node, 1, "dim"), out_shape)
        if fn in (torch.split, torch.chunk, torch.tensor_split):
            return self.split(node, x, _arg(node, 2, "dim", 0), result, fn is torch.chunk)
        if fn is torch.permute:
            return self.permute(node, x, node.args[1:] or [node.kwargs.get("dims")])
        if fn is operator.getitem:
            return self.getitem(x, node.args[1], result, out_shape)
        if fn is getattr and node.args[1] in ops.SIZE_ATTRS:
            return None
        raise Unknown(f"no channel rule for function {getattr(fn, '__name__', fn)}")

    def call_method(self, node: fx.Node, result: Any, out_shape: tuple | None) -> list[int] | None:
        method = str(node.target)
        x = node.args[0]
        if method in ops.SIZE_METHODS:
            return None
        if method in ops.BINARY_METHODS:
            return self.binary([x, _arg(node, 1, "other")], out_shape)
        if method in ops.PASSTHROUGH_METHODS:
            return self.passthrough(node, x, out_shape)
        if method in ("view", "reshape"):
            target = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
            return self.view(x, target, out_shape)
        if method == "flatten":
            return self.flatten(node, x, _arg(node, 1, "start_dim", 0), out_shape)
        if method in ops.REDUCE_METHODS:
            return self.reduce(node, x, _arg(node, 1, "dim"), out_shape)
        if method == "permute":
            return self.permute(node, x, node.args[1:] or [node.kwargs.get("dims")])
        if method in ("split", "chunk", "tensor_split"):
            return self.split(node, x, _arg(node, 2, "dim", 0), result, method == "chunk")
        raise Unknown(f"no channel rule for method .{method}()")

    # results ----------------------------------------------------------------
    def finish(self, gm: fx.GraphModule, stats: dict[str, InputStats]) -> ChannelGraph:
        groups: dict[int, ChannelGroup] = {}

        def group(atom: int) -> ChannelGroup:
            root = self.find(atom)
            if root not in groups:
                groups[root] = ChannelGroup(id=len(groups))
            return groups[root]

        for atom, producer in self.producers.items():
            group(atom).producers.append(producer)
        for atom, producer in self.filters:
            group(atom).producers.append(producer)
        for name, atoms in self.module_out.items():
            if self.kinds.get(name) == "norm":
                for i, a in enumerate(atoms):
                    group(a).norms.append((name, i))
        for node_name, name, atoms in self.uses:
            positions: dict[int, list[int]] = {}
            for i, a in enumerate(atoms):
                positions.setdefault(self.find(a), []).append(i)
            for root, pos in positions.items():
                group(root).consumers.append(ConsumerUse(node_name, name, tuple(pos)))
        for atom, reason in self.frozen.items():
            g = group(atom)
            g.frozen = g.frozen or reason
        for atom in self.const_unsafe:
            group(atom).const_safe = False
        slots: dict[str, dict[str, list[int]]] = {}
        for name, atoms in self.module_out.items():
            slots.setdefault(name, {})["out"] = [group(a).id for a in atoms]
        for name, atoms in self.module_in.items():
            slots.setdefault(name, {})["in"] = [group(a).id for a in atoms]
        node_groups = {n.name: None if atoms is None else [group(a).id for a in atoms]
                       for n, atoms in self.atoms.items()}
        return ChannelGraph(gm, {g.id: g for g in groups.values()}, slots, dict(self.kinds), node_groups, stats,
                            dict(self.conv_groups), dict(self.depthwise))


class _Propagate(ShapeProp):
    """ShapeProp that feeds every node's result to the analysis (and measures consumer inputs)."""

    def __init__(self, gm: fx.GraphModule, analysis: _Analysis, record_inputs: bool) -> None:
        super().__init__(gm)
        self.analysis = analysis
        self.record_inputs = record_inputs
        self.stats: dict[str, InputStats] = {}

    def run_node(self, n: fx.Node) -> Any:
        if self.record_inputs and self._reads_weights(n) and isinstance(n.args[0], fx.Node):
            x = self.env.get(n.args[0])
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                xd = x.detach().double()
                channel = x.dim() - 1 if self._is_linear(n) else 1  # Linear reads the last dim
                dims = [d for d in range(x.dim()) if d != channel]
                mean = xd.mean(dims, keepdim=True)
                dev = (xd - mean).abs().amax(dims)
                self.stats[n.name] = InputStats(mean.flatten(), dev)
        result = super().run_node(n)
        self.analysis.visit(n, result)
        return result

    def _is_linear(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(self.module.get_submodule(str(n.target)), nn.Linear)
        return n.target is F.linear

    def _reads_weights(self, n: fx.Node) -> bool:
        """A conv/linear call (of the module, or F.conv2d / F.linear on its weights) with an input tensor."""
        if n.op == "call_module":
            module = self.module.get_submodule(str(n.target))
            return (_is_conv(module) or _is(module, nn.Linear)) and len(n.args) == 1
        return n.op == "call_function" and n.target in (F.conv2d, F.linear) and bool(n.args)
