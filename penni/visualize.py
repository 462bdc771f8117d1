"""Pictures of the PENNI appendix: coefficient matrix (Fig. 1), reconstructed kernels (Fig. 2), learning curves (Fig. 3).

Every function draws with matplotlib's Agg canvas directly (no pyplot, no global backend
switch, safe in worker processes without a display), writes a PNG to ``path`` (parent folders
are created) and returns ``path`` as a ``pathlib.Path``. Masked (parametrized) layers are drawn
with their effective, masked values. Magnitudes are drawn with exact zeros left white.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .conv import PenniConv2d

_CMAP = "viridis"  # its low end is dark, so small non-zero values never look like the white zeros
_METRIC_PREFIXES = ("train_", "val_", "valid_", "test_", "eval_")
_SKIP_KEYS = {"epoch", "step", "phase", "time", "seconds", "wall_s", "lr_step"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")  # room for suptitle + panel titles
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _cmap():
    import matplotlib

    return matplotlib.colormaps[_CMAP].with_extremes(bad="white")


def _magnitudes(matrix: torch.Tensor) -> np.ma.MaskedArray:
    """|matrix| as a masked array with the exact zeros masked (drawn white)."""
    values = matrix.detach().to("cpu", torch.float64).abs().numpy()
    return np.ma.masked_where(values == 0, values)


def _vmax(*arrays: np.ma.MaskedArray) -> float:
    """Top of the colour scale: the 99.5th percentile of the non-zero magnitudes (outliers saturate)."""
    values = np.concatenate([a.compressed() for a in arrays]) if arrays else np.zeros(0)
    if values.size == 0:
        return 1.0
    top = float(np.percentile(values, 99.5))
    return top if top > 0 else float(values.max()) or 1.0


def _extent_size(rows: int, cols: int, panels: int = 1) -> tuple[float, float]:
    width = min(max(6.0 * panels + 1.0, 6.0 + 0.012 * cols * panels), 18.0)
    height = min(max(3.5, 2.5 + 0.03 * rows), 10.0)
    return width, height


def _group_ticks(ax, groups: int, per_group: int, label: str) -> None:
    """x ticks at group starts (input channels), labelled by the group index, at a readable density."""
    step = max(1, int(math.ceil(groups / 16)))
    nice = [1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 256, 512]
    step = next((n for n in nice if n >= step), step)
    idx = list(range(0, groups, step))
    ax.set_xticks([i * per_group + (per_group - 1) / 2 for i in idx])  # centre of each group
    ax.set_xticklabels([str(i) for i in idx])
    ax.set_xlabel(label)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if groups <= 32 and per_group > 1:  # light separators between input channels
        for i in range(1, groups):
            ax.axvline(i * per_group - 0.5, color="0.85", linewidth=0.5)


def plot_coefficients(layer: PenniConv2d, path: str | Path, title: str | None = None) -> Path:
    """The coefficient matrix as in the paper's Figure 1.

    Rows (y) are output channels; columns (x) are ``in_channels/groups * d`` entries grouped by
    input channel (column ``c*d + j`` is basis kernel ``j`` of input channel ``c``, the layout of
    the factorized forward). The colour is ``|coefficient|``; pruned (exactly zero) entries are
    white. The default title gives the shape and the sparsity.
    """
    if not isinstance(layer, PenniConv2d):
        raise TypeError(f"plot_coefficients needs a PenniConv2d, got {type(layer).__name__}")
    with torch.no_grad():
        coeff = layer.coefficients.detach()
    cout, cin_g, d = coeff.shape
    data = _magnitudes(coeff.reshape(cout, cin_g * d))
    sparsity = 100.0 * float(data.mask.mean()) if data.mask is not np.ma.nomask else 0.0
    if title is None:
        title = (f"Coefficients |c|: {cout} out x {cin_g} in x d={d}, "
                 f"{sparsity:.1f}% zero (white)")
    fig = _figure(*_extent_size(cout, cin_g * d))
    ax = fig.add_subplot(1, 1, 1)
    vmax = _vmax(data)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=_cmap(), vmin=0.0, vmax=vmax)
    _group_ticks(ax, cin_g, d, f"input channel x basis ({d} columns per input channel)")
    ax.set_ylabel("output channel")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="|coefficient|", extend="max" if vmax < float(data.max() or 0) else "neither")
    return _save(fig, path)


def plot_reconstructed(
    layer: PenniConv2d,
    path: str | Path,
    original_weight: torch.Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Reconstructed kernels (``coefficients @ basis``) as in the paper's Figure 2.

    Each kernel tensor ``(out, in/groups, kh, kw)`` is drawn as a matrix of output channels (y)
    by ``in/groups * kh * kw`` columns grouped by input channel, colour ``|weight|`` with exact
    zeros white. With ``original_weight`` (e.g. the baseline conv's weight, shapes may differ
    after shrinking) the original is drawn on the left and the reconstruction on the right, with
    one shared colour scale (topped at the 99.5th percentile of the non-zero magnitudes).
    """
    if not isinstance(layer, PenniConv2d):
        raise TypeError(f"plot_reconstructed needs a PenniConv2d, got {type(layer).__name__}")
    with torch.no_grad():
        recon = layer.reconstructed_weight().detach()
    panels: list[tuple[str, torch.Tensor]] = []
    if original_weight is not None:
        if original_weight.dim() != 4:
            raise ValueError(f"original_weight must be (out, in, kh, kw), got shape {tuple(original_weight.shape)}")
        panels.append(("original", original_weight.detach()))
    panels.append((f"reconstructed (d={layer.d})", recon))
    mats = [(name, _magnitudes(w.reshape(w.shape[0], -1)), w.shape) for name, w in panels]
    vmax = _vmax(*(m for _, m, _ in mats))
    peak = max(float(m.max()) if m.count() else 0.0 for _, m, _ in mats)
    rows = max(m.shape[0] for _, m, _ in mats)
    cols = max(m.shape[1] for _, m, _ in mats)
    fig = _figure(*_extent_size(rows, cols, len(mats)))
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    im = None
    for ax, (name, data, shape) in zip(axes, mats):
        zero = 100.0 * float(data.mask.mean()) if data.mask is not np.ma.nomask else 0.0
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=_cmap(), vmin=0.0, vmax=vmax)
        _group_ticks(ax, shape[1], shape[2] * shape[3], f"input channel ({shape[2]}x{shape[3]} kernel each)")
        ax.set_ylabel("output channel")
        ax.set_title(f"{name}\n{shape[0]}x{shape[1]}x{shape[2]}x{shape[3]}, {zero:.1f}% zero")
    fig.colorbar(im, ax=list(axes), label="|weight|", extend="max" if vmax < peak else "neither")
    if title is not None:
        fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------- learning curves

