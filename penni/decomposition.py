"""decompose(): replace k x k convolutions by PenniConv2d layers initialized by a truncated SVD."""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Mapping, Union

import torch
from torch import nn

from .conv import PenniConv2d
from .recipe import get_recipe

DSpec = Union[int, Mapping[str, int], Callable[[str, nn.Conv2d], "int | None"]]


def svd_factors(weight: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-d factors of the ``(Cout*Cin/g) x (kh*kw)`` kernel matrix by an **uncentered** SVD.

    Returns ``(basis (d, kh, kw), coefficients (Cout, Cin/g, d))``. Uncentered (unlike the
    reference's PCA, which drops the mean) so that ``d = kh*kw`` reproduces the layer exactly.
    """
    cout, cin_g, kh, kw = weight.shape
    if not 1 <= d <= kh * kw:
        raise ValueError(f"d must be in [1, kh*kw={kh * kw}] for a {kh}x{kw} kernel, got {d}")
    matrix = weight.detach().reshape(cout * cin_g, kh * kw).to(torch.float64)
    # a layer with fewer kernels than kh*kw gets the full basis (vh is square, and U tiny), so that d basis kernels
    # exist even when d exceeds its kernel count (the extra ones get zero coefficients)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=matrix.shape[0] < kh * kw)
    basis = vh[:d]                                   # orthonormal rows, (d, k*k)
    coefficients = matrix @ basis.T                  # projection = U_d S_d
    return (basis.reshape(d, kh, kw).to(weight.dtype),
            coefficients.reshape(cout, cin_g, d).to(weight.dtype))


def is_decomposable(conv: nn.Module) -> bool:
    """True for nn.Conv2d with a kernel larger than 1x1 that is not depthwise.

    Depthwise convs (one input channel per group) have a single kernel per output channel:
    sharing a basis there saves nothing, so they stay dense. Other grouped convs are
    decomposed exactly (the coefficient conv keeps the groups). Subclasses that change how the
    conv computes (their own ``forward`` or ``_conv_forward``: timm's same-padding ``Conv2dSame``,
    weight-standardized ``StdConv2d`` / ``ScaledStdConv2d``) stay dense, as do convs with a
    padding mode other than zeros; mixed convs (timm's ``MixedConv2d``) hold plain convs, which are decomposed.
    """
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
        return False
    if type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        return False
    kh, kw = conv.kernel_size
    depthwise = conv.groups > 1 and conv.in_channels == conv.groups
    return kh * kw > 1 and not depthwise


def _resolve_d(d: DSpec, name: str, conv: nn.Conv2d) -> int | None:
    if isinstance(d, int):
        value = d
    elif isinstance(d, Mapping):
        if name in d:
            value = d[name]
        else:
            matches = [v for pattern, v in d.items() if pattern != "default" and fnmatch.fnmatchcase(name, pattern)]
            value = matches[0] if matches else d.get("default")
    else:
        value = d(name, conv)
    if value is None:
        return None
    kh, kw = conv.kernel_size
    return min(int(value), kh * kw)


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in exclude)


def decompose(
    model: nn.Module,
    d: DSpec = 5,
    exclude: Iterable[str] = (),
    init: str = "svd",
) -> nn.Module:
    """Replace every decomposable ``nn.Conv2d`` of ``model`` (in place) by a ``PenniConv2d``.

    ``d`` is an int, a mapping ``{layer name or glob: d}`` (key ``"default"`` for the rest;
    layers without a value stay dense) or a callable ``(name, conv) -> d | None``. A ``d``
    larger than ``kh*kw`` is capped at ``kh*kw`` (which is exact). ``exclude`` lists layer names
    or globs to keep dense. ``init="svd"`` copies the layer; ``"empty"`` only builds the shapes
    (used by ``penni.load`` before loading tensors). Returns the model.
    """
    if init not in ("svd", "empty"):
        raise ValueError(f"init must be 'svd' or 'empty', got {init!r}")
    exclude = list(exclude)
    targets = [
        (name, m) for name, m in model.named_modules()
        if name and is_decomposable(m) and not _excluded(name, exclude)
    ]
    recipe = get_recipe(model)
    for name, conv in targets:
        layer_d = _resolve_d(d, name, conv)
        if layer_d is None:
            continue
        layer = PenniConv2d.from_conv(conv, layer_d)
        if init == "svd":
            basis, coefficients = svd_factors(conv.weight, layer_d)
            with torch.no_grad():
                layer.basis.copy_(basis)
                layer.coefficients.copy_(coefficients)
                if conv.bias is not None:
                    layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        _set_submodule(model, name, layer)
        recipe.decomposed[name] = layer_d
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
