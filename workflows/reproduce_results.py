"""Result files of ``reproduce.py`` (JSON + Markdown per scale) and ``docs/results.md`` generated from them.

Never typed by hand: ``python workflows/reproduce.py --write-docs`` rebuilds ``docs/results.md`` from
``benchmarks/results/reproduce_<scale>/results.json`` (GPU scale first, where it exists).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = (("baseline", "baseline (dense)"), ("penni", "PENNI"),
        ("penni_distill", "PENNI, fine-tuned with distillation"), ("penni_channels", "PENNI channel rule, same dense MACs"),
        ("torch_pruning", "Torch-Pruning magnitude, same dense MACs"))
SCALE_ORDER = ("gpu", "cpu", "tiny")
PICTURES = ("coefficients.png", "learning_curves.png", "reconstructed_weights.png")


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * (1.0 - part / whole):.1f}"


def table_markdown(table: dict[str, dict], batch_sizes: list[int]) -> str:
    """One row per model: test top-1, its change, parameters, sparse/dense MACs (and their reductions), latency."""
    base = table["baseline"]
    header = ["model", "test top-1 %", "vs baseline (pt)", "parameters", "non-zero parameters", "sparse MACs",
              "sparse MACs removed %", "dense MACs", "dense MACs removed %"]
    header += [f"latency ms, batch {bs}" for bs in batch_sizes]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for key, label in ROWS:
        if key not in table:
            continue
        r = table[key]
        cells = [label, f"{100 * r['test_top1']:.2f}", f"{100 * (r['test_top1'] - base['test_top1']):+.2f}",
                 f"{r['params']:,}", f"{r['nonzero_params']:,}", f"{r['sparse_macs']:,.0f}",
                 _pct(r["sparse_macs"], base["dense_macs"]), f"{r['dense_macs']:,.0f}",
                 _pct(r["dense_macs"], base["dense_macs"])]
        cells += [f"{r[f'latency_ms_bs{bs}']:.2f}" for bs in batch_sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets_markdown(scale: str, table: dict[str, dict]) -> str:
    """The issue's targets against what was reached (and what limits a missed one)."""
    b, p, tp = table["baseline"], table["penni"], table["torch_pruning"]
    drop = 100 * (b["test_top1"] - p["test_top1"])
    sparse = 100 * (1 - p["sparse_macs"] / b["dense_macs"])
    nonzero = 100 * (1 - p["nonzero_params"] / b["nonzero_params"])
    checks = []
    if scale == "gpu":
        checks += [("baseline top-1 >= 94.0%", f"{100 * b['test_top1']:.2f}%", b["test_top1"] >= 0.94),
                   ("non-zero parameters -97%", f"-{nonzero:.1f}%", nonzero >= 97),
                   ("sparse MACs -92%", f"-{sparse:.1f}%", sparse >= 92),
                   ("top-1 at most 0.3 pt below baseline", f"{-drop:+.2f} pt", drop <= 0.3)]
    else:
        dense = 100 * (1 - p["dense_macs"] / b["dense_macs"])
        checks += [("dense MACs -75% (reduced run)", f"-{dense:.1f}%", dense >= 74.95),
                   ("sparse MACs -85% (reduced run)", f"-{sparse:.1f}%", sparse >= 85),
                   ("top-1 at most 0.5 pt below baseline (reduced run)", f"{-drop:+.2f} pt", drop <= 0.5)]
    checks.append(("PENNI's top-1 not below Torch-Pruning's at equal dense MACs",
                   f"{100 * p['test_top1']:.2f}% vs {100 * tp['test_top1']:.2f}%", p["test_top1"] >= tp["test_top1"]))
    lines = ["| target | reached | met |", "|---|---:|:---:|"]
    lines += [f"| {what} | {got} | {'yes' if ok else 'NO'} |" for what, got, ok in checks]
    return "\n".join(lines) + "\n"


