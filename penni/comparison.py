"""Before/after comparisons of two profiles: the reductions and the side-by-side table of the PENNI appendix."""
from __future__ import annotations

from typing import Iterable, Sequence

from .profiling import LayerRow, Number, Profile, human, md_row, pct_zero


def macs_reduction(before: Profile, after: Profile) -> dict[str, float]:
    """Percentage reductions ``100 * (1 - after / before)`` of params, non-zero params and MACs.

    Keys: ``params``, ``nonzero_params``, ``sparse_macs``, ``dense_macs``; also
    ``sparse_vs_dense_before``: the sparse MACs of ``after`` against the dense MACs of ``before``
    (the paper's headline FLOP reduction of the compressed model against the baseline).
    """
    def red(b: Number, a: Number) -> float:
        return 100.0 * (1.0 - a / b) if b else 0.0

    return {
        "params": red(before.params, after.params),
        "nonzero_params": red(before.nonzero_params, after.nonzero_params),
        "sparse_macs": red(before.sparse_macs, after.sparse_macs),
        "dense_macs": red(before.dense_macs, after.dense_macs),
        "sparse_vs_dense_before": red(before.dense_macs, after.sparse_macs),
    }


def compare(before: Profile, after: Profile, kinds: Iterable[str] | None = None) -> str:
    """Markdown table in the layout of the paper's Table 1, before and after shrinking side by side.

    Columns: Name | Size | Width | Basis | Coefficients (non-zero/total) | Sparsity % for the
    ``before`` profile, then the same four for ``after``. Layers are matched by name; a layer
    missing on one side shows "-". A Total row sums each side; a summary of params and MACs with
    their reductions follows. ``kinds`` restricts the rows (``CONV_KINDS`` gives the paper's
    conv-only table).
    """
    left = {r.name: r for r in before.select(kinds)}
    right = {r.name: r for r in after.select(kinds)}
    names = list(left) + [n for n in right if n not in left]
    side = ["Width", "Basis", "Coefficients (non-zero/total)", "Sparsity %"]
    # markdown has a single header row: the first column of each half names the half
    header = ["Name", "Size", f"Before shrinking: {side[0]}", *side[1:], f"After shrinking: {side[0]}", *side[1:]]
    lines = [md_row(header), md_row(["---"] * len(header))]

    def cells(r: LayerRow | None) -> list[str]:
        if r is None:
            return ["-"] * 4
        return [str(r.width), r.basis_str, r.coefficients_str, f"{r.sparsity:.2f}"]

    for n in names:
        a, b = left.get(n), right.get(n)
        size = (a or b).size  # type: ignore[union-attr]
        lines.append(md_row([n, size] + cells(a) + cells(b)))

    def total(rows: Sequence[LayerRow]) -> list[str]:
        nz, tot = sum(r.nonzero for r in rows), sum(r.total for r in rows)
        return ["", "", f"{nz}/{tot}", f"{pct_zero(nz, tot):.2f}"]

    lines.append(md_row(["**Total**", ""] + total(list(left.values())) + total(list(right.values()))))
    red = macs_reduction(before, after)
    lines += [
        "",
        f"Parameters: {human(before.params)} -> {human(after.params)} ({red['params']:.2f}% fewer); "
        f"non-zero: {human(before.nonzero_params)} -> {human(after.nonzero_params)} "
        f"({red['nonzero_params']:.2f}% fewer)",
        f"MACs per image (sparse): {human(before.sparse_macs)} -> {human(after.sparse_macs)} "
        f"({red['sparse_macs']:.2f}% fewer)",
        f"MACs per image (dense): {human(before.dense_macs)} -> {human(after.dense_macs)} "
        f"({red['dense_macs']:.2f}% fewer)",
    ]
    return "\n".join(lines) + "\n"
