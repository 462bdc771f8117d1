"""The trade-off: validation top-1 against the chosen cost, its Pareto front, and the winner by the config's rule."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

#: sweep.objective -> (trial metric, label); every cost is lower-is-better
COSTS = {"dense_macs": ("dense_macs", "dense-executable MACs"), "sparse_macs": ("sparse_macs", "sparse MACs"),
         "latency": ("latency_ms", "measured latency (ms)")}
CSV_COLUMNS = ("run", "d", "l1", "prune_s", "channel_target", "val_top1", "dense_macs", "sparse_macs", "latency_ms",
               "test_top1", "dense_macs_reduction_pct", "sparse_macs_reduction_pct", "params_reduction_pct", "sparsity")


def cost_key(objective: str) -> str:
    return COSTS[objective][0]


def pareto_front(rows: Sequence[dict], cost: str) -> list[bool]:
    """For each row: True when no other row has a higher-or-equal val_top1 and a lower-or-equal ``cost``,
    one of them strictly better."""
    def dominates(a: dict, b: dict) -> bool:
        return (a["val_top1"] >= b["val_top1"] and a[cost] <= b[cost]
                and (a["val_top1"] > b["val_top1"] or a[cost] < b[cost]))

    return [not any(dominates(other, row) for other in rows if other is not row) for row in rows]


def select_winner(rows: Sequence[dict], sweep, baseline_val_top1: float) -> tuple[dict | None, str]:
    """The winner by ``sweep.select`` and the rule in words. fewest_macs_within: the lowest cost among trials
    at most ``max_top1_drop`` points under the baseline's val top-1; best_top1_under: the best val top-1 among
    trials whose cost is at most ``max_macs``. Ties go to the other criterion, then to the run name."""
    cost = cost_key(sweep.objective)
    if sweep.select == "fewest_macs_within":
        floor = baseline_val_top1 - sweep.max_top1_drop / 100.0
        rule = (f"fewest {COSTS[sweep.objective][1]} with val top-1 >= {100 * floor:.2f}% "
                f"(baseline {100 * baseline_val_top1:.2f}% - {sweep.max_top1_drop:g} points)")
        eligible = [r for r in rows if r["val_top1"] >= floor - 1e-12]
        key = lambda r: (r[cost], -r["val_top1"], r["run"])  # noqa: E731
    else:
        rule = f"best val top-1 with {COSTS[sweep.objective][1]} <= {sweep.max_macs:g}"
        eligible = [r for r in rows if r[cost] <= sweep.max_macs]
        key = lambda r: (-r["val_top1"], r[cost], r["run"])  # noqa: E731
    return (min(eligible, key=key) if eligible else None), rule


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """The rows with CSV_COLUMNS (absent values empty), sorted by run name."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r["run"]):
            writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})


def read_csv(path: Path) -> list[dict]:
    """Rows of ``write_csv`` with numbers as floats (the test reads the files back with this)."""
    with open(path, newline="") as f:
        return [{k: (v if k == "run" or v == "" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_front(path: Path, rows: Sequence[dict], front: Sequence[bool], winner: dict | None, objective: str,
               title: str) -> None:
    """PNG scatter of val top-1 against the cost: every trial, the Pareto points joined, the winner marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost = cost_key(objective)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ax.scatter([r[cost] for r in rows], [100 * r["val_top1"] for r in rows], color="0.6", label="trial", zorder=2)
    points = sorted((r for r, on in zip(rows, front) if on), key=lambda r: r[cost])
    ax.plot([r[cost] for r in points], [100 * r["val_top1"] for r in points], "o-", color="tab:blue",
            label="Pareto front", zorder=3)
    if winner is not None:
        ax.scatter([winner[cost]], [100 * winner["val_top1"]], marker="*", s=260, color="tab:red",
                   label=f"winner {winner['run']}", zorder=4)
    for r in rows:
        ax.annotate(r["run"].rsplit("-", 1)[-1], (r[cost], 100 * r["val_top1"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xlabel(COSTS[objective][1] + " (lower is better)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
