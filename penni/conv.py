"""PenniConv2d: a convolution whose kernels are combinations of d shared basis kernels."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

ForwardMode = Literal["reconstruct", "factorized", "dense"]
FORWARD_MODES: tuple[str, ...] = ("reconstruct", "factorized", "dense")


class PenniConv2d(nn.Module):
    """Conv2d with kernels ``W[o, i] = sum_j coefficients[o, i, j] * basis[j]``.

    ``basis`` is ``(d, kh, kw)`` and ``coefficients`` is ``(out_channels, in_channels // groups, d)``.
    The forward mode is a switch on the layer (as tensorly-torch's factorized layers):

    * ``"reconstruct"`` rebuilds the dense kernel and runs one dense conv: the training default,
      cheap and DDP-safe because every parameter takes part in every step;
    * ``"factorized"`` convolves every input channel with every basis kernel (a depthwise conv),
      then mixes the ``in_channels * d`` maps with a 1x1 coefficient conv;
    * ``"dense"`` runs a kernel baked when the mode was set (inference only; re-set the mode
      after changing the parameters).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        d: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if d < 1:
            raise ValueError(f"the number of basis kernels d must be >= 1, got {d}")
        if isinstance(padding, str) and padding not in ("valid", "same"):
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.basis = nn.Parameter(torch.empty(d, *self.kernel_size, **factory))
        self.coefficients = nn.Parameter(torch.empty(out_channels, in_channels // groups, d, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.forward_mode: str = "reconstruct"
        self.register_buffer("_baked_weight", None, persistent=False)
        self.reset_parameters()

    @property
    def d(self) -> int:
        """Number of basis kernels (shrinking may lower it)."""
        return self.basis.shape[0]

    def reset_parameters(self) -> None:
        """Random init with the fan-in scale of nn.Conv2d (orthonormal basis, scaled coefficients)."""
        kh, kw = self.kernel_size
        d = self.d
        with torch.no_grad():
            q = torch.linalg.qr(torch.randn(kh * kw, max(d, 1), dtype=torch.float64))[0]
            basis = torch.zeros(d, kh * kw, dtype=torch.float64)
            basis[: min(d, kh * kw)] = q.T[: min(d, kh * kw)]
            self.basis.copy_(basis.view(d, kh, kw))
            fan_in = (self.in_channels // self.groups) * kh * kw
            bound = (1.0 / fan_in) ** 0.5
            nn.init.uniform_(self.coefficients, -bound * (3.0 ** 0.5), bound * (3.0 ** 0.5))
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)

    def reconstructed_weight(self) -> torch.Tensor:
        """Dense kernels ``(out, in/groups, kh, kw)`` = coefficients @ basis."""
        d = self.d
        w = self.coefficients.reshape(-1, d) @ self.basis.reshape(d, -1)
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def set_forward_mode(self, mode: str) -> None:
        """Switch the forward mode; ``"dense"`` bakes the current kernels."""
        if mode not in FORWARD_MODES:
            raise ValueError(f"forward mode must be one of {FORWARD_MODES}, got {mode!r}")
        self._baked_weight = self.reconstructed_weight().detach().clone() if mode == "dense" else None
        self.forward_mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward_mode == "factorized":
            return self._forward_factorized(x)
        weight = self._baked_weight if self.forward_mode == "dense" else self.reconstructed_weight()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        """Basis conv over every input channel, then a 1x1 coefficient conv.

        Map ``c * d + j`` is input channel ``c`` convolved with basis kernel ``j`` (the pairing the
        reference code's ``forward_test`` got wrong), which matches ``coefficients.reshape(out, -1)``.
        """
        basis = self.basis.unsqueeze(1).repeat(self.in_channels, 1, 1, 1)  # (Cin*d, 1, kh, kw)
        maps = F.conv2d(x, basis, None, self.stride, self.padding, self.dilation, self.in_channels)
        mix = self.coefficients.reshape(self.out_channels, -1, 1, 1)
        return F.conv2d(maps, mix, self.bias, 1, 0, 1, self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, d: int) -> "PenniConv2d":
        """A PenniConv2d with the geometry of ``conv`` (parameters not yet initialized from it)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding is supported, got padding_mode={conv.padding_mode!r}")
        return cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, d,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
        )

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, d={self.d}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", mode={self.forward_mode}"


def set_forward_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set the forward mode of every PenniConv2d in ``model``; returns the model."""
    for module in model.modules():
        if isinstance(module, PenniConv2d):
            module.set_forward_mode(mode)
    return model


def penni_layers(model: nn.Module) -> dict[str, PenniConv2d]:
    """Name -> PenniConv2d for every decomposed layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PenniConv2d)}