def seed_table1_markdown() -> str:
    """The seed appendix's Table 1 (VGG16-CIFAR10 after shrinking), from benchmarks/seed_structures.py."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from seed_structures import VGG16_TABLE1_TOTALS, vgg16_table1

    lines = ["| Name | Size | Width | Basis | Coefficients (non-zero/total) | Sparsity % |", "|---|---|---:|---:|---:|---:|"]
    for s in vgg16_table1():
        lines.append(f"| {s.table_name} | {s.kernel} | {s.width} | {s.basis} | {s.nonzero}/{s.total} | "
                     f"{100 * (1 - s.nonzero / s.total):.2f} |")
    nz, tot = VGG16_TABLE1_TOTALS
    lines.append(f"| **Total** | | | | {nz}/{tot} | {100 * (1 - nz / tot):.2f} |")
    return "\n".join(lines) + "\n"


def _machine_line(m: dict[str, Any], device: str) -> str:
    where = m.get("gpu") if device == "cuda" else f"{m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads)"
    load = f"; load average at the end {m['load_average'][0]:.1f}" if m.get("load_average") else ""
    return f"{where}; torch {m['torch']}, Python {m['python']}; {m['date']}{load}"


def scale_markdown(results: dict[str, Any], pictures_prefix: str, seed_table: bool = False) -> str:
    """The Markdown of one scale's results (also a section of docs/results.md)."""
    scale = results["scale"]
    out = [f"## Scale `{scale}`\n", f"{results['note']}.\n",
           f"- command: `{results['command']}`",
           f"- machine: {_machine_line(results['machine'], results['device'])}",
           f"- wall time: {results['wall_seconds'] / 60:.1f} min\n"]
    missing = [m for m in _scale_models(scale) if m not in results["models"]]
    if missing:
        out.append(f"**Not in these results**: {', '.join(missing)} (the scale's other models; see the notes "
                   "below).\n")
    for model, run in results["models"].items():
        cfg, table = run["config"], run["table"]
        out += [f"### {model}\n", table_markdown(table, cfg["evaluate"]["latency_batch_sizes"]),
                f"Latency: median of {cfg['evaluate']['latency_repeats']} interleaved runs on {results['device']} "
                "(PENNI models in their fastest form per batch size). Torch-Pruning: pruning ratio "
                f"{run['torch_pruning']['pruning_ratio']:.3f}, round_to {run['torch_pruning']['round_to']}, dense MACs "
                f"{run['torch_pruning']['dense_macs_gap_pct']:+.2f}% from ours. Every model fine-tuned "
                f"{cfg['finetune']['epochs']} epochs (SGD lr {cfg['finetune']['lr']:g}, {cfg['finetune']['lr_schedule']}); "
                "checkpoints picked on the validation split, the test split only reported.\n",
                "Targets:\n", targets_markdown(scale, table)]
        structure = run.get("structure_md")
        if structure:
            out += ["Per-layer structure of the PENNI model (the seed's Table 1 format):\n", structure]
            if seed_table and model == "vgg16":
                out += ["Next to it, the seed's own Table 1 (VGG16 on CIFAR-10, after shrinking; from "
                        "`benchmarks/seed_structures.py`, the before-shrinking columns are in the seed appendix):\n",
                        seed_table1_markdown()]
        for name in PICTURES:
            if name in run.get("pictures", []):
                out.append(f"![{model} {name[:-4].replace('_', ' ')}]({pictures_prefix}{model}_{name})\n")
    return "\n".join(out)


