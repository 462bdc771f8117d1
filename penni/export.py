"""to_torch(model): a copy made only of standard torch.nn layers; export_onnx(model, ...): an ONNX file.

``to_torch`` bakes held masks, replaces every PenniConv2d by plain layers and traces the model with
torch.fx, so the result (a ``torch.fx.GraphModule``) holds no penni class: it runs, saves and
loads without penni, and ``torch.export`` / ONNX export take it as any other torch model.

How each PenniConv2d becomes plain layers depends on its forward mode:

* ``"dense"`` and ``"reconstruct"``: one ``nn.Conv2d`` with the baked kernel;
* ``"factorized"`` / ``"factorized_batched"``: ``nn.Sequential`` of the basis conv (a grouped
  ``nn.Conv2d`` with ``in * d`` outputs, the basis repeated per channel) and the 1x1 coefficient
  ``nn.Conv2d``;
* ``"factorized_sparse"`` / ``"factorized_batched_sparse"``: plain torch has no sparse 1x1, so
  ``sparse_as="auto"`` exports the factorized pair (dense 1x1) when it takes fewer MACs than the
  dense kernel (``d < kh * kw`` roughly) and the baked dense conv otherwise; ``"factorized"`` or
  ``"dense"`` force one.

ONNX packages (``onnx``, ``onnxscript``) are imported only inside :func:`export_onnx`.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Literal

import torch
from torch import nn

from .conv import PenniConv2d
from .masking import bake_masks

__all__ = ["to_torch", "export_onnx", "plain_layers", "is_plain_torch"]

SparseAs = Literal["auto", "factorized", "dense"]


def _dense_conv(layer: PenniConv2d) -> nn.Conv2d:
    """The layer as one nn.Conv2d with the reconstructed (baked) kernel."""
    baked = layer._baked_weight if layer.forward_mode == "dense" else None
    weight = (baked if baked is not None else layer.reconstructed_weight()).detach()
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, bias=layer.bias is not None,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if layer.bias is not None:
            conv.bias.copy_(layer.bias.detach())
    return conv


def _factorized_pair(layer: PenniConv2d) -> nn.Sequential:
    """The layer as basis conv (grouped, basis repeated per input channel) + 1x1 coefficient conv."""
    basis = layer.basis.detach()
    c, d = layer.in_channels, layer.d
    basis_conv = nn.Conv2d(c, c * d, layer.kernel_size, layer.stride, layer.padding, layer.dilation, groups=c,
                           bias=False, device=basis.device, dtype=basis.dtype)
    mix = nn.Conv2d(c * d, layer.out_channels, 1, groups=layer.groups, bias=layer.bias is not None,
                    device=basis.device, dtype=basis.dtype)
    with torch.no_grad():
        basis_conv.weight.copy_(basis.unsqueeze(1).repeat(c, 1, 1, 1))
        mix.weight.copy_(layer.coefficients.detach().reshape(layer.out_channels, -1, 1, 1))
        if layer.bias is not None:
            mix.bias.copy_(layer.bias.detach())
    return nn.Sequential(basis_conv, mix)


def _pair_is_cheaper(layer: PenniConv2d) -> bool:
    """Whether basis conv + dense 1x1 take fewer MACs per output pixel than the dense kernel."""
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    per_group_in = layer.in_channels // layer.groups
    pair = layer.in_channels * layer.d * taps + layer.out_channels * per_group_in * layer.d
    return pair < layer.out_channels * per_group_in * taps


def plain_layers(layer: PenniConv2d, sparse_as: SparseAs = "auto") -> nn.Module:
    """Standard torch.nn layers computing what ``layer`` computes in its forward mode."""
    mode = layer.forward_mode
    if mode in ("factorized", "factorized_batched"):
        return _factorized_pair(layer)
    if mode.endswith("_sparse"):
        if sparse_as == "factorized" or (sparse_as == "auto" and _pair_is_cheaper(layer)):
            return _factorized_pair(layer)
    return _dense_conv(layer)


def _replace_penni_convs(model: nn.Module, sparse_as: SparseAs) -> nn.Module:
    """Swap every PenniConv2d (in place) for its plain layers; returns the model (or its replacement)."""
    if isinstance(model, PenniConv2d):
        return plain_layers(model, sparse_as)
    for name, child in list(model.named_children()):
        setattr(model, name, _replace_penni_convs(child, sparse_as))
    return model


def is_plain_torch(model: nn.Module) -> bool:
    """True when no module of ``model`` is a penni class."""
    return not any(type(m).__module__.split(".")[0] == "penni" for m in model.modules())


def to_torch(model: nn.Module, fold_bn: bool = False, sparse_as: SparseAs = "auto") -> nn.Module:
    """A copy of ``model`` (eval mode) made only of standard torch.nn layers, with the same outputs.

    Held masks are baked, each PenniConv2d becomes plain convs as its forward mode says (see the
    module docstring), and penni container classes are traced away with torch.fx. ``fold_bn``
    folds each BatchNorm into the conv before it (torch.fx's ``fuse``); off by default so that a
    comparison with an unfolded baseline treats both sides alike. ``model`` is not changed.
    """
    if sparse_as not in ("auto", "factorized", "dense"):
        raise ValueError(f"sparse_as must be 'auto', 'factorized' or 'dense', got {sparse_as!r}")
    plain = _replace_penni_convs(bake_masks(copy.deepcopy(model)), sparse_as).eval()
    if fold_bn:
        from torch.fx.experimental.optimization import fuse
        plain = fuse(plain)
    if not is_plain_torch(plain):
        try:
            plain = torch.fx.symbolic_trace(plain)
        except Exception as err:  # fx raises many kinds of errors on untraceable code
            raise ValueError(f"cannot turn {type(model).__name__} into plain torch layers: torch.fx could not "
                             f"trace it ({type(err).__name__}: {err}); make its forward fx-traceable") from err
    return plain.eval()


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, dynamic_batch: bool = True,
                opset_version: int = 18, dynamo: bool = False) -> str:
    """Write ``model`` (a penni model is converted with :func:`to_torch` first) to an ONNX file.

    ``dynamic_batch`` leaves the batch dimension free. ``dynamo=False`` uses the TorchScript
    exporter (fast, no onnxscript needed; works on torch 2.11 and 2.14); ``dynamo=True`` uses
    ``torch.export`` (needs onnxscript). Needs the ``onnx`` package (``pip install penni[export]``).
    """
    try:
        import onnx  # noqa: F401  (torch.onnx needs it; fail here with a clear message)
    except ImportError as err:
        raise ImportError("ONNX export needs the onnx package: pip install 'penni[export]' "
                          "(onnx, onnxruntime, onnxscript)") from err
    plain = model if is_plain_torch(model) else to_torch(model)
    plain.eval()
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    path = os.fspath(path)
    kwargs: dict[str, Any] = {"input_names": names, "output_names": ["output"], "opset_version": opset_version,
                              "dynamo": dynamo}
    if dynamo:
        if dynamic_batch:
            batch = torch.export.Dim("batch")
            kwargs["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
        kwargs["external_data"] = False
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {**{n: {0: "batch"} for n in names}, "output": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(plain, inputs, path, **kwargs)
    return path
