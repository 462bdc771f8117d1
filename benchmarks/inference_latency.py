"""Inference latency of the seed's compressed models against their dense originals, per form and batch.

Model pairs (``--cases``; structures in ``benchmarks/seed_structures.py``):

* ``vgg16``      the seed's Table 1 VGG16-CIFAR10 after shrinking vs the dense CIFAR VGG16-BN, 32x32;
* ``resnet50``   the seed's Table 2 ResNet50-R1 after shrinking (reconstructed where the scan is
                 unreadable) vs the dense torchvision resnet50, 224x224;
* ``quickstart`` the quickstart's fashion_cnn: ``--quickstart-run DIR`` loads the pipeline's
                 ``DIR/baseline/model.safetensors`` and ``DIR/shrink/model.safetensors``; without
                 it a synthetic compressed copy (decompose, dead channels, 80% sparsity, shrink).

Forms, each timed as a whole model in eval mode under ``torch.inference_mode``:

* ``dense``          the original model (reference of the torch forms);
* ``shrunk-dense``   the compressed model, every PenniConv2d a baked dense conv;
* ``per-layer``      the compressed model after ``penni.optimize_for_inference`` at that batch
                     size (all-factorized where penni has no ``optimize_for_inference``);
* ``ort-dense`` / ``ort-compressed``  ONNX Runtime (CPU provider) on the original and on
                     ``penni.to_torch(compressed)``, exported by ``torch.onnx.export`` (skipped with a
                     note when onnx/onnxruntime/``penni.to_torch`` are missing or on a GPU run).

Both sides get the same treatment: same threads (all cores unless ``--threads``), same warm-up,
the same number of timed runs, interleaved in a rotating order so machine noise hits every form;
the median is reported. On CUDA each run is timed with CUDA events, float32 at every batch size plus
bfloat16 at ``--bf16-batch``; ``--graph compile|cudagraphs`` applies ``torch.compile`` or CUDA graph
capture to every form, or to none (``--graph none``). Speed-up = reference median / form median
(>1: the compressed model is faster)::

    python benchmarks/inference_latency.py --out benchmarks/results/inference_latency_cpu
    python benchmarks/inference_latency.py --cases quickstart --quick --out /tmp/quick
    python benchmarks/inference_latency.py --device cuda --graph cudagraphs --out $OUT/inference_latency_gpu
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import seed_structures
import torch
from torch import nn

import penni
from penni.models import build_model

CASES = ("vgg16", "resnet50", "quickstart")
TORCH_FORMS = ("dense", "shrunk-dense", "per-layer")
ORT_FORMS = ("ort-dense", "ort-compressed")
REFERENCE = {"dense": None, "shrunk-dense": "dense", "per-layer": "dense",
             "ort-dense": None, "ort-compressed": "ort-dense"}
TARGETS = (  # (case, batch, dtype, minimum speed-up): the speed-ups the inference forms promise
    ("vgg16", 1, "float32", 3.0), ("vgg16", 32, "float32", 2.0), ("resnet50", 1, "float32", 1.5),
    ("resnet50", 256, "bfloat16", 1.5),
)


@dataclass
class Pair:
    """A dense original and its compressed model, with the input they are timed on."""

    case: str
    description: str
    baseline: nn.Module
    compressed: nn.Module
    input_shape: tuple[int, ...]          # one sample
    batch_sizes: list[int]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="override the per-case batch sizes (vgg16/quickstart 1 32 256; resnet50 1 32 on CPU)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per form and batch size (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per form before timing")
    p.add_argument("--optimize-repeats", type=int, default=10,
                   help="repeats that penni.optimize_for_inference times each layer's forms with")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 3 repeats, 1 warm-up, batch sizes 1 and 2 (resnet50: 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ORT (default: all cores)")
    p.add_argument("--graph", choices=("none", "compile", "cudagraphs"), default="none",
                   help="CUDA only: torch.compile or CUDA graphs for every form, or for none")
    p.add_argument("--channels-last", action="store_true",
                   help="run every form (models and inputs) in the channels_last memory format")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="CUDA only: leave torch.backends.cudnn.benchmark off (default on, for every form)")
    p.add_argument("--bf16-batch", type=int, default=256, help="CUDA only: the batch size also timed in bfloat16")
    p.add_argument("--per-layer", choices=("optimize", "factorized"), default="optimize",
                   help="the per-layer form: penni.optimize_for_inference (default) or every layer factorized")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime forms")
    p.add_argument("--quickstart-run", type=Path, default=None,
                   help="a pipeline run directory holding baseline/ and shrink/model.safetensors")
    p.add_argument("--quickstart-image-size", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="output path stem: writes STEM.json and STEM.md (e.g. benchmarks/results/inference_latency_cpu)")
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values before anything is built or written."""
    if args.quick:
        args.repeats, args.warmup, args.optimize_repeats = min(args.repeats, 3), min(args.warmup, 1), 2
        args.bf16_batch = min(args.bf16_batch, 2)
    for name in ("repeats", "optimize_repeats", "bf16_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--warmup must be >= 0 and --threads >= 1")
    if args.batch_sizes and min(args.batch_sizes) < 1:
        p.error("--batch-sizes must all be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.graph != "none" and args.device == "cpu":
        p.error("--graph compile|cudagraphs is for --device cuda; CPU runs are eager")
    if args.quickstart_run is not None:
        for stage in ("baseline", "shrink"):
            f = args.quickstart_run / stage / "model.safetensors"
            if not f.is_file():
                p.error(f"--quickstart-run: {f} does not exist (give a pipeline run directory with "
                        "baseline/ and shrink/ stage outputs)")
    if args.out is not None:
        if args.out.suffix in (".json", ".md"):
            args.out = args.out.with_suffix("")
        if args.out.is_dir():
            p.error(f"--out {args.out} is a directory; give a path stem like {args.out}/inference_latency_cpu")


# ----------------------------------------------------------------------------------- models
def _batches(case: str, args: argparse.Namespace) -> list[int]:
    if args.batch_sizes:
        return list(args.batch_sizes)
    if args.quick:
        return [1] if case == "resnet50" else [1, 2]
    if case == "resnet50" and args.device == "cpu":
        return [1, 32]
    return [1, 32, 256]


def vgg16_pair(args: argparse.Namespace) -> Pair:
    torch.manual_seed(args.seed)
    return Pair("vgg16", "seed Table 1 VGG16-CIFAR10 after shrinking vs dense CIFAR VGG16-BN",
                build_model("vgg16").eval(), seed_structures.build_vgg16_table1(args.seed), (3, 32, 32),
                _batches("vgg16", args))


def resnet50_pair(args: argparse.Namespace) -> Pair:
    torch.manual_seed(args.seed)
    notes = [f"{s.table_name}: {s.note}" for s in seed_structures.resnet50_table2() if s.note]
    return Pair("resnet50", "seed Table 2 ResNet50-R1 after shrinking (reconstructed) vs dense torchvision resnet50",
                build_model("torchvision:resnet50", num_classes=1000).eval(),
                seed_structures.build_resnet50_table2(args.seed), (3, 224, 224), _batches("resnet50", args), notes)


def _first_in_channels(model: nn.Module) -> int:
    return next(m.in_channels for m in model.modules() if isinstance(m, (nn.Conv2d, penni.PenniConv2d)))


def quickstart_pair(args: argparse.Namespace) -> Pair:
    size = args.quickstart_image_size
    if args.quickstart_run is not None:
        base = penni.load(args.quickstart_run / "baseline" / "model.safetensors").eval()
        small = penni.load(args.quickstart_run / "shrink" / "model.safetensors").eval()
        penni.bake_masks(small)
        what = f"quickstart pipeline run {args.quickstart_run}: shrink stage vs baseline stage"
        notes: list[str] = []
    else:
        base, small = _synthetic_quickstart(args.seed, size)
        what = "synthetic fashion_cnn compression (decompose d=5, 25% dead channels, 80% sparsity, shrink) vs fashion_cnn"
        notes = ["no --quickstart-run given: the compressed model is synthetic, not the pipeline's"]
    shape = (_first_in_channels(base), size, size)
    return Pair("quickstart", what, base, penni.set_forward_mode(small, "dense"), shape,
                _batches("quickstart", args), notes)


def _synthetic_quickstart(seed: int, size: int) -> tuple[nn.Module, nn.Module]:
    """fashion_cnn and a compressed copy: 25% of each layer's channels dead, 80% sparsity, shrunk."""
    torch.manual_seed(seed)
    base = build_model("fashion_cnn", in_channels=1).eval()
    model = penni.decompose(copy.deepcopy(base), d=5).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in penni.penni_layers(model).values():
            dead = torch.randperm(layer.out_channels, generator=g)[: layer.out_channels // 4]
            layer.coefficients[dead] = 0.0
    penni.prune(model, rule="sparsity", target=0.8)
    return base, penni.shrink(model, torch.randn(4, 1, size, size)).eval()


PAIR_BUILDERS: dict[str, Callable[[argparse.Namespace], Pair]] = {
    "vgg16": vgg16_pair, "resnet50": resnet50_pair, "quickstart": quickstart_pair,
}


def structure(model: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    """Parameters and MACs per image (penni.profile) of one model."""
    prof = penni.profile(model, torch.randn(1, *shape))
    return {"params": prof.params, "nonzero_params": prof.nonzero_params,
            "dense_macs": prof.dense_macs, "sparse_macs": prof.sparse_macs}


# ----------------------------------------------------------------------------------- forms
def per_layer_form(compressed: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The compressed model with penni's per-layer choice at this batch size (and a note on it)."""
    model = copy.deepcopy(compressed)
    optimize = getattr(penni, "optimize_for_inference", None)
    if args.per_layer == "factorized":
        return penni.set_forward_mode(model, "factorized"), "--per-layer factorized: every layer factorized"
    if optimize is None:
        return penni.set_forward_mode(model, "factorized"), "penni.optimize_for_inference missing: all-factorized"
    plan = optimize(model, x, device=x.device, repeats=args.optimize_repeats)
    modes = getattr(plan, "modes", {})
    modes = modes() if callable(modes) else modes
    counts = {m: list(modes.values()).count(m) for m in sorted(set(modes.values()))}
    return model, f"optimize_for_inference kept {getattr(plan, 'kept', '?')}, layer modes {counts}"


def ort_forms(pair: Pair, x: torch.Tensor, threads: int, workdir: Path) -> tuple[dict[str, Callable], list[str]]:
    """ONNX Runtime sessions for the original and the compressed model, or a note why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {}, ["onnxruntime not installed: ORT forms skipped"]
    to_torch = getattr(penni, "to_torch", None)
    if to_torch is None:
        return {}, ["penni.to_torch missing: ORT forms skipped"]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    fns: dict[str, Callable] = {}
    for form, model in (("ort-dense", pair.baseline), ("ort-compressed", to_torch(pair.compressed).eval())):
        path = workdir / f"{pair.case}_{form}_{x.shape[0]}.onnx"
        try:
            torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], verbose=False)
        except Exception as err:  # noqa: BLE001 - exporter missing (onnx, onnxscript) or op not supported
            return {}, [f"torch.onnx.export failed for {form}: {type(err).__name__}: {str(err).splitlines()[0][:160]}"]
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        fns[form] = (lambda s=session, f=feed: torch.from_numpy(s.run(None, f)[0]))
    return fns, []


def graphed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, how: str) -> Callable[[], torch.Tensor]:
    """``fn`` on ``x`` as a zero-argument call: eager, torch.compile'd or a replayed CUDA graph."""
    if how == "compile":
        compiled = torch.compile(fn, dynamic=False)
        return lambda: compiled(x)
    if how == "cudagraphs":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(x)

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay
    return lambda: fn(x)


# ----------------------------------------------------------------------------------- timing
def cpu_timer(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def cuda_timer(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     timer: Callable[[Callable[[], Any]], float]) -> dict[str, list[float]]:
    """Warm every form up, then time them round by round in a rotating order; ms per run."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(timer(fns[name]))
    return times


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def measure(pair: Pair, batch: int, dtype: torch.dtype, args: argparse.Namespace, device: torch.device,
            threads: int, workdir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Time every form of one pair at one batch size and dtype; rows for the results table."""
    torch.manual_seed(args.seed)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(batch, *pair.input_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    base = copy.deepcopy(pair.baseline).to(device=device, dtype=dtype).to(memory_format=fmt).eval()
    small = copy.deepcopy(pair.compressed).to(device=device, dtype=dtype).eval()
    small = penni.set_forward_mode(small, "dense").to(memory_format=fmt)
    notes: list[str] = []
    with torch.inference_mode():
        models = {"dense": base, "shrunk-dense": small}
        try:
            models["per-layer"], note = per_layer_form(small, x, args)
        except Exception as err:  # noqa: BLE001 - e.g. a sparse kernel missing for this dtype or device
            note = f"per-layer form failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        notes.append(f"{pair.case} batch {batch} {str(dtype).removeprefix('torch.')}: {note}")
        fns, diffs = {}, {}
        reference = small(x)
        for form, model in models.items():
            try:
                fns[form] = graphed(model, x, args.graph)
                diffs[form] = None if form == "dense" else _rel_diff(fns[form](), reference)
            except Exception as err:  # noqa: BLE001 - a form that cannot be compiled or captured
                notes.append(f"{pair.case} batch {batch}: {form} failed under --graph {args.graph}: "
                             f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        if device.type == "cpu" and dtype == torch.float32 and not args.no_onnx:
            ort_fns, ort_notes = ort_forms(pair, x, threads, workdir)
            notes.extend(f"{pair.case} batch {batch}: {n}" for n in ort_notes)
            fns.update(ort_fns)
            if "ort-compressed" in ort_fns:
                diffs["ort-dense"] = _rel_diff(ort_fns["ort-dense"](), base(x))
                diffs["ort-compressed"] = _rel_diff(ort_fns["ort-compressed"](), reference)
        timer = cuda_timer if device.type == "cuda" else cpu_timer
        times = time_interleaved(fns, args.warmup, args.repeats, timer)
    return _rows(pair.case, batch, dtype, times, diffs), notes


def _rows(case: str, batch: int, dtype: torch.dtype, times: dict[str, list[float]],
          diffs: dict[str, float | None]) -> list[dict[str, Any]]:
    medians = {form: statistics.median(t) for form, t in times.items()}
    rows = []
    for form, t in times.items():
        ref = REFERENCE[form]
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0], t[0], t[0]]
        rows.append({
            "case": case, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "form": form,
            "median_ms": medians[form], "q1_ms": q[0], "q3_ms": q[2], "runs": len(t),
            "reference": ref, "speedup": medians[ref] / medians[form] if ref in medians else None,
            "max_rel_diff": diffs.get(form),
        })
    return rows


# ----------------------------------------------------------------------------------- report
def machine(device: torch.device, threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "device": str(device),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info.update(code_version())
    return info


def code_version() -> dict[str, Any]:
    """The git commit measured and whether penni/ or benchmarks/ had uncommitted changes (None: no git)."""
    repo = Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str | None:
        try:
            proc = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--", "penni", "benchmarks")
    return {"git_commit": git("rev-parse", "HEAD"), "uncommitted_changes": None if status is None else bool(status)}


def target_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 7's targets and the 'never slower than dense' rule, against the measured rows."""
    checks = []
    for case, batch, dtype, minimum in TARGETS:
        got = {r["form"]: r["speedup"] for r in rows if (r["case"], r["batch"], r["dtype"]) == (case, batch, dtype)
               and r["speedup"] is not None}
        if got:
            best = max(got, key=got.get)
            checks.append({"target": f"{case} batch {batch} {dtype} >= {minimum}x", "per_layer": got.get("per-layer"),
                           "best_form": best, "best": got[best], "met": got[best] >= minimum})
    slower = [r for r in rows if r["speedup"] is not None and r["speedup"] < 1.0]
    checks.append({"target": "never slower than dense", "met": not slower,
                   "slower": [f"{r['case']} b{r['batch']} {r['dtype']} {r['form']} {r['speedup']:.2f}x" for r in slower]})
    return checks


def to_markdown(result: dict[str, Any]) -> str:
    m, st = result["machine"], result["settings"]
    lines = [f"# Inference latency: compressed vs dense ({result['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads" + (f", GPU {m['gpu']}" if "gpu" in m else "")
             + f"; torch {m['torch']}, onnxruntime {m.get('onnxruntime')}; git {m.get('git_commit')} "
             f"(uncommitted changes: {m.get('uncommitted_changes')}); device {m['device']}; "
             f"graph mode {st['graph']}, channels_last {st['channels_last']}, cudnn.benchmark "
             f"{m['device'].startswith('cuda') and not st['no_cudnn_benchmark']}; median of {st['repeats']} "
             f"interleaved runs after {st['warmup']} warm-up runs.", "",
             "Speed-up = reference median / form median (torch forms vs `dense`, `ort-compressed` vs `ort-dense`).", ""]
    for pair in result["pairs"]:
        base, comp = pair["structure"]["baseline"], pair["structure"]["compressed"]
        lines += [f"## {pair['case']}: {pair['description']}", "",
                  f"Params {base['params']:,} -> {comp['params']:,}; dense MACs/image {base['dense_macs']:,} -> "
                  f"{comp['dense_macs']:,} ({base['dense_macs'] / comp['dense_macs']:.2f}x); sparse MACs/image "
                  f"{comp['sparse_macs']:,}.", "",
                  "| batch | dtype | form | median ms | q1-q3 ms | speed-up | max rel. diff |",
                  "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in (r for r in result["rows"] if r["case"] == pair["case"]):
            speed = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "(reference)"
            diff = f"{r['max_rel_diff']:.1e}" if r["max_rel_diff"] is not None else ""
            lines.append(f"| {r['batch']} | {r['dtype']} | {r['form']} | {r['median_ms']:.3f} | "
                         f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f} | {speed} | {diff} |")
        lines.append("")
    lines += ["## Targets", "", "| target | per-layer | best form | met |", "| --- | ---: | --- | --- |"]
    for c in result["targets"]:
        if "best" in c:
            pl = f"{c['per_layer']:.2f}x" if c["per_layer"] is not None else "-"
            lines.append(f"| {c['target']} | {pl} | {c['best_form']} {c['best']:.2f}x | {'yes' if c['met'] else 'no'} |")
        else:
            lines.append(f"| {c['target']} | | {', '.join(c['slower']) or '-'} | {'yes' if c['met'] else 'no'} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':<11}{'batch':>6} {'dtype':<9}{'form':<16}{'median ms':>11}{'speed-up':>10}")
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "ref"
        print(f"{r['case']:<11}{r['batch']:>6} {r['dtype']:<9}{r['form']:<16}{r['median_ms']:>11.3f}{speed:>10}")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            pair = PAIR_BUILDERS[case](args)
            notes.extend(pair.notes)
            pairs.append({"case": case, "description": pair.description, "input_shape": list(pair.input_shape),
                          "batch_sizes": pair.batch_sizes,
                          "structure": {"baseline": structure(pair.baseline, pair.input_shape),
                                        "compressed": structure(pair.compressed, pair.input_shape)}})
            runs = [(b, torch.float32) for b in pair.batch_sizes]
            if device.type == "cuda":
                runs.append((args.bf16_batch, torch.bfloat16))
            for batch, dtype in runs:
                new, run_notes = measure(pair, batch, dtype, args, device, threads, Path(tmp))
                rows += new
                notes += run_notes
                print_table(new)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(device, threads),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "pairs": pairs, "rows": rows, "targets": target_checks(rows), "notes": notes}
    for c in result["targets"]:
        print(c)
    if args.out is not None:
        json_path, md_path = Path(f"{args.out}.json"), Path(f"{args.out}.md")
        write_atomic(json_path, json.dumps(result, indent=2) + "\n")
        write_atomic(md_path, to_markdown(result))
        print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
