"""profile(model, example_inputs): the per-layer structure tables of the PENNI appendix, params, MACs.

One forward pass with hooks on every ``nn.Conv2d``, ``PenniConv2d`` and ``nn.Linear`` collects the
output shapes (any architecture, layers called several times included). Each layer gets a
``LayerRow`` in the layout of the paper's Table 1 / Table 2 (name, kernel size, width = output
channels, number of basis kernels, non-zero/total coefficients, sparsity %) plus its MACs.

MACs are multiply-accumulates (not FLOPs), **per input image** (the totals of the pass divided by
the batch size of ``example_inputs``), counted two ways:

* **sparse** (the paper's rule, what a sparse decomposed implementation costs):
  ``PenniConv2d``: basis conv ``Hout*Wout*Cin*d*kh*kw`` plus the coefficient mix
  ``nnz(coefficients)*Hout*Wout``; any other ``nn.Conv2d`` (1x1 or not): ``nnz(weight)*Hout*Wout``
  (the reference code counted 1x1 convs as ``Cin*Hin*nnz``, wrong for strided convs; we use the
  output size); ``nn.Linear``: ``nnz(weight)`` per output row.
* **dense** (what the model costs run with dense kernels): conv
  ``Hout*Wout*Cout*(Cin/groups)*kh*kw`` (a ``PenniConv2d`` counts as its reconstructed dense
  conv), Linear ``in*out`` per output row. This equals half of the FLOPs that
  ``torch.utils.flop_counter.FlopCounterMode`` reports (it counts 2 FLOPs per MAC) for a model
  made of these layers run with ``penni.set_forward_mode(model, "dense")``. In the default
  ``"reconstruct"`` mode FlopCounterMode also counts the kernel reconstruction matmul
  ``Cout*(Cin/groups)*d*kh*kw`` MACs per layer call (independent of the batch size); in
  ``"factorized"`` mode it counts the depthwise basis conv plus a *dense* coefficient 1x1 conv.
  Other ops FlopCounterMode knows (bmm, attention, Conv1d/3d, ...) are not counted here.

Masked (parametrized, see ``penni.masking``) tensors are read through the module attribute, i.e.
the effective masked values. Bias and BatchNorm costs are not counted as MACs.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .conv import PenniConv2d
from .regularization import is_pointwise
from .unwrap import unwrap_model

KINDS: tuple[str, ...] = ("penni", "conv", "pointwise", "linear")
CONV_KINDS: tuple[str, ...] = ("penni", "conv", "pointwise")  # the paper's tables: convolutions only

Number = int | float
CSV_COLUMNS: tuple[str, ...] = (
    "name", "kind", "size", "width", "in_channels", "groups", "stride", "basis", "nonzero", "total",
    "sparsity", "params", "calls", "output_hw", "sparse_macs", "dense_macs",
)


@dataclass
class LayerRow:
    """One layer of the structure table. MACs are per input image.

    ``nonzero``/``total`` count the coefficients of a ``PenniConv2d`` and the weight of a plain
    conv or Linear (bias excluded). ``basis`` is None ("-") for layers that are not decomposed.
    ``params`` is the layer's own stored parameters (basis, coefficients, weight, bias).
    ``output_hw`` is the output size of the last call (None for a layer not called by the pass).
    """

    name: str
    kind: str                                 # "penni" | "conv" | "pointwise" | "linear"
    in_channels: int                          # in_features for Linear
    out_channels: int                         # the table's "width"; out_features for Linear
    kernel_size: tuple[int, int] | None       # None for Linear
    stride: tuple[int, int] | None
    groups: int
    basis: int | None
    nonzero: int
    total: int
    params: int
    calls: int
    output_hw: tuple[int, int] | None
    sparse_macs: Number
    dense_macs: Number

    @property
    def width(self) -> int:
        return self.out_channels

    @property
    def sparsity(self) -> float:
        """Percentage of zero coefficients (weights for non-decomposed layers)."""
        return 100.0 * (1.0 - self.nonzero / self.total) if self.total else 0.0

    @property
    def size(self) -> str:
        """Kernel size as the tables write it: "3" for 3x3, "3x1" otherwise, "-" for Linear."""
        if self.kernel_size is None:
            return "-"
        kh, kw = self.kernel_size
        return str(kh) if kh == kw else f"{kh}x{kw}"

    @property
    def basis_str(self) -> str:
        return "-" if self.basis is None else str(self.basis)

    @property
    def coefficients_str(self) -> str:
        return f"{self.nonzero}/{self.total}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("kernel_size", "stride", "output_hw"):
            if out[key] is not None:
                out[key] = list(out[key])
        out.update(width=self.width, size=self.size, sparsity=round(self.sparsity, 4))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerRow":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        for key in ("kernel_size", "stride", "output_hw"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)


@dataclass
class Profile:
    """Result of ``profile``: rows plus model totals (MACs per input image)."""

    rows: list[LayerRow]
    params: int             # all stored parameters (incl. BatchNorm, basis, coefficients)
    nonzero_params: int     # non-zero effective (masked) parameter values
    sparse_macs: Number
    dense_macs: Number
    batch_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- access
    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer named {name!r} in the profile")

    def select(self, kinds: Iterable[str] | None = None) -> list[LayerRow]:
        """Rows whose kind is in ``kinds`` (all rows for None)."""
        if kinds is None:
            return list(self.rows)
        kinds = check_kinds(kinds)
        return [r for r in self.rows if r.kind in kinds]

    @property
    def coefficient_nonzero(self) -> int:
        return sum(r.nonzero for r in self.rows)

    @property
    def coefficient_total(self) -> int:
        return sum(r.total for r in self.rows)

    # ---------------------------------------------------------------- renderers
    def to_markdown(self, kinds: Iterable[str] | None = None) -> str:
        """Markdown table (Table 1/2 columns plus kind, params and MACs), a Total row and a summary.

        ``kinds`` restricts the rows (e.g. ``penni.profile.CONV_KINDS`` for the paper's
        conv-only tables); the Total row sums the shown rows, the summary is the whole model.
        """
        rows = self.select(kinds)
        header = ["Name", "Kind", "Size", "Width", "Basis", "Coefficients (non-zero/total)",
                  "Sparsity %", "Params", "MACs (sparse)", "MACs (dense)"]
        lines = [md_row(header), md_row(["---"] * len(header))]
        for r in rows:
            lines.append(md_row([r.name, r.kind, r.size, r.width, r.basis_str, r.coefficients_str,
                                  f"{r.sparsity:.2f}", human(r.params), human(r.sparse_macs),
                                  human(r.dense_macs)]))
        nz, tot = sum(r.nonzero for r in rows), sum(r.total for r in rows)
        lines.append(md_row(["**Total**", "", "", "", "", f"{nz}/{tot}", f"{pct_zero(nz, tot):.2f}",
                              human(sum(r.params for r in rows)), human(sum(r.sparse_macs for r in rows)),
                              human(sum(r.dense_macs for r in rows))]))
        lines += [
            "",
            f"Parameters: {self.params} ({human(self.params)}), non-zero: {self.nonzero_params} "
            f"({human(self.nonzero_params)})",
            f"MACs per image: sparse {human(self.sparse_macs)} ({self.sparse_macs}), "
            f"dense {human(self.dense_macs)} ({self.dense_macs})",
        ]
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path | None = None, kinds: Iterable[str] | None = None) -> str:
        """CSV text (one row per layer and a final ``Total`` row, kind ``total``); written to ``path`` if given.

        The Total row sums nonzero/total and the MACs of the rows; its ``params`` is the whole
        model's stored parameter count (BatchNorm etc. included).
        """
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        rows = self.select(kinds)
        for r in rows:
            writer.writerow([
                r.name, r.kind, r.size, r.width, r.in_channels, r.groups,
                "" if r.stride is None else "x".join(map(str, r.stride)),
                "" if r.basis is None else r.basis, r.nonzero, r.total, f"{r.sparsity:.4f}",
                r.params, r.calls, "" if r.output_hw is None else "x".join(map(str, r.output_hw)),
                r.sparse_macs, r.dense_macs,
            ])
        nz, tot = sum(r.nonzero for r in rows), sum(r.total for r in rows)
        writer.writerow(["Total", "total", "", "", "", "", "", "", nz, tot, f"{pct_zero(nz, tot):.4f}",
                         self.params, "", "", _sum(r.sparse_macs for r in rows), _sum(r.dense_macs for r in rows)])
        text = buf.getvalue()
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (``Profile.from_dict`` reads it back)."""
        return {
            "params": self.params, "nonzero_params": self.nonzero_params,
            "sparse_macs": self.sparse_macs, "dense_macs": self.dense_macs,
            "batch_size": self.batch_size,
            "coefficient_nonzero": self.coefficient_nonzero, "coefficient_total": self.coefficient_total,
            "extra": dict(self.extra),
            "rows": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Profile":
        return cls(rows=[LayerRow.from_dict(r) for r in data["rows"]], params=data["params"],
                   nonzero_params=data["nonzero_params"], sparse_macs=data["sparse_macs"],
                   dense_macs=data["dense_macs"], batch_size=data.get("batch_size", 1),
                   extra=dict(data.get("extra", {})))

    def __str__(self) -> str:
        return self.to_markdown()


# -------------------------------------------------------------------- profile


def profile(model: nn.Module, example_inputs: Any, batch_size: int | None = None) -> Profile:
    """Profile ``model`` with one forward pass on ``example_inputs``.

    ``example_inputs`` is a tensor, a tuple/list of positional arguments or a dict of keyword
    arguments. MACs are divided by ``batch_size`` (default: dim 0 of the first input tensor).
    The pass runs in eval mode under ``torch.no_grad()`` (BatchNorm running statistics are not
    touched) and the training flags are restored. DDP/DataParallel/``torch.compile`` wrappers are
    unwrapped. PenniConv2d forward modes are left as they are.
    """
    model = unwrap_model(model)
    args, kwargs = _as_call(example_inputs)
    if batch_size is None:
        batch_size = _batch_size(example_inputs)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    targets = [(name, m) for name, m in model.named_modules() if _kind(m) is not None]
    records: dict[int, list[tuple[int, ...]]] = {id(m): [] for _, m in targets}

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            records[id(module)].append(tuple(output.shape))

    handles = [m.register_forward_hook(hook) for _, m in targets]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag

    rows: list[LayerRow] = []
    seen: set[int] = set()
    sparse_total = dense_total = 0  # exact totals of the pass, divided by the batch size at the end
    for name, module in targets:
        if id(module) in seen:  # a module registered under two names: count it once
            continue
        seen.add(id(module))
        row, sparse, dense = _layer_row(name, module, records[id(module)], batch_size)
        rows.append(row)
        sparse_total += sparse
        dense_total += dense

    params, nonzero = _count_params(model)
    return Profile(rows=rows, params=params, nonzero_params=nonzero,
                   sparse_macs=_per_image(sparse_total, batch_size),
                   dense_macs=_per_image(dense_total, batch_size), batch_size=batch_size)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, PenniConv2d):
        return "penni"
    if isinstance(module, nn.Conv2d):
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            return None
        return "pointwise" if is_pointwise(module) else "conv"
    if isinstance(module, nn.Linear):
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            return None
        return "linear"
    return None


