"""Channel pruning and exact shrink through the CNNs users bring: penni side by side with Torch-Pruning 1.6.

For every model of ``tests/penni/architectures.py`` (every torchvision classification CNN and 30+ timm families,
the smallest variant each, ``pretrained=False``, 10 classes, a 2x3x64x64 input unless the model needs more):

* penni: ``decompose``, ``prune_channels(model, 0.5, x)``, ``shrink``; dense MACs by ``FlopCounterMode`` on
  ``to_torch(shrunk)`` against the original (reached %), the shrunk output against the masked model's
  (relative error, exact below 1e-5), ``torch.export`` of ``to_torch(shrunk)``;
* Torch-Pruning: ``BasePruner`` with ``MagnitudeImportance(p=2)``, the classifier ignored, the pruning ratio
  bisected to the same -50% dense MACs; ``torch.export`` of the result.

Each (model, tool) runs in its own process under a time limit (``--limit``), so a model that hangs is a row with
a reason, not a stuck benchmark. Seconds are wall time of prune + shrink (penni) or of the whole bisection
(Torch-Pruning, several prunes)::

    PYTHONPATH=. python benchmarks/architecture_coverage.py --out benchmarks/results/architecture_coverage.md
    PYTHONPATH=. python benchmarks/architecture_coverage.py --only timm:ghostnet_050 --tools penni
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.penni.architectures import CASES, Outcome, run_penni, run_torch_pruning  # noqa: E402

TOOLS = {"penni": run_penni, "torch_pruning": run_torch_pruning}


def _child(case_id: str, tool: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "1")))
    case = next(c for c in CASES if c.id == case_id)
    outcome = TOOLS[tool](case)
    print("RESULT " + json.dumps(dataclasses.asdict(outcome)))


def _measure(case_id: str, tool: str, limit: float) -> Outcome:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", case_id, tool], capture_output=True, text=True,
                              timeout=limit, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return Outcome(seconds=time.perf_counter() - start, reason=f"did not finish in {limit:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            data = json.loads(line[len("RESULT "):])
            return Outcome(**data)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Outcome(seconds=time.perf_counter() - start, reason=f"crashed: {tail[:200]}")


def _fmt_reached(o: Outcome) -> str:
    return "-" if o.reached is None else f"{100 * o.reached:.1f}%"


def _fmt_exact(o: Outcome) -> str:
    if o.exact is None:
        return "-"
    return f"yes ({o.exact:.0e})" if o.exact < 1e-5 else f"NO ({o.exact:.0e})"


def _fmt_export(o: Outcome) -> str:
    return "-" if o.exported is None else ("yes" if o.exported else "no")


def _covered(o: Outcome, target: float = 0.5) -> bool:
    exact = o.exact is None or o.exact < 1e-5
    return o.reached is not None and abs(o.reached - target) <= 0.02 and exact and bool(o.exported)


def table(results: dict[str, dict[str, Outcome]], tools: list[str]) -> str:
    head = ["model"]
    for tool in tools:
        head += [f"{tool} reached", f"{tool} exact", f"{tool} export", f"{tool} s"] if tool == "penni" else \
                [f"{tool} reached", f"{tool} export", f"{tool} s"]
    head.append("reason")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case_id, row in results.items():
        cells = [f"`{case_id}`"]
        reasons = []
        for tool in tools:
            o = row[tool]
            cells += [_fmt_reached(o)] + ([_fmt_exact(o)] if tool == "penni" else []) + \
                     [_fmt_export(o), f"{o.seconds:.1f}"]
            if o.reason:
                reasons.append(f"{tool}: {o.reason}")
            elif not _covered(o):
                reasons.append(f"{tool}: reached {_fmt_reached(o)} of the -50% target")
        cells.append("; ".join(reasons).replace("|", "/") or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def counts(results: dict[str, dict[str, Outcome]], tools: list[str]) -> str:
    n = len(results)
    parts = []
    for tool in tools:
        ok = sum(_covered(row[tool]) for row in results.values())
        parts.append(f"**{tool}: {ok} of {n}**")
    line = ", ".join(parts) + " models pruned to -50% +- 2% dense MACs"
    if "penni" in tools:
        line += " (penni: shrink exact to 1e-5, both: the result exports with torch.export)"
    if set(tools) >= {"penni", "torch_pruning"}:
        only_tp = [c for c, row in results.items() if _covered(row["torch_pruning"]) and not _covered(row["penni"])]
        line += f". Torch-Pruning covers and penni does not: {', '.join(only_tp) or 'none'}."
    return line


def _reused(path: Path) -> dict[str, dict[str, dict]]:
    """Outcomes of an earlier run: the JSON this benchmark wrote, or its markdown table (Torch-Pruning's columns
    and reasons), so one tool can be re-measured without re-running the other."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    rows: dict[str, dict[str, dict]] = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) != 9:
            continue
        reasons = dict(part.split(": ", 1) for part in cells[8].split("; ") if ": " in part)
        tp_reason = reasons.get("torch_pruning")
        rows[cells[0].strip("`")] = {"torch_pruning": {
            "reached": None if cells[5] == "-" else float(cells[5].rstrip("%")) / 100,
            "exported": None if cells[6] == "-" else cells[6] == "yes", "seconds": float(cells[7]),
            "reason": None if tp_reason is None or tp_reason.startswith("reached ") else tp_reason}}
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--only", nargs="*", help="case ids (library:name) to run")
    parser.add_argument("--tools", nargs="*", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--limit", type=float, default=300.0, help="seconds per model and tool")
    parser.add_argument("--reuse", type=Path, help="a JSON or markdown file this benchmark wrote: take the tools "
                                                   "not run from it")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "TOOL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(*args.child)
    cases = [c for c in CASES if not args.only or c.id in args.only]
    reused = _reused(args.reuse) if args.reuse else {}
    tools = [t for t in TOOLS if t in args.tools or any(t in row for row in reused.values())]
    results: dict[str, dict[str, Outcome]] = {}
    for case in cases:
        results[case.id] = {tool: Outcome(**reused[case.id][tool]) if tool not in args.tools
                            else _measure(case.id, tool, args.limit) for tool in tools}
        row = results[case.id]
        print(case.id, "  ".join(f"{t}: {_fmt_reached(o)} {o.seconds:.1f}s {o.reason or ''}" for t, o in row.items()),
              flush=True)
    text = (f"# Architecture coverage: channel pruning to -50% dense MACs\n\n"
            f"{counts(results, tools)}\n\n{table(results, tools)}\n\n"
            f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} CPUs, one thread per model), "
            f"`PYTHONPATH=. python benchmarks/architecture_coverage.py --out {args.out or '...'}`. "
            "penni seconds: decompose + prune_channels + shrink; Torch-Pruning seconds: the whole ratio bisection."
            + (f" Columns of {', '.join(t for t in tools if t not in args.tools)} taken from an earlier run "
               f"(`--reuse {args.reuse.name}`)." if args.reuse and set(tools) - set(args.tools) else "") + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
        raw = {c: {t: dataclasses.asdict(o) for t, o in row.items()} for c, row in results.items()}
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