# the part of the basis/coefficient schedule each epoch trained (history key ``phase``): shaded
_LEARNING_SHADES = {"basis": ("tab:orange", "basis learns"), "coefficients": ("tab:green", "coefficients learn")}
_PANEL_OF = {"prunable_fraction": "sparsity"}  # the pruning rule's would-remove fraction beside the sparsity


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float, np.integer, np.floating)):
        return math.isfinite(float(v))
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return math.isfinite(float(v))
    return False


def _epoch_numbers(epochs: Sequence[Any], count: int) -> list[float]:
    """x values numbered from 1 like the console: given numbers (shifted by one when they start
    at 0, as a training loop counts), else 1, 2, ..."""
    given = [float(e) if _is_number(e) else None for e in list(epochs)[:count]]
    if len(given) < count or None in given:
        return [float(i + 1) for i in range(count)]
    shift = 1.0 if given and min(given) == 0 else 0.0
    return [e + shift for e in given]


def _phase_rows(phase: Any) -> list[Mapping[str, Any]]:
    """One phase as a list of per-epoch dicts (a dict of per-epoch lists is transposed)."""
    if isinstance(phase, Mapping):
        lists = {k: v for k, v in phase.items() if isinstance(v, Sequence) and not isinstance(v, str)}
        n = max((len(v) for v in lists.values()), default=0)
        return [{k: v[i] for k, v in lists.items() if i < len(v)} for i in range(n)]
    if isinstance(phase, Sequence) and not isinstance(phase, str):
        for epoch in phase:
            if not isinstance(epoch, Mapping):
                raise TypeError(f"a phase given as a list must hold one dict per epoch, got {type(epoch).__name__}")
        return list(phase)
    raise TypeError(f"cannot read learning curves from {type(phase).__name__}")


