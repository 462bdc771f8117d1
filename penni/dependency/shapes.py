"""How reshapes, indexing, splits and reductions move channels: the shape half of the atom analysis.

:class:`ShapeOps` is a mixin of the analysis (``analysis._Analysis``): it reads the analysis' ``atoms`` and
``shapes`` of every node and its ``tracked`` / ``passthrough`` helpers. A view that keeps dim 1, a flatten of
``(N, C, H, W)`` (channel ``c`` becomes a block of features), indexing and slicing along the channels, and
``split`` / ``chunk`` into parts (the parts' channels are consecutive runs of the input's) are followed;
anything else raises :class:`Unknown`, which freezes the channels involved.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["ShapeOps", "Unknown"]


class Unknown(Exception):
    """The analysis cannot follow the channels through a node (the message says why); they are kept."""


class ShapeOps:
    """Channel bookkeeping for ops that move, select or reduce dimensions (mixed into the analysis)."""

    atoms: dict
    shapes: dict
    parts: dict
    cdim: dict    # nodes whose channels are not dim 1 (after a permute): node -> the dim that holds them

    def flatten_like(self, x: Any, out_shape: tuple | None) -> list[int]:
        """(N, C, d2, ...) -> (N, C*d2*...*dk, d(k+1), ...): channel c -> a block of positions."""
        atoms = self.tracked(x)
        in_shape = self.shapes[x]
        if out_shape is None or len(out_shape) < 2 or out_shape[0] != in_shape[0]:
            raise Unknown("reshapes the batch or channel dimension")
        for k in range(1, len(in_shape)):
            if tuple(out_shape) == (in_shape[0], math.prod(in_shape[1:k + 1]), *in_shape[k + 1:]):
                repeat = math.prod(in_shape[2:k + 1])
                return [a for a in atoms for _ in range(repeat)]
        raise Unknown("reshapes the channel dimension")

    def reduce(self, node: fx.Node, x: Any, dims: Any, out_shape: tuple | None) -> list[int] | None:
        in_shape = self.shapes.get(x)
        if dims is None or in_shape is None:
            raise Unknown("reduces over the channel dimension")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims or any(not isinstance(d, int) or d % len(in_shape) < 2 for d in dims):
            raise Unknown("reduces over the batch or channel dimension")
        return self.passthrough(node, x, out_shape)

    def view(self, x: Any, target: Sequence[Any], out_shape: tuple | None) -> list[int]:
        if len(target) == 1 and isinstance(target[0], (tuple, list, torch.Size)):
            target = target[0]
        in_shape = self.shapes.get(x)
        if in_shape is None or out_shape is None or len(target) != len(out_shape) or len(out_shape) < 2:
            raise Unknown("reshapes the channel dimension")
        if isinstance(target[1], int) and target[1] != -1:
            raise Unknown("a hard-coded channel count")
        if tuple(out_shape[:2]) == tuple(in_shape[:2]) and len(out_shape) >= 2:
            self.tracked(x)
            if math.prod(out_shape[2:]) == math.prod(in_shape[2:]):
                return list(self.atoms[x])
        return self.flatten_like(x, out_shape)

    def flatten(self, node: fx.Node, x: Any, start: Any, out_shape: tuple | None) -> list[int]:
        in_shape = self.shapes.get(x)
        if in_shape is None or not isinstance(start, int) or start % len(in_shape) == 0:
            raise Unknown("flattens the batch dimension")
        if start % len(in_shape) == 1:
            return self.flatten_like(x, out_shape)
        return self.passthrough(node, x, out_shape)

    def getitem(self, x: Any, index: Any, result: Any, out_shape: tuple | None) -> list[int] | None:
        if isinstance(x, fx.Node) and x in self.parts and isinstance(index, int):
            return list(self.parts[x][index])  # one part of a split / chunk
        if not isinstance(x, fx.Node) or self.shapes.get(x) is None:
            if isinstance(result, torch.Tensor):
                raise Unknown("a tensor taken out of a container")
            return None  # e.g. x.shape[0]
        index = index if isinstance(index, tuple) else (index,)
        rank = len(self.shapes[x])
        if any(i is None or isinstance(i, (fx.Node, torch.Tensor, list)) for i in index):
            raise Unknown("advanced indexing")
        full = slice(None, None, None)
        if index and index[0] is Ellipsis:
            ok = len(index) - 1 <= rank - 2 and Ellipsis not in index[1:]
            index = (full,) * (rank - len(index) + 1) + index[1:]
        else:
            ok = len(index) >= 1 and index[0] == full
        channel = index[1] if len(index) > 1 else full
        if channel is Ellipsis:
            channel, index = full, index[:1]
        if not ok or not isinstance(channel, slice) or out_shape is None or len(out_shape) < 2 \
                or out_shape[0] != self.shapes[x][0]:
            raise Unknown("indexes the batch or channel dimension")
        atoms = list(self.tracked(x))
        whole = channel.start in (None, 0) and channel.step in (None, 1) and (
            channel.stop is None or (isinstance(channel.stop, int) and channel.stop >= len(atoms)))
        if not whole:  # fixed positions: they would select other channels once some are removed
            raise Unknown("slices the channels at fixed positions")
        return atoms

    def split(self, node: fx.Node, x: Any, dim: Any, result: Any, equal_parts: bool) -> None:
        """``split`` / ``chunk`` / ``tensor_split``, taken apart by ``getitem``. Along a spatial dim every part
        keeps every channel. Along dim 1 only ``chunk`` follows (``equal_parts``: its part size follows the
        channel count): position ``j`` of every part is one group, so the parts stay equal. Fixed split
        sizes would select other channels once some are removed: those channels are kept."""
        in_shape = self.shapes.get(x)
        if in_shape is None or not isinstance(dim, int) or not isinstance(result, (tuple, list)):
            raise Unknown("a split the analysis cannot follow")
        dim %= len(in_shape)
        atoms = self.tracked(x)
        if dim == 0:
            raise Unknown("splits the batch dimension")
        if dim != 1:
            self.parts[node] = [list(atoms) for _ in result]
            return None
        sizes = {t.shape[1] for t in result}
        if not equal_parts or len(sizes) != 1 or sizes.pop() * len(result) != len(atoms):
            raise Unknown("splits the channels at fixed sizes")
        n = len(atoms) // len(result)
        parts = [atoms[k * n:(k + 1) * n] for k in range(len(result))]
        for other in parts[1:]:
            self.union_lists(parts[0], other)
        self.parts[node] = parts
        return None

    # channels-last -----------------------------------------------------------
    def permute(self, node: fx.Node, x: Any, dims: Any) -> list[int]:
        """A permute moves the channel dim (ConvNeXt: NCHW -> NHWC and back); the atoms stay."""
        in_shape = self.shapes.get(x)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if in_shape is None or len(dims) != len(in_shape) or not all(isinstance(d, int) for d in dims):
            raise Unknown("a permute the analysis cannot follow")
        dims = [d % len(in_shape) for d in dims]
        if dims[0] != 0:
            raise Unknown("moves the batch dimension")
        cdim = dims.index(self.cdim.get(x, 1) % len(in_shape))
        if cdim != 1:
            self.cdim[node] = cdim
        return list(self.tracked(x))

    def channels_last(self, node: fx.Node, x: fx.Node, module: Any, out_shape: tuple | None) -> list[int]:
        """An op on a tensor whose channels are not dim 1: channel-wise ops keep them where they are, a
        Linear on the last dim reads them (``weighted``), a LayerNorm over them mixes them (kept);
        anything else is unknown."""
        atoms, rank = self.tracked(x), len(self.shapes[x])
        cdim = self.cdim[x] % rank
        target = node.target
        if module is not None and cdim == rank - 1 and self.is_plain_linear(module):
            self.cdim[node] = rank - 1
            return self.weighted(node, str(target), module, x, out_shape)
        normalized = module.normalized_shape if isinstance(module, nn.LayerNorm) else \
            (node.args[1] if node.target is F.layer_norm and len(node.args) > 1 else None)
        if normalized is not None and tuple(normalized) == (len(atoms),) and cdim == rank - 1:
            return self.mixes_channels(node, x, "a LayerNorm over the channels mixes them")
        same = out_shape is not None and tuple(out_shape) == tuple(self.shapes[x])
        others = [n for n in self.input_nodes(node) if n is not x and self.shapes.get(n) is not None]
        if same and not others and self.is_channelwise(node, module):
            self.cdim[node] = cdim
            return list(atoms)
        raise Unknown("an op on channels-last tensors that the analysis does not follow")

    def mixes_channels(self, node: fx.Node, x: fx.Node, reason: str) -> list[int]:
        """Its input channels are kept; its output channels are new ones, also kept, where the input's were."""
        why = f"{node.format_node()}: {reason}"
        for a in self.tracked(x):
            self.freeze(a, why)
        self.cdim[node] = self.cdim[x]
        return self.fresh_frozen((0, len(self.atoms[x])), why)
