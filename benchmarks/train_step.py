"""Time one training step (forward + backward + SGD step) of ResNet50: dense vs PENNI-decomposed.

Variants (same architecture, same inputs, same optimizer):

* ``dense``        torchvision resnet50 with plain nn.Conv2d layers;
* ``reconstruct``  the same model after ``penni.decompose(d=5)`` in "reconstruct" mode (each step
                   rebuilds the k x k kernels from coefficients @ basis and runs one dense conv);
* ``factorized``   the decomposed model in "factorized" mode (a depthwise basis conv over
                   ``in_channels * d`` maps, then a 1x1 coefficient conv): not meant for training.

The variants are interleaved step by step (dense, reconstruct, factorized, dense, ...) so that
drift on a shared machine hits all of them alike; the table shows the median ms/step and the
ratio to dense. The numbers are printed, never asserted::

    python benchmarks/train_step.py                       # auto device, ResNet50 at 224x224
    python benchmarks/train_step.py --device cpu --image-size 160 --steps 8
    python benchmarks/train_step.py --device cuda --channels-last --amp bf16
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn

import penni
from penni.models import build_model

VARIANTS = ("dense", "reconstruct", "factorized")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--model", default="torchvision:resnet50", help="a penni.models.build_model name")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--d", type=int, default=5, help="basis kernels per layer")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    p.add_argument("--amp", choices=("off", "bf16"), default="off", help="bf16 autocast (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or not args.variants:
        p.error(f"--variants must be a subset of {VARIANTS}, got {args.variants}")
    if args.batch_size is None:
        args.batch_size = 64 if args.device.startswith("cuda") else 8
    if args.amp == "bf16" and not args.device.startswith("cuda"):
        p.error("--amp bf16 is for CUDA only")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(args, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(args.seed)
    dense = build_model(args.model, num_classes=args.num_classes)
    models = {}
    if "dense" in args.variants:
        models["dense"] = dense
    if {"reconstruct", "factorized"} & set(args.variants):
        decomposed = penni.decompose(copy.deepcopy(dense), d=args.d)
        for mode in ("reconstruct", "factorized"):
            if mode in args.variants:
                models[mode] = penni.set_forward_mode(copy.deepcopy(decomposed), mode)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for name, model in models.items():
        models[name] = model.to(device=device, memory_format=memory_format).train()
    return {v: models[v] for v in args.variants}


def make_step(model: nn.Module, args, device: torch.device):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    amp = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
           if args.amp == "bf16" else nullcontext())

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with amp:
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    models = build_variants(args, device)
    steps = {name: make_step(model, args, device) for name, model in models.items()}

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x, y = x.to(device=device, memory_format=memory_format), y.to(device)

    for _ in range(args.warmup):
        for step in steps.values():
            step(x, y)
    sync(device)

    on_cpu = device.type == "cpu"
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):          # interleaved: A B C A B C ...
        for name, step in steps.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step(x, y)
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
            cpu_times[name].append((time.process_time() - c0) * 1e3)

    medians = {name: statistics.median(t) for name, t in times.items()}
    base = "dense" in medians
    print(f"torch {torch.__version__} | device: {device} ({device_name(device)}) | model: {args.model}, "
          f"d={args.d} | batch {args.batch_size} x 3 x {args.image_size} x {args.image_size} | "
          f"amp {args.amp} | channels_last {args.channels_last} | {args.steps} timed steps "
          f"(interleaved) after {args.warmup} warm-up")
    print()

    def ratio(values: dict[str, float], name: str) -> str:
        return f"{values[name] / values['dense']:.3f}x" if base else "n/a"

    mins = {name: min(t) for name, t in times.items()}
    header = "| variant | median ms/step | min ms/step | max ms/step | median vs dense | min vs dense |"
    if on_cpu:
        cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
        header += " median CPU-time ms/step | CPU-time vs dense |"
    print(header)
    print("| --- |" + " ---: |" * (header.count("|") - 2))
    for name, t in times.items():
        row = (f"| {name} | {medians[name]:.1f} | {mins[name]:.1f} | {max(t):.1f} | "
               f"{ratio(medians, name)} | {ratio(mins, name)} |")
        if on_cpu:
            row += f" {cpu_medians[name]:.1f} | {ratio(cpu_medians, name)} |"
        print(row)
    if on_cpu:
        print("\n(CPU time = process time of all threads, robust to being descheduled on a shared machine, "
              "most telling with --threads 1; min vs dense is the other noise-resistant estimate)")
    return medians


if __name__ == "__main__":
    main()
