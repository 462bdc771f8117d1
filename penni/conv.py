"""PenniConv2d: a convolution whose kernels are combinations of d shared basis kernels."""
from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

ForwardMode = Literal["reconstruct", "factorized", "dense", "factorized_batched", "factorized_sparse",
                      "factorized_batched_sparse"]
FORWARD_MODES: tuple[str, ...] = ("reconstruct", "factorized", "dense", "factorized_batched", "factorized_sparse",
                                  "factorized_batched_sparse")
# The forms optimize_for_inference chooses from (all give the dense form's outputs in inference mode).
INFERENCE_MODES: tuple[str, ...] = ("dense", "factorized", "factorized_batched", "factorized_sparse",
                                    "factorized_batched_sparse")
# Forms computed from tensors baked when the mode was set (re-set the mode after changing parameters).
BAKED_MODES: tuple[str, ...] = ("dense", "factorized_sparse", "factorized_batched_sparse")


class PenniConv2d(nn.Module):
    """Conv2d with kernels ``W[o, i] = sum_j coefficients[o, i, j] * basis[j]``.

    ``basis`` is ``(d, kh, kw)`` and ``coefficients`` is ``(out_channels, in_channels // groups, d)``.
    The forward mode is a switch on the layer (as tensorly-torch's factorized layers):

    * ``"reconstruct"`` rebuilds the dense kernel and runs one dense conv: the training default,
      cheap and DDP-safe because every parameter takes part in every step;
    * ``"factorized"`` convolves every input channel with every basis kernel (a grouped conv
      over the basis repeated per channel), then mixes the ``in_channels * d`` maps with a dense
      1x1 coefficient conv;
    * ``"factorized_batched"`` is the same, but the basis stage is one conv of the input viewed as
      ``(N * in_channels, 1, H, W)`` with the ``(d, 1, kh, kw)`` basis (often faster on CPU);
    * ``"dense"`` runs a kernel baked when the mode was set;
    * ``"factorized_sparse"`` / ``"factorized_batched_sparse"``: the basis stage of ``"factorized"``
      / ``"factorized_batched"`` over only the input channels with a non-zero coefficient, then
      the coefficient stage as a sparse (CSR) matmul baked when the mode was set.

    The baked forms (``BAKED_MODES``) are for inference only: re-set the mode after changing the
    parameters. ``penni.optimize_for_inference`` picks the fastest form per layer.
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
        # the sparse (CSR) mix matrix (out, kept_in * d) as plain buffers, so copy/.to()/deepcopy work
        self.register_buffer("_baked_mix_values", None, persistent=False)
        self.register_buffer("_baked_mix_crow", None, persistent=False)
        self.register_buffer("_baked_mix_col", None, persistent=False)
        self.register_buffer("_baked_keep", None, persistent=False)  # kept input channels, or None: all
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
        """Switch the forward mode; the baked modes (``BAKED_MODES``) bake the current parameters."""
        if mode not in FORWARD_MODES:
            raise ValueError(f"forward mode must be one of {FORWARD_MODES}, got {mode!r}")
        self._baked_weight = self.reconstructed_weight().detach().clone() if mode == "dense" else None
        self._baked_mix_values = self._baked_mix_crow = self._baked_mix_col = self._baked_keep = None
        if mode.endswith("_sparse"):
            csr, self._baked_keep = self._sparse_mix()
            self._baked_mix_crow, self._baked_mix_col = csr.crow_indices(), csr.col_indices()
            self._baked_mix_values = csr.values()
        self.forward_mode = mode

    def mix_matrix(self) -> torch.Tensor:
        """The coefficient stage as one ``(out, in * d)`` matrix (block-diagonal when groups > 1)."""
        coeff = self.coefficients.detach()
        if self.groups == 1:
            return coeff.reshape(self.out_channels, -1)
        out_per, in_per = self.out_channels // self.groups, self.in_channels // self.groups
        full = coeff.new_zeros(self.out_channels, self.in_channels * self.d)
        for g in range(self.groups):
            cols = slice(g * in_per * self.d, (g + 1) * in_per * self.d)
            full[g * out_per:(g + 1) * out_per, cols] = coeff[g * out_per:(g + 1) * out_per].reshape(out_per, -1)
        return full

    def _sparse_mix(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(CSR mix matrix over the kept input channels, kept channels or None when all are kept)``."""
        full = self.mix_matrix()
        alive = full.reshape(self.out_channels, self.in_channels, self.d).ne(0).any(dim=2).any(dim=0)
        keep = None if bool(alive.all()) else alive.nonzero().flatten()
        if keep is not None:
            columns = (keep[:, None] * self.d + torch.arange(self.d, device=keep.device)).flatten()
            full = full.index_select(1, columns)
        with warnings.catch_warnings():  # PyTorch's "sparse CSR is beta" notice: the sparse forms are opt-in and timed
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            return full.to_sparse_csr(), keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.forward_mode
        if mode in ("factorized", "factorized_batched"):
            return self._forward_factorized(x, batched=mode == "factorized_batched")
        if mode in ("factorized_sparse", "factorized_batched_sparse"):
            return self._forward_sparse(x, batched=mode == "factorized_batched_sparse")
        weight = self._baked_weight if mode == "dense" else self.reconstructed_weight()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _basis_maps(self, x: torch.Tensor, basis: torch.Tensor, batched: bool) -> torch.Tensor:
        """Every input channel ``c`` convolved with every basis kernel ``j``, as map ``c * d + j``.

        (The pairing the reference code's ``forward_test`` got wrong; it matches
        ``coefficients.reshape(out, -1)``.) ``batched``: one conv of the input viewed as
        ``(N * C, 1, H, W)`` with the ``(d, 1, kh, kw)`` basis; otherwise a grouped conv over the
        basis repeated per channel.
        """
        n, c = x.shape[:2]
        d = basis.shape[0]
        if batched:
            maps = F.conv2d(x.reshape(n * c, 1, *x.shape[2:]), basis.unsqueeze(1), None,
                            self.stride, self.padding, self.dilation)
            return maps.reshape(n, c * d, *maps.shape[2:])
        repeated = basis.unsqueeze(1).repeat(c, 1, 1, 1)  # (C*d, 1, kh, kw)
        return F.conv2d(x, repeated, None, self.stride, self.padding, self.dilation, c)

    def _forward_factorized(self, x: torch.Tensor, batched: bool = False) -> torch.Tensor:
        """Basis conv over every input channel, then a dense 1x1 coefficient conv (trainable)."""
        maps = self._basis_maps(x, self.basis, batched)
        mix = self.coefficients.reshape(self.out_channels, -1, 1, 1)
        return F.conv2d(maps, mix, self.bias, 1, 0, 1, self.groups)

    def _forward_sparse(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        """Basis conv over the kept input channels, then the baked CSR coefficient matmul."""
        if self._baked_mix_values is None:
            raise RuntimeError(f"forward mode {self.forward_mode!r} has nothing baked: call set_forward_mode again")
        keep = self._baked_keep
        if keep is not None:
            if keep.numel() == 0:  # every coefficient is zero: the output is the bias
                return self._bias_only(x)
            x = x.index_select(1, keep)
        maps = self._basis_maps(x, self.basis.detach(), batched)
        n, k = maps.shape[:2]
        spatial = maps.shape[2:]
        columns = maps.reshape(k, -1) if n == 1 else maps.reshape(n, k, -1).transpose(0, 1).reshape(k, -1)
        out = torch.sparse.mm(self._baked_csr(k), columns)  # (out, N * H * W)
        if self.bias is not None:
            out = out + self.bias.detach()[:, None]
        if n == 1:
            return out.reshape(1, self.out_channels, *spatial)
        return out.reshape(self.out_channels, n, *spatial).transpose(0, 1).contiguous()

    def _baked_csr(self, columns: int) -> torch.Tensor:
        """The baked CSR mix matrix ``(out, columns)``, a view of its buffers (no copy)."""
        return torch.sparse_csr_tensor(self._baked_mix_crow, self._baked_mix_col, self._baked_mix_values,
                                       (self.out_channels, columns), check_invariants=False)

    def _bias_only(self, x: torch.Tensor) -> torch.Tensor:
        """The output of a layer whose coefficients are all zero: its bias (or zeros) at the output size."""
        maps = self._basis_maps(x[:, :1], self.basis.detach()[:1], batched=True)
        out = maps.new_zeros(x.shape[0], self.out_channels, *maps.shape[2:])
        return out if self.bias is None else out + self.bias.detach().view(1, -1, 1, 1)

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