def write_results(results: dict[str, Any], out: Path) -> None:
    """``results.json``, ``results.md`` and the pictures/structure of each model's report stage into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for model, run in results["models"].items():
        report = Path(run["work_dir"]) / "report"
        run["pictures"] = []
        for name in PICTURES if not results.get("seed") else ():  # another seed: numbers only (docs show seed 0's)
            if (report / name).exists():
                shutil.copy2(report / name, out / f"{model}_{name}")
                run["pictures"].append(name)
        structure = report / "structure.md"
        run["structure_md"] = structure.read_text() if structure.exists() else ""
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=float))
    (out / "results.md").write_text(f"# PENNI reproduction, scale {results['scale']}\n\n" + scale_markdown(results, ""))


def _scale_models(scale: str) -> tuple[str, ...]:
    """The models a full run of ``scale`` covers (``reproduce.SCALES``)."""
    from reproduce import SCALES

    return SCALES[scale].models if scale in SCALES else ()


def write_docs(results_dir: Path, docs_path: Path) -> Path:
    """docs/results.md from every ``reproduce_<scale>/results.json`` under ``results_dir`` (tiny left out
    unless it is the only one)."""
    found = {s: results_dir / f"reproduce_{s}" / "results.json" for s in SCALE_ORDER}
    found = {s: p for s, p in found.items() if p.exists()}
    if not found:
        raise SystemExit(f"error: no reproduce_<scale>/results.json under {results_dir}; run "
                         "python workflows/reproduce.py --scale cpu first")
    if len(found) > 1:
        found.pop("tiny", None)
    parts = ["# Results\n", "Generated by `python workflows/reproduce.py --write-docs` from "
             f"{', '.join(f'`{_rel(p)}`' for p in found.values())}; do not edit by hand.\n",
             "PENNI's schedule (baseline, decompose, retrain with alternation and L1, prune, fine-tune, shrink) on "
             "Fashion-MNIST at 32x32, against Torch-Pruning's magnitude channel pruning from the same baseline at the "
             "same dense-executable MACs.\n"]
    if list(found) == ["tiny"]:
        parts.append("**Only the tiny smoke test has result files so far; its numbers mean nothing.** The reduced CPU "
                     "reproduction is `python workflows/reproduce.py --scale cpu`, the full one `python "
                     "workflows/reproduce.py --scale gpu --device cuda`; then regenerate this page.\n")
    if "gpu" not in found:
        parts.append("**The full-size (GPU) reproduction has no result files yet** (no GPU was lent when this page was "
                     "made). It is one command on one GPU: fetch the wheels the lent GPU machines lack with "
                     "`bash benchmarks/gpu_wheels.sh`, carry `.gpu-wheels/` there, and run `source "
                     "benchmarks/ensure_gpu_deps.sh && python workflows/reproduce.py --scale gpu --device cuda && "
                     "python workflows/reproduce.py --write-docs` (about 8 minutes of one H200 by the issue's "
                     "throughput figures; not measured).\n")
    for i, (scale, path) in enumerate(found.items()):
        results = json.loads(path.read_text())
        parts.append(scale_markdown(results, _relative_prefix(docs_path, path.parent), seed_table=i == 0))
        others = sorted(results_dir.glob(f"reproduce_{scale}_seed*/results.json"))
        if others:
            parts.append(seeds_markdown([results] + [json.loads(o.read_text()) for o in others]))
        notes = path.parent / "NOTES.md"  # how the run was made, where the results file cannot say (no numbers)
        if notes.exists():
            parts.append(notes.read_text())
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text("\n".join(parts))
    return docs_path


def seeds_markdown(runs: list[dict[str, Any]]) -> str:
    """One scale's runs with different ``--seed``s side by side: test top-1 and dense MACs of PENNI and TP."""
    lines = [f"### Seeds (scale `{runs[0]['scale']}`)\n",
             "Every seed is the whole schedule again (initial weights, subsets, data order); the section above is seed "
             f"{runs[0].get('seed', 0)}.\n",
             "| seed | model | baseline top-1 % | PENNI top-1 % (pt) | PENNI dense MACs removed % | "
             "TP top-1 % (pt) | TP dense MACs removed % | wall time |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for model, entry in run["models"].items():
            t = entry["table"]
            base, pen, tp = t["baseline"], t["penni"], t["torch_pruning"]

            def cell(row: dict) -> str:
                return (f"{100 * row['test_top1']:.2f} ({100 * (row['test_top1'] - base['test_top1']):+.2f}) | "
                        f"{100 * (1 - row['dense_macs'] / base['dense_macs']):.1f}")

            lines.append(f"| {run.get('seed', 0)} | {model} | {100 * base['test_top1']:.2f} | {cell(pen)} | "
                         f"{cell(tp)} | {run['wall_seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _relative_prefix(docs_path: Path, results_dir: Path) -> str:
    import os

    return os.path.relpath(results_dir.resolve(), docs_path.resolve().parent) + "/"
