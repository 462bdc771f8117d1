"""The sparsity term of PENNI retraining: L1 on the coefficients (optionally on 1x1 convs)."""
from __future__ import annotations

import torch
from torch import nn

from .conv import PenniConv2d


def is_pointwise(module: nn.Module) -> bool:
    """A 1x1 nn.Conv2d (the bottleneck and shortcut convs of ResNets)."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def l1_penalty(model: nn.Module, include_pointwise: bool = False) -> torch.Tensor:
    """Sum of |coefficients| over all PenniConv2d layers (a sum, as the paper, not a mean).

    With ``include_pointwise`` the weights of 1x1 convs are added, as the reference does for
    ResNet50 on ImageNet. Works on DDP-wrapped models.
    """
    terms = []
    for module in model.modules():
        if isinstance(module, PenniConv2d):
            terms.append(module.coefficients.abs().sum())
        elif include_pointwise and is_pointwise(module):
            terms.append(module.weight.abs().sum())
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
