"""Pruning to a measured speed-up: torchvision ResNet50 (random weights) pruned to a latency target on this CPU.

Per runtime (eager PyTorch, ONNX Runtime's CPU provider) and batch size: ``penni.prune_channels(cost="latency",
target=penni.speedup_target(S))`` (latency table measured on this machine, widths multiples of 8, the shrunk model
timed and the selection continued while it misses the target), then the baseline, penni's shrunk model and
Torch-Pruning's magnitude-pruned model at the same dense MACs (uniform per-layer ratio, found by bisection, also
``round_to=8``) timed interleaved; medians over ``--repeats`` runs. Random weights: only latency is meaningful::

    python benchmarks/latency_target.py --batch-sizes 1 32 --out benchmarks/results/latency_target.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import penni
from penni.inference import time_forward, time_onnx_runtime
from penni.latency import DEFAULT_GRID, LatencySettings, device_name


def tp_magnitude(model: nn.Module, x: torch.Tensor, dense_macs: float) -> nn.Module:
    """Torch-Pruning's MagnitudePruner (L2, uniform ratio, round_to=8) at the ratio whose dense MACs match."""
    import torch_pruning as tp

    def pruned(ratio: float) -> tuple[nn.Module, float]:
        m = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[m.fc], round_to=8)
        pruner.step()
        return m, float(tp.utils.count_ops_and_params(m, x)[0])

    lo, hi, best = 0.0, 0.9, None
    for _ in range(9):
        mid = (lo + hi) / 2
        m, macs = pruned(mid)
        if best is None or abs(macs - dense_macs) < abs(best[1] - dense_macs):
            best = (m, macs)
        lo, hi = (mid, hi) if macs > dense_macs else (lo, mid)
    return best[0].eval()


def timed(models: list[nn.Module], x: torch.Tensor, runtime: str, repeats: int) -> list[float]:
    """Median ms of each model, interleaved, in ``runtime``."""
    if runtime == "torch":
        return time_forward([lambda m=m: m(x) for m in models], repeats, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = [penni.export_onnx(penni.to_torch(m), x, Path(tmp) / f"m{i}.onnx", dynamic_batch=False)
                 for i, m in enumerate(models)]
        return time_onnx_runtime(paths, x, repeats)


def case(runtime: str, batch: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    base = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    settings = LatencySettings(runtime=runtime, batch_sizes=(batch,), cache_dir=args.cache, repeats=args.table_repeats,
                               grid=tuple(args.grid))
    report = penni.prune_channels(model, penni.speedup_target(args.speedup), x[:2], cost="latency", latency=settings)
    small = penni.shrink(model, x[:2]).eval()
    prune_s = time.perf_counter() - t0
    macs = penni.profile(small, x[:1]).dense_macs
    tp_model = tp_magnitude(base, x[:1], macs)
    ms = timed([base, small, tp_model], x, runtime, args.repeats)
    return {"runtime": runtime, "batch": batch, "ms": ms, "prune_s": prune_s, "rounds": report.latency["rounds"],
            "own_speedup": report.latency["speedup"][batch],
            "macs": [penni.profile(m, x[:1]).dense_macs for m in (base, small, tp_model)]}


def markdown(rows: list[dict], args: argparse.Namespace, load: str) -> str:
    lines = [f"# ResNet50 pruned to a {args.speedup:.1f}x latency target (`benchmarks/latency_target.py`)", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {device_name('cpu')}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.python_version()}. "
             f"Load average before the run: {load}. {args.note}", "",
             "| runtime | batch | baseline ms | penni ms | penni speed-up | TP magnitude ms | TP speed-up | "
             "dense MACs kept (penni / TP) | penni's own check | rounds | prune time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, p, t = r["ms"]
        lines.append(f"| {r['runtime']} | {r['batch']} | {b:.2f} | {p:.2f} | **{b / p:.2f}x** | {t:.2f} | "
                     f"{b / t:.2f}x | {r['macs'][1] / r['macs'][0]:.1%} / {r['macs'][2] / r['macs'][0]:.1%} | "
                     f"{r['own_speedup']:.2f}x | {r['rounds']} | {r['prune_s']:.0f} s |")
    grid = ", ".join(f"{g:g}" for g in args.grid)
    lines += ["", f"Medians of {args.repeats} interleaved runs per model. \"penni's own check\" is the speed-up "
              f"`prune_channels` measured on the shrunk model while selecting (fastest of {args.table_repeats} runs). "
              f"Latency table grid: fractions {grid} of each width. "
              "TP: Torch-Pruning's MagnitudePruner (L2, uniform per-layer ratio, round_to=8, fc kept) at the ratio "
              "whose dense MACs match penni's model. Random weights: latency only."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table-repeats", type=int, default=5, help="runs per latency-table point (fastest kept)")
    parser.add_argument("--grid", nargs="+", type=float, default=list(DEFAULT_GRID))
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "penni_latency_tables"))
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = []
    for batch in args.batch_sizes:
        for runtime in args.runtimes:
            rows.append(case(runtime, batch, args))
            print(markdown(rows, args, load), flush=True)
    if args.out:
        Path(args.out).write_text(markdown(rows, args, load))


if __name__ == "__main__":
    main()
