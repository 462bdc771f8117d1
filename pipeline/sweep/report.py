"""The sweep's outputs in its directory: trial table (CSV and Markdown), Pareto front (CSV and PNG)."""
from __future__ import annotations

from pathlib import Path

from .outcomes import Outcomes
from .pareto import COSTS, cost_key, pareto_front, plot_front, select_winner, write_csv
from .plan import SweepPlan


def decide(plan: SweepPlan, outcomes: Outcomes, baseline_val: float) -> tuple[list[bool], dict | None, str]:
    """The Pareto flags of the finished trials (sorted by run), the winner and the rule in words."""
    outcomes.finished.sort(key=lambda r: r["run"])
    front = pareto_front(outcomes.finished, cost_key(plan.sweep.objective))
    winner, rule = select_winner(outcomes.finished, plan.sweep, baseline_val)
    return front, winner, rule


def write_outputs(plan: SweepPlan, outcomes: Outcomes, front: list[bool], winner: dict | None, rule: str,
                  baseline_val: float) -> list[Path]:
    """trials.csv, pareto.csv, pareto.png and sweep.md in the sweep directory; returns their paths."""
    out = plan.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = outcomes.finished
    write_csv(out / "trials.csv", rows)
    write_csv(out / "pareto.csv", [r for r, on in zip(rows, front) if on])
    paths = [out / "trials.csv", out / "pareto.csv"]
    if rows:
        plot_front(out / "pareto.png", rows, front, winner, plan.sweep.objective,
                   f"sweep {plan.sweep_name}: val top-1 vs {COSTS[plan.sweep.objective][1]}")
        paths.append(out / "pareto.png")
    (out / "sweep.md").write_text(summary_markdown(plan, outcomes, front, winner, rule, baseline_val))
    return [*paths, out / "sweep.md"]


def _value_cells(row: dict) -> str:
    extra = "".join(f" {k}={row[k]:g}" for k in ("prune_s", "channel_target") if k in row)
    return f"{row['d']} | {row['l1']:g}{extra}"


def summary_markdown(plan: SweepPlan, outcomes: Outcomes, front: list[bool], winner: dict | None, rule: str,
                     baseline_val: float) -> str:
    """One row per trial: finished ones with their metrics (Pareto '*', winner 'W'), then stopped and failed."""
    cost = cost_key(plan.sweep.objective)
    lines = [f"# Sweep {plan.sweep_name}", "",
             f"Config: {plan.config_label}; base run {plan.base_cfg.name} (baseline val top-1 {100 * baseline_val:.2f}%); "
             f"{len(plan.trials)} trials; objective: val top-1 vs {COSTS[plan.sweep.objective][1]}.", "",
             f"| run | d | l1 | val top-1 % | {cost} | test top-1 % | dense MACs | sparse MACs | Pareto |",
             "|---|---:|---|---:|---:|---:|---:|---:|:---:|"]
    for row, on in zip(outcomes.finished, front):
        mark = ("*" if on else "") + (" W" if winner is not None and row["run"] == winner["run"] else "")
        lines.append(f"| {row['run']} | {_value_cells(row)} | {100 * row['val_top1']:.2f} | {row[cost]:.4g} | "
                     f"{100 * row['test_top1']:.2f} | -{row['dense_macs_reduction_pct']:.1f}% | "
                     f"-{row['sparse_macs_reduction_pct']:.1f}% | {mark.strip()} |")
    for row in outcomes.stopped:
        val = row.get("val_top1")
        text = f"stopped early (ASHA) after {row.get('epochs')} report(s), val top-1 " + \
            (f"{100 * val:.2f}%" if isinstance(val, (int, float)) else "n/a")
        lines.append(f"| {row['run']} | {_value_cells(row)} | {text} | | | | | |")
    for row in outcomes.failed:
        lines.append(f"| {row['run']} | {_value_cells(row)} | failed: {row['error']} | | | | | |")
    lines += ["", f"`*` Pareto-optimal: no other trial has a higher-or-equal validation top-1 and a lower-or-equal "
                  f"{cost}, one of them strictly better. `W` winner, by the rule: {rule}."
                  + ("" if winner else " No trial meets it."),
              "Trials are selected on the validation split; test top-1 is reported only. MAC columns are "
              "reductions vs the baseline."]
    return "\n".join(lines) + "\n"