def _nnz(t: torch.Tensor) -> int:
    return int(torch.count_nonzero(t.detach()).item())


def _layer_row(name: str, module: nn.Module, shapes: list[tuple[int, ...]],
               batch_size: int) -> tuple[LayerRow, int, int]:
    """The row of one layer and its exact MAC totals over the pass (sparse, dense)."""
    kind = _kind(module)
    assert kind is not None
    sparse_total = dense_total = 0
    output_hw = None
    with torch.no_grad():
        if kind == "linear":
            w = module.weight
            nnz, total = _nnz(w), w.numel()
            for shape in shapes:
                out_rows = math.prod(shape) // module.out_features
                sparse_total += nnz * out_rows
                dense_total += module.in_features * module.out_features * out_rows
            bias = 0 if module.bias is None else module.bias.numel()
            return _finish(LayerRow(
                name=name, kind=kind, in_channels=module.in_features, out_channels=module.out_features,
                kernel_size=None, stride=None, groups=1, basis=None, nonzero=nnz, total=total,
                params=total + bias, calls=len(shapes), output_hw=None, sparse_macs=0, dense_macs=0,
            ), sparse_total, dense_total, batch_size)

        kh, kw = module.kernel_size
        cin, cout, groups = module.in_channels, module.out_channels, module.groups
        if kind == "penni":
            coeff = module.coefficients
            nnz, total = _nnz(coeff), coeff.numel()
            d = module.d
            params = total + module.basis.numel()
        else:
            w = module.weight
            nnz, total = _nnz(w), w.numel()
            d = None
            params = total
        params += 0 if module.bias is None else module.bias.numel()
        for shape in shapes:
            n = 1 if len(shape) == 3 else shape[0]  # unbatched conv input (C, H, W)
            hw = shape[-1] * shape[-2]
            output_hw = (shape[-2], shape[-1])
            if kind == "penni":
                sparse_total += n * hw * (cin * d * kh * kw + nnz)
            else:
                sparse_total += n * hw * nnz
            dense_total += n * hw * cout * (cin // groups) * kh * kw
    return _finish(LayerRow(
        name=name, kind=kind, in_channels=cin, out_channels=cout, kernel_size=(kh, kw),
        stride=tuple(module.stride), groups=groups, basis=d, nonzero=nnz, total=total, params=params,
        calls=len(shapes), output_hw=output_hw, sparse_macs=0, dense_macs=0,
    ), sparse_total, dense_total, batch_size)


def _finish(row: LayerRow, sparse_total: int, dense_total: int, batch_size: int) -> tuple[LayerRow, int, int]:
    row.sparse_macs = _per_image(sparse_total, batch_size)
    row.dense_macs = _per_image(dense_total, batch_size)
    return row, sparse_total, dense_total


def _per_image(total: int, batch_size: int) -> Number:
    return total // batch_size if total % batch_size == 0 else total / batch_size


def _count_params(model: nn.Module) -> tuple[int, int]:
    """(stored parameter count, non-zero count of the effective values) without double counting."""
    total = nonzero = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # its ``original`` is counted through the parametrized module below
        for p in module._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            nonzero += _nnz(p)
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                originals = [p for p in plist.parameters(recurse=False)]
                key = id(originals[0]) if originals else id(plist)
                if key in seen:
                    continue
                seen.update(id(p) for p in originals)
                total += sum(p.numel() for p in originals)
                with torch.no_grad():
                    nonzero += _nnz(getattr(module, tensor_name))
    return total, nonzero




def _as_call(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _batch_size(example_inputs: Any) -> int:
    t = _first_tensor(example_inputs)
    if t is None or t.dim() == 0:
        raise ValueError("cannot infer the batch size from example_inputs: pass batch_size=")
    return int(t.shape[0])


# -------------------------------------------------------------------- helpers


def check_kinds(kinds: Iterable[str]) -> set[str]:
    kinds = {kinds} if isinstance(kinds, str) else set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown layer kinds {sorted(unknown)}: use some of {KINDS}")
    return kinds


def pct_zero(nonzero: int, total: int) -> float:
    return 100.0 * (1.0 - nonzero / total) if total else 0.0


def _sum(values: Iterable[Number]) -> Number:
    s = sum(values)
    return int(s) if isinstance(s, float) and s.is_integer() else s


def human(n: Number) -> str:
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if n.is_integer() else f"{n:.2f}"


def md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


__all__ = ["profile", "Profile", "LayerRow", "KINDS", "CONV_KINDS", "CSV_COLUMNS"]
