"""Pruning to a measured speed-up: a CNN (random weights) pruned to a latency target on this CPU or a GPU.

Per runtime (eager PyTorch, ONNX Runtime's CPU provider) and batch size: ``penni.prune_channels(cost="latency",
target=penni.speedup_target(S))`` (latency table measured on this machine, widths multiples of 8, the shrunk model
timed and the selection continued while it misses the target), then the baseline, penni's shrunk model and
Torch-Pruning's magnitude-pruned model at the same dense MACs (uniform per-layer ratio, found by bisection, also
``round_to=8``) timed interleaved; medians over ``--repeats`` runs. Random weights: only latency is meaningful::

    python benchmarks/latency_target.py --batch-sizes 1 32 --out benchmarks/results/latency_target.md

On a GPU (eager PyTorch, bf16, channels-last; throughput = batch / median ms)::

    python benchmarks/latency_target.py --device cuda --dtype bfloat16 --channels-last --runtimes torch \
        --batch-sizes 256 --out benchmarks/results/latency_target_gpu.md
    python benchmarks/latency_target.py --model vgg16_fashion --device cuda --runtimes torch --batch-sizes 1 64 256

``--model vgg16_fashion`` is the reproduction's CIFAR-layout VGG16-BN at 1x32x32 (the structure
``workflows/reproduce.py`` trains; here with random weights, so only its latency is meaningful).
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
from penni.models.vgg import vgg16

#: model name -> (constructor, per-sample input shape, name of the classifier layer Torch-Pruning keeps)
MODELS = {
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), (3, 224, 224), "fc"),
    "vgg16_fashion": (lambda: vgg16(in_channels=1, num_classes=10), (1, 32, 32), "classifier"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tp_magnitude(model: nn.Module, x: torch.Tensor, dense_macs: float, keep: str, round_to: int) -> nn.Module:
    """Torch-Pruning's MagnitudePruner (L2, uniform ratio, same round_to) at the ratio whose dense MACs match."""
    import torch_pruning as tp

    def pruned(ratio: float) -> tuple[nn.Module, float]:
        m = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[getattr(m, keep)],
                                           round_to=round_to)
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


def placed(model: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """A copy of ``model`` and ``x`` on ``--device`` in ``--dtype`` (channels-last with ``--channels-last``)."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = copy.deepcopy(penni.to_torch(model)).to(args.device, DTYPES[args.dtype]).eval()
    return model.to(memory_format=fmt), x.to(args.device, DTYPES[args.dtype]).contiguous(memory_format=fmt)


def timed(models: list[nn.Module], x: torch.Tensor, runtime: str, args: argparse.Namespace) -> list[float]:
    """Median ms of each model, interleaved, in ``runtime``."""
    if runtime == "torch":
        pairs = [placed(m, x, args) for m in models]
        return time_forward([lambda m=m, y=y: m(y) for m, y in pairs], args.repeats, torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        paths = [penni.export_onnx(penni.to_torch(m), x, Path(tmp) / f"m{i}.onnx", dynamic_batch=False)
                 for i, m in enumerate(models)]
        return time_onnx_runtime(paths, x, args.repeats)


def case(runtime: str, batch: int, args: argparse.Namespace) -> list[dict]:
    """penni (latency target) and TP (same dense MACs) on a seeded model: one row, plus one per --also-time size."""
    torch.manual_seed(0)
    build, shape, keep = MODELS[args.model]
    base = build().eval()
    x = torch.randn(batch, *shape)
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    settings = LatencySettings(runtime=runtime, batch_sizes=(batch,), cache_dir=args.cache, repeats=args.table_repeats,
                               grid=tuple(args.grid), device=args.device, dtype=DTYPES[args.dtype],
                               channels_last=args.channels_last)
    report = penni.prune_channels(model, penni.speedup_target(args.speedup), x[:2], cost="latency", latency=settings)
    small = penni.shrink(model.cpu(), x[:2]).eval()
    prune_s = time.perf_counter() - t0
    macs = penni.profile(small, x[:1]).dense_macs
    tp_model = tp_magnitude(base, x[:1], macs, keep, settings.multiple)
    row = {"runtime": runtime, "batch": batch, "ms": timed([base, small, tp_model], x, runtime, args),
           "prune_s": prune_s, "rounds": report.latency["rounds"], "own_speedup": report.latency["speedup"][batch],
           "round_to": settings.multiple, "macs": [penni.profile(m, x[:1]).dense_macs for m in (base, small, tp_model)]}
    rows = [row]
    for other in args.also_time:  # the same three models at batch sizes they were not pruned for
        xo = torch.randn(other, *shape)
        rows.append({**row, "batch": f"{other} (pruned for {batch})", "ms": timed([base, small, tp_model], xo, runtime, args),
                     "batch_n": other, "own_speedup": float("nan")})
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, load: str) -> str:
    layout = f"{args.dtype}{', channels-last' if args.channels_last else ''}"
    lines = [f"# {args.model} pruned to a {args.speedup:.1f}x latency target (`benchmarks/latency_target.py`)", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {device_name(args.device)} "
             f"({layout}), torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
             f"{platform.python_version()}. Load average before the run: {load}. {args.note}", "",
             "| runtime | batch | baseline ms | penni ms | penni speed-up | TP magnitude ms | TP speed-up | "
             "penni images/s | dense MACs kept (penni / TP) | penni's own check | rounds | round_to | prune time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, p, t = r["ms"]
        lines.append(f"| {r['runtime']} | {r['batch']} | {b:.2f} | {p:.2f} | **{b / p:.2f}x** | {t:.2f} | "
                     f"{b / t:.2f}x | {r.get('batch_n', r['batch']) / p * 1e3:,.0f} | "
                     f"{r['macs'][1] / r['macs'][0]:.1%} / {r['macs'][2] / r['macs'][0]:.1%} | "
                     f"{r['own_speedup']:.2f}x | {r['rounds']} | {r['round_to']} | {r['prune_s']:.0f} s |")
    grid = ", ".join(f"{g:g}" for g in args.grid)
    lines += ["", f"Medians of {args.repeats} interleaved runs per model. \"penni's own check\" is the speed-up "
              f"`prune_channels` measured on the shrunk model while selecting (fastest of {args.table_repeats} runs). "
              f"Latency table grid: fractions {grid} of each width. "
              "TP: Torch-Pruning's MagnitudePruner (L2, uniform per-layer ratio, the same round_to, classifier kept) at the ratio "
              "whose dense MACs match penni's model. Random weights: latency only."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (ONNX Runtime rows always run on the CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--also-time", nargs="*", type=int, default=[],
                        help="batch sizes at which the models pruned for each --batch-sizes row are also timed")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table-repeats", type=int, default=5, help="runs per latency-table point (fastest kept)")
    parser.add_argument("--grid", nargs="+", type=float, default=list(DEFAULT_GRID))
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "penni_latency_tables"))
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device != "cpu" and "onnxruntime" in args.runtimes:
        parser.error("ONNX Runtime is timed on its CPU provider: use --runtimes torch with --device cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = []
    for batch in args.batch_sizes:
        for runtime in args.runtimes:
            rows.extend(case(runtime, batch, args))
            print(markdown(rows, args, load), flush=True)
            if args.out:  # after every row, so a time-boxed run keeps the rows that finished
                Path(args.out).write_text(markdown(rows, args, load))


if __name__ == "__main__":
    main()