def _phase_series(phase: Any) -> dict[str, tuple[list[float], list[float]]]:
    """metric -> (epochs from 1, values) for one phase (a list of epoch dicts or a dict of lists)."""
    rows = _phase_rows(phase)
    xs = _epoch_numbers([r.get("epoch") for r in rows], len(rows))
    series: dict[str, tuple[list[float], list[float]]] = {}
    for x, row in zip(xs, rows):
        for key, v in row.items():
            if key in _SKIP_KEYS or not _is_number(v):
                continue
            points = series.setdefault(key, ([], []))
            points[0].append(x)
            points[1].append(float(v))
    return series


def learning_spans(phase: Any) -> list[tuple[float, float, str]]:
    """(first epoch, last epoch, what learns) for each run of epochs in which only the basis or only
    the coefficients learn (history key ``phase``), epochs numbered from 1."""
    rows = _phase_rows(phase)
    xs = _epoch_numbers([r.get("epoch") for r in rows], len(rows))
    spans: list[tuple[float, float, str]] = []
    for x, row in zip(xs, rows):
        part = row.get("phase")
        if part not in _LEARNING_SHADES:
            continue
        if spans and spans[-1][2] == part and spans[-1][1] == x - 1:
            spans[-1] = (spans[-1][0], x, part)
        else:
            spans.append((x, x, part))
    return spans


def _normalize_history(history: Any) -> dict[str, Any]:
    """phase name -> the phase's epochs ('' when ``history`` is one phase)."""
    def epoch_list(v: Any) -> bool:
        return isinstance(v, Sequence) and not isinstance(v, str) and all(isinstance(e, Mapping) for e in v)

    values = list(history.values()) if isinstance(history, Mapping) else []
    if values and all(isinstance(v, Mapping) or epoch_list(v) for v in values) and any(
        isinstance(v, Mapping) or len(v) > 0 for v in values
    ):  # several phases (an empty phase is allowed next to a filled one)
        return {str(name): phase for name, phase in history.items()}
    return {"": history}


def _panel_name(metric: str) -> str:
    if metric in _PANEL_OF:
        return _PANEL_OF[metric]
    for prefix in _METRIC_PREFIXES:
        if metric.startswith(prefix) and len(metric) > len(prefix):
            return metric[len(prefix):]
    return metric


def _choose_panels(phases: Mapping[str, Mapping[str, Any]], metrics: Iterable[str] | None) -> dict[str, list[str]]:
    """panel -> its metric names, in first-seen order or in the order ``metrics`` asks for."""
    panels: dict[str, list[str]] = {}
    for series in phases.values():
        for metric in series:
            names = panels.setdefault(_panel_name(metric), [])
            if metric not in names:
                names.append(metric)
    if metrics is not None:
        chosen: dict[str, list[str]] = {}
        for w in metrics:
            if w in panels:
                chosen[w] = panels[w]
            elif _panel_name(w) in panels and w in panels[_panel_name(w)]:
                chosen.setdefault(_panel_name(w), []).append(w)
            else:
                raise KeyError(f"metric {w!r} not in the history (found: {sorted(m for v in panels.values() for m in v)})")
        panels = chosen
    if not panels:
        raise ValueError("the history holds no numeric metric to plot")
    return panels


def _draw_panel(ax, series: Mapping[str, Any], panel: str, names: list[str], spans) -> None:
    """One panel: the learning shades behind, one line per metric, a legend where it helps."""
    from matplotlib.ticker import MaxNLocator

    for first, last, part in spans:
        ax.axvspan(first - 0.5, last + 0.5, color=_LEARNING_SHADES[part][0], alpha=0.12, lw=0)
    drawn = [m for m in names if m in series]
    for metric in drawn:
        xs, ys = series[metric]
        label = "pruning rule would remove" if metric == "prunable_fraction" else metric
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label,
                linestyle="--" if metric == "prunable_fraction" else "-")
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
    elif len(names) > 1 or names[0] != panel:
        ax.legend(fontsize="small")
    epochs = [x for m in drawn for x in series[m][0]]
    if epochs:  # whole epochs, half an epoch of room (one epoch alone is not drawn at 0.95..1.05)
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def _shade_legend(fig, phases: Mapping[str, Any]) -> None:
    """A figure legend for the shades, when some phase has them."""
    from matplotlib.patches import Patch

    parts = {part for phase in phases.values() for _, _, part in learning_spans(phase)}
    if parts:
        handles = [Patch(color=_LEARNING_SHADES[p][0], alpha=0.3, label=_LEARNING_SHADES[p][1])
                   for p in _LEARNING_SHADES if p in parts]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")


