"""Helpers shared by the test modules."""
from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int = 1, mean_scale: float = 0.1, bias_scale: float = 0.1) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode outputs (and the constants a
    dead channel produces) depend on every channel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * mean_scale)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * bias_scale)
