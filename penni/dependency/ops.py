"""What torch ops do to channels: the tables the dependency analysis (:mod:`.analysis`) looks ops up in.

A module, function or method listed here works channel by channel (it passes the channel atoms of its
input on), combines tensors elementwise (binary: their channels are united), reduces over spatial dims,
or only reads a tensor's size. The ``CONST_BREAKING`` ones are per channel but do not keep a constant
channel constant (zero padding, average pooling at borders), so shrink may not fold such a channel.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS", "PASSTHROUGH_MODULES", "CONST_BREAKING_MODULES", "ELEMENTWISE_FUNCTIONS", "ELEMENTWISE_METHODS", "PASSTHROUGH_FUNCTIONS", "CONST_BREAKING_FUNCTIONS",
    "PASSTHROUGH_METHODS", "BINARY_FUNCTIONS", "BINARY_METHODS", "REDUCE_FUNCTIONS", "REDUCE_METHODS", "SIZE_METHODS",
    "SIZE_ATTRS", "is_stochastic_depth",
]

ACTIVATIONS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
PASSTHROUGH_MODULES: tuple[type, ...] = ACTIVATIONS + (
    nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)
CONST_BREAKING_MODULES: tuple[type, ...] = (  # per channel, but a constant does not stay constant
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
)
PASSTHROUGH_FUNCTIONS = {
    F.relu, torch.relu, torch.relu_, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh,
    F.tanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    torch.clamp, torch.clip, torch.abs, torch.neg, torch.exp,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate,
}
#: elementwise on one tensor: channel-wise whichever dim holds the channels (channels-last tensors too)
ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus, F.dropout, torch.abs,
    torch.neg, torch.exp,
}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "abs", "neg", "exp", "contiguous", "clone", "detach"}
CONST_BREAKING_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
PASSTHROUGH_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
    "clamp_min_", "clip", "clip_", "abs", "neg", "exp", "contiguous", "clone", "detach", "float",
    "double", "half", "bfloat16", "to", "type_as", "requires_grad_",
}
BINARY_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
SIZE_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}
SIZE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


def is_stochastic_depth(fn: Any) -> bool:
    """torchvision.ops.stochastic_depth (EfficientNet, ConvNeXt), matched by name: penni does not
    import torchvision. It scales whole samples, so channels pass through."""
    return getattr(fn, "__name__", "") == "stochastic_depth" and getattr(fn, "__module__", "").startswith("torchvision.")