def plot_learning_curves(
    history: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
    metrics: Iterable[str] | None = None,
) -> Path:
    """Learning curves, one panel per metric, one column per phase (the paper's Figure 3).

    ``history`` is one of

    * one phase as a list of per-epoch dicts: ``[{"epoch": 1, "train_loss": 2.1, "val_top1": 0.4,
      "sparsity": 0.1}, ...]`` (``epoch`` is optional, default 1, 2, ...; numbers counted from 0,
      as a training loop's are, are drawn from 1 like the console prints them);
    * one phase as a dict of per-epoch lists: ``{"train_loss": [...], "val_top1": [...]}``
      (an optional ``"epoch"`` list gives the x values);
    * several phases: ``{"baseline": <phase>, "retrain": <phase>, "finetune": <phase>}``, drawn
      left to right in the given order.

    Metrics that differ only by a ``train_``/``val_``/``test_``/``eval_`` prefix share a panel
    (``train_loss`` and ``val_loss`` are two lines in the "loss" panel); ``prunable_fraction`` (the
    fraction of coefficients the pruning rule would remove) is drawn dashed in the "sparsity" panel.
    Epochs whose ``phase`` is ``basis`` or ``coefficients`` (the alternating schedule) are shaded.
    Non-numeric values and the keys ``epoch``, ``step``, ``time``... are ignored. ``metrics`` selects
    panels or metric names (in that order); by default every metric found is drawn.
    """
    phases = _normalize_history(history)
    series = {name: _phase_series(phase) for name, phase in phases.items()}
    panels = _choose_panels(series, metrics)
    n_rows, n_cols = len(panels), len(phases)
    fig = _figure(min(4.5 * n_cols + 1.0, 18.0), min(2.6 * n_rows + 1.0, 16.0))
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex="col")
    for col, (phase, phase_series) in enumerate(series.items()):
        spans = learning_spans(phases[phase])
        for row, (panel, names) in enumerate(panels.items()):
            ax = axes[row][col]
            _draw_panel(ax, phase_series, panel, names, spans)
            if col == 0:
                ax.set_ylabel(panel)
            if row == 0 and phase:
                ax.set_title(phase)
            if row == n_rows - 1:
                ax.set_xlabel("epoch")
    _shade_legend(fig, phases)
    if title is not None:
        fig.suptitle(title)
    return _save(fig, path)


__all__ = ["plot_coefficients", "plot_reconstructed", "plot_learning_curves"]


def plot_accuracy_cost(points: Sequence[Mapping[str, Any]], path: str | Path, *, reference_top1: float | None = None,
                       budget_points: float | None = None, chosen: int | None = None,
                       title: str | None = None) -> Path:
    """Validation top-1 (%) against the dense-MAC reduction (%) of a sequence of compression steps (``points``:
    dicts with ``dense_macs_reduction`` and ``val_top1`` as fractions, and ``step``), the reference (baseline)
    top-1 and the lowest top-1 the budget allows as lines, the ``chosen`` step ringed."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs = [100.0 * float(p["dense_macs_reduction"]) for p in points]
    ys = [100.0 * float(p["val_top1"]) for p in points]
    ax.plot(xs, ys, marker="o", color="tab:blue", label="step (validation)")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(str(p.get("step", "")), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if reference_top1 is not None:
        ax.axhline(100.0 * reference_top1, color="tab:gray", linestyle="--", label="baseline")
        if budget_points is not None:
            ax.axhline(100.0 * reference_top1 - budget_points, color="tab:red", linestyle=":", label="budget")
    if chosen is not None and 0 <= chosen < len(points):
        ax.scatter([xs[chosen]], [ys[chosen]], s=160, facecolors="none", edgecolors="tab:green", linewidths=2,
                   label="chosen", zorder=3)
    ax.set_xlabel("dense MACs removed (%)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)
