"""AlternatingSchedule: per epoch, decide whether the basis or the coefficients learn.

DDP-safe by construction: nothing toggles ``requires_grad`` (the reference flipped it after
wrapping in DDP, so basis gradients were never all-reduced). Every parameter takes part in
every backward pass; after backward (and after DDP's all-reduce), ``drop_frozen_gradients``
sets the frozen kind's gradients to None, so the optimizer skips them entirely (no update,
no weight decay, no momentum), exactly like a frozen parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .conv import PenniConv2d
from .masking import raw_parameter

PHASES = ("coefficients", "basis", "joint")


def basis_and_coefficient_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable basis and coefficient parameters of every PenniConv2d (masks resolved)."""
    bases, coefficients = [], []
    for module in model.modules():
        if isinstance(module, PenniConv2d):
            bases.append(raw_parameter(module, "basis"))
            coefficients.append(raw_parameter(module, "coefficients"))
    return bases, coefficients


@dataclass
class AlternatingSchedule:
    """Alternate basis and coefficient training every ``every`` epochs.

    ``start_with="coefficients"`` trains coefficients for epochs [0, every), the basis for
    [every, 2*every), and so on (the reference's CIFAR path); ``"basis"`` starts with the basis;
    ``"joint"`` trains both for the first ``every`` epochs, then alternates starting with the
    basis (the reference's ImageNet path). Other parameters (BN, 1x1 convs, the head) always learn.
    """

    every: int = 2
    start_with: str = "coefficients"
    reset_momentum: bool = True

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.start_with not in PHASES:
            raise ValueError(f"start_with must be one of {PHASES}, got {self.start_with!r}")

    def phase(self, epoch: int) -> str:
        """``"coefficients"``, ``"basis"`` or ``"joint"`` for this epoch."""
        block = epoch // self.every
        if self.start_with == "joint":
            if block == 0:
                return "joint"
            return "basis" if block % 2 == 1 else "coefficients"
        other = "basis" if self.start_with == "coefficients" else "coefficients"
        return self.start_with if block % 2 == 0 else other

    def frozen_parameters(self, model: nn.Module, epoch: int) -> list[nn.Parameter]:
        phase = self.phase(epoch)
        bases, coefficients = basis_and_coefficient_parameters(model)
        return {"coefficients": bases, "basis": coefficients, "joint": []}[phase]

    def drop_frozen_gradients(self, model: nn.Module, epoch: int) -> None:
        """Call between ``backward()`` and ``optimizer.step()``."""
        for p in self.frozen_parameters(model, epoch):
            p.grad = None

    def start_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> str:
        """Call at the start of each epoch: clears stale optimizer state (momentum) of the
        parameters that start learning again, so they do not resume with an old velocity."""
        phase = self.phase(epoch)
        if self.reset_momentum and epoch > 0 and phase != self.phase(epoch - 1):
            waking = set(map(id, self.frozen_parameters(model, epoch - 1))) - set(
                map(id, self.frozen_parameters(model, epoch)))
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in waking:
                        optimizer.state.pop(p, None)
        return phase
