"""How channels flow through traced ops: :func:`channel_graph` and the atom (union-find) analysis behind it, and
the :class:`RuleContext` a registered channel rule (:mod:`.rules`) answers through. The design is in the package
docstring (``penni/dependency/__init__.py``); the op tables are in :mod:`.ops`."""
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
from . import ops
from .groups import ChannelGraph, ChannelGroup, ConsumerUse, InputStats, Producer
from .rules import has_slicer, lookup_rule, trace

__all__ = ["RuleContext", "channel_graph"]

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
    analysis = _Analysis(gm)
    prop = _Propagate(gm, analysis, record_inputs)
    with torch.no_grad():
        prop.propagate(*inputs)
    return analysis.finish(gm, prop.stats)


# ----------------------------------------------------------------------------- what a channel rule sees

class RuleContext:
    """What a channel rule sees for one call of its module, and how it answers.

    ``inputs`` holds the atom list of every tensor argument (None when untracked),
    ``input_shapes`` their shapes and ``output_shape`` the shape of the result. The rule
    returns the atom list of its output (one atom per output channel), built from input atoms
    and from :meth:`fresh` channels, or None to say "unknown" (the channels are then frozen).
    """

    def __init__(self, analysis: _Analysis, name: str, module: nn.Module, inputs: list,
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


# ----------------------------------------------------------------------------- analysis

class _Unknown(Exception):
    pass


def _is(module: nn.Module, cls: type, method: str = "forward") -> bool:
    """isinstance with an unmodified ``method`` (a subclass overriding forward is not ``cls``)."""
    return isinstance(module, cls) and getattr(type(module), method) is getattr(cls, method)


def _is_conv(m: nn.Module) -> bool:
    return (_is(m, nn.Conv2d) and _is(m, nn.Conv2d, "_conv_forward")) or _is(m, PenniConv2d)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Analysis:
    """Atom bookkeeping filled in node by node while the graph runs on the example inputs."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}
        self.const_unsafe: set[int] = set()
        self.producers: dict[int, Producer] = {}
        self.filters: list[tuple[int, Producer]] = []   # depthwise rows: (atom they filter, row)
        self.conv_groups: dict[str, int] = {}
        self.depthwise: dict[str, int] = {}
        self.atoms: dict[fx.Node, list[int] | None] = {}
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
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
            raise _Unknown("an input whose channels are not tracked")
        return self.atoms[node]

    def passthrough(self, node: fx.Node, x: Any, out_shape: tuple | None, const_safe: bool = True) -> list[int] | None:
        atoms = self.tracked(x)
        in_shape = self.shapes[x]
        if self.channels(out_shape) != len(atoms) or out_shape[0] != in_shape[0]:
            raise _Unknown("changes the channel dimension")
        other_tensors = [n for n in self.input_nodes(node) if n is not x and self.shapes.get(n) is not None]
        if not const_safe or other_tensors:  # e.g. clamp(x, max=t): t may depend on the input
            self.const_unsafe.update(atoms)
        return list(atoms)

    def flatten_like(self, x: Any, out_shape: tuple | None) -> list[int]:
        """(N, C, d2, ...) -> (N, C*d2*...*dk, d(k+1), ...): channel c -> a block of positions."""
        atoms = self.tracked(x)
        in_shape = self.shapes[x]
        if out_shape is None or len(out_shape) < 2 or out_shape[0] != in_shape[0]:
            raise _Unknown("reshapes the batch or channel dimension")
        for k in range(1, len(in_shape)):
            if tuple(out_shape) == (in_shape[0], math.prod(in_shape[1:k + 1]), *in_shape[k + 1:]):
                repeat = math.prod(in_shape[2:k + 1])
                return [a for a in atoms for _ in range(repeat)]
        raise _Unknown("reshapes the channel dimension")

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
            elif node.op == "call_module":
                atoms = self.call_module(node, out_shape)
            elif node.op == "call_function":
                atoms = self.call_function(node, result, out_shape)
            else:
                atoms = self.call_method(node, result, out_shape)
        except _Unknown as why:
            reason = f"{node.format_node()}: {why}"
            for n in self.input_nodes(node):
                for a in self.atoms.get(n) or ():
                    self.freeze(a, reason)
            atoms = self.fresh_frozen(out_shape, reason)
        self.atoms[node] = atoms

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
                raise _Unknown(f"channel rule for {type(module).__name__} gave no answer")
            self.kinds[name] = "rule"
            return list(atoms)
        if len(node.args) != 1 or node.kwargs:
            raise _Unknown("module called with several arguments")
        x = node.args[0]
        if _is_conv(module) or _is(module, nn.Linear):
            atoms = self.tracked(x)
            in_shape = self.shapes[x]
            if isinstance(module, nn.Linear) and len(in_shape) != 2:
                raise _Unknown("Linear on a tensor that is not (N, features)")
            if not isinstance(module, nn.Linear) and len(in_shape) != 4:
                raise _Unknown("convolution on a tensor that is not (N, C, H, W)")
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
                out = [self.new() for _ in range(self.channels(out_shape))]
                for i, a in enumerate(out):
                    self.producers[a] = Producer(name, i, "weights")
                self.module_out[name] = out
            return list(self.module_out[name])
        if isinstance(module, _BatchNorm) and _is(module, _BatchNorm) and has_slicer(module):
            atoms = self.passthrough(node, x, out_shape)
            if name in self.module_out:
                self.union_lists(self.module_out[name], atoms)
            else:
                self.module_out[name] = list(atoms)
            self.kinds[name] = "norm"
            return atoms
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            return self.passthrough(node, x, out_shape)
        if isinstance(module, ops.PASSTHROUGH_MODULES):
            return self.passthrough(node, x, out_shape)
        if isinstance(module, ops.CONST_BREAKING_MODULES):
            return self.passthrough(node, x, out_shape, const_safe=False)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, x, module.start_dim, out_shape)
        raise _Unknown(f"no channel rule for module {type(module).__name__}")

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
                    raise _Unknown("a tensor constant operand")
                continue  # a python number
            shape = self.shapes.get(op)
            if shape is None:
                continue  # a python number computed in the graph (e.g. from x.size(0))
            atoms = self.atoms.get(op)
            if atoms is None:
                if math.prod(shape) == 1:
                    scalar_tensor = True  # broadcast to every channel; may depend on the input
                    continue
                raise _Unknown("an operand whose channels are not tracked")
            if len(shape) != len(out_shape) or len(atoms) != out_shape[1]:
                raise _Unknown("broadcasts over the channel dimension")
            lists.append(atoms)
        if not lists:
            return None
        for other in lists[1:]:
            self.union_lists(lists[0], other)
        if scalar_tensor:
            self.const_unsafe.update(lists[0])
        return list(lists[0])

    def reduce(self, node: fx.Node, x: Any, dims: Any, out_shape: tuple | None) -> list[int] | None:
        in_shape = self.shapes.get(x)
        if dims is None or in_shape is None:
            raise _Unknown("reduces over the channel dimension")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims or any(not isinstance(d, int) or d % len(in_shape) < 2 for d in dims):
            raise _Unknown("reduces over the batch or channel dimension")
        return self.passthrough(node, x, out_shape)

    def view(self, x: Any, target: Sequence[Any], out_shape: tuple | None) -> list[int]:
        if len(target) == 1 and isinstance(target[0], (tuple, list, torch.Size)):
            target = target[0]
        in_shape = self.shapes.get(x)
        if in_shape is None or out_shape is None or len(target) != len(out_shape) or len(out_shape) < 2:
            raise _Unknown("reshapes the channel dimension")
        if isinstance(target[1], int) and target[1] != -1:
            raise _Unknown("a hard-coded channel count")
        if tuple(out_shape[:2]) == tuple(in_shape[:2]) and len(out_shape) >= 2:
            self.tracked(x)
            if math.prod(out_shape[2:]) == math.prod(in_shape[2:]):
                return list(self.atoms[x])
        return self.flatten_like(x, out_shape)

    def flatten(self, node: fx.Node, x: Any, start: Any, out_shape: tuple | None) -> list[int]:
        in_shape = self.shapes.get(x)
        if in_shape is None or not isinstance(start, int) or start % len(in_shape) == 0:
            raise _Unknown("flattens the batch dimension")
        if start % len(in_shape) == 1:
            return self.flatten_like(x, out_shape)
        return self.passthrough(node, x, out_shape)

    def getitem(self, x: Any, index: Any, result: Any, out_shape: tuple | None) -> list[int] | None:
        if not isinstance(x, fx.Node) or self.shapes.get(x) is None:
            if isinstance(result, torch.Tensor):
                raise _Unknown("a tensor taken out of a container")
            return None  # e.g. x.shape[0]
        index = index if isinstance(index, tuple) else (index,)
        rank = len(self.shapes[x])
        if any(i is None or isinstance(i, (fx.Node, torch.Tensor, list)) for i in index):
            raise _Unknown("advanced indexing")
        full = slice(None, None, None)
        if index and index[0] is Ellipsis:
            ok = len(index) - 1 <= rank - 2 and Ellipsis not in index[1:]
        else:
            ok = len(index) >= 1 and index[0] == full and (len(index) == 1 or index[1] == full or index[1] is Ellipsis)
        if not ok or out_shape is None or tuple(out_shape[:2]) != tuple(self.shapes[x][:2]):
            raise _Unknown("indexes the batch or channel dimension")
        return list(self.tracked(x))

    def call_function(self, node: fx.Node, result: Any, out_shape: tuple | None) -> list[int] | None:
        fn = node.target
        x = node.args[0] if node.args else None
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
                raise _Unknown("pads the batch or channel dimension")
            mode = _arg(node, 2, "mode", "constant")
            return self.passthrough(node, x, out_shape, const_safe=mode != "constant")
        if fn is torch.cat or fn is torch.concat:
            tensors = _arg(node, 0, "tensors")
            dim = _arg(node, 1, "dim", 0)
            lists = [self.tracked(t) for t in tensors]
            if out_shape is None or not isinstance(dim, int):
                raise _Unknown("concatenation")
            if dim % len(out_shape) == 1:
                return [a for atoms in lists for a in atoms]
            for other in lists[1:]:
                if len(other) != len(lists[0]):
                    raise _Unknown("concatenation")
                self.union_lists(lists[0], other)
            return list(lists[0])
        if fn is torch.flatten:
            return self.flatten(node, x, _arg(node, 1, "start_dim", 0), out_shape)
        if fn is torch.reshape:
            return self.view(x, [_arg(node, 1, "shape")], out_shape)
        if fn in ops.REDUCE_FUNCTIONS:
            return self.reduce(node, x, _arg(node, 1, "dim"), out_shape)
        if fn is operator.getitem:
            return self.getitem(x, node.args[1], result, out_shape)
        if fn is getattr and node.args[1] in ops.SIZE_ATTRS:
            return None
        raise _Unknown(f"no channel rule for function {getattr(fn, '__name__', fn)}")

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
        raise _Unknown(f"no channel rule for method .{method}()")

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
        if self.record_inputs and n.op == "call_module":
            module = self.module.get_submodule(str(n.target))
            if (_is_conv(module) or _is(module, nn.Linear)) and len(n.args) == 1:
                x = self.env.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
                if isinstance(x, torch.Tensor) and x.dim() >= 2:
                    xd = x.detach().double()
                    dims = [d for d in range(x.dim()) if d != 1]
                    mean = xd.mean(dims, keepdim=True)
                    dev = (xd - mean).abs().amax(dims)
                    self.stats[n.name] = InputStats(mean.flatten(), dev)
        result = super().run_node(n)
        self.analysis.visit(n, result)
        return result
