"""Inference latency of a compressed model's forms vs its dense baseline, per batch size.

Variants (eval mode, ``torch.inference_mode``):

* ``baseline``         the uncompressed model (plain nn.Conv2d layers);
* ``pruned-dense``     decomposed + pruned, not shrunk, PenniConv2d in "dense" mode (baked kernels);
* ``shrunk-dense``     decomposed + pruned + ``penni.shrink``, "dense" mode: smaller dense convs;
* ``shrunk-factorized``the shrunk model in "factorized" mode (depthwise basis conv + 1x1 mix).

No training is run: the decomposed model is pruned to ``--sparsity`` (global magnitude rule), and
``--dead-fraction`` of every decomposed layer's output channels are zeroed first to stand in for
the channels that L1 retraining kills, so that ``shrink`` has something to remove. The latency
depends only on the resulting shapes, not on the accuracy. The variants are interleaved per
repeat; the table shows the median ms per batch and the speed-up over the baseline::

    python benchmarks/inference_latency.py                      # CIFAR resnet18 at 32x32
    python benchmarks/inference_latency.py --model vgg16 --batch-sizes 1 8 64 --repeats 30
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import penni  # noqa: E402
from penni.models import build_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", help="a penni.models.build_model name")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--d", type=int, default=5)
    p.add_argument("--sparsity", type=float, default=0.8, help="global coefficient sparsity after pruning")
    p.add_argument("--dead-fraction", type=float, default=0.5,
                   help="fraction of each decomposed layer's output channels zeroed before pruning")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per variant and batch size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not 0.0 < args.sparsity < 1.0:
        p.error("--sparsity must be in (0, 1)")
    if not 0.0 <= args.dead_fraction < 1.0:
        p.error("--dead-fraction must be in [0, 1)")
    return args


def compress(model: nn.Module, args, example: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """(decomposed + pruned model, its shrunk copy), both in eval mode."""
    pruned = penni.decompose(copy.deepcopy(model), d=args.d).eval()
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for layer in penni.penni_layers(pruned).values():
            out = layer.out_channels
            dead = torch.randperm(out, generator=g)[: int(args.dead_fraction * out)]
            layer.coefficients[dead] = 0.0
    penni.prune(pruned, rule="sparsity", target=args.sparsity)
    small = penni.shrink(pruned, example)
    return pruned, small.eval()


def main(argv=None) -> dict[tuple[str, int], float]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    baseline = build_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels).eval()
    shape = (args.in_channels, args.image_size, args.image_size)
    pruned, small = compress(baseline, args, torch.randn(4, *shape))

    variants = {
        "baseline": baseline,
        "pruned-dense": penni.set_forward_mode(pruned, "dense"),
        "shrunk-dense": penni.set_forward_mode(copy.deepcopy(small), "dense"),
        "shrunk-factorized": penni.set_forward_mode(copy.deepcopy(small), "factorized"),
    }
    variants = {k: m.to(device).eval() for k, m in variants.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in variants.items()}

    check = torch.randn(2, *shape, device=device)
    with torch.inference_mode():
        ref = variants["pruned-dense"](check)
        drift = max((variants[k](check) - ref).abs().max().item() for k in ("shrunk-dense", "shrunk-factorized"))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    medians: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for bs in args.batch_sizes:
            x = torch.randn(bs, *shape, device=device)
            for _ in range(args.warmup):
                for m in variants.values():
                    m(x)
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.repeats):
                for name, m in variants.items():
                    sync()
                    t0 = time.perf_counter()
                    m(x)
                    sync()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            for name, t in times.items():
                medians[(name, bs)] = statistics.median(t)

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} | device: {device} ({dev}) | model: {args.model} at "
          f"{args.image_size}x{args.image_size}, d={args.d}, sparsity {args.sparsity}, "
          f"dead fraction {args.dead_fraction} | median of {args.repeats} interleaved forwards")
    print("params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items())
          + f" | max |shrunk - pruned| output difference: {drift:.2e}")
    print()
    names = list(variants)
    print("| batch | " + " | ".join(f"{n} ms" for n in names) + " | fastest |")
    print("| ---: | " + " | ".join("---:" for _ in names) + " | --- |")
    for bs in args.batch_sizes:
        base = medians[("baseline", bs)]
        cells = [f"{medians[(n, bs)]:.2f} ({base / medians[(n, bs)]:.2f}x)" for n in names]
        fastest = min(names, key=lambda n: medians[(n, bs)])
        print(f"| {bs} | " + " | ".join(cells) + f" | {fastest} |")
    print("\n(in parentheses: speed-up over baseline, >1 is faster)")
    return medians


if __name__ == "__main__":
    main()
