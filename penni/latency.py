"""Latency tables (HALP-style): each conv/linear layer's latency measured alone on the device, on a grid of kept widths.

:func:`latency_table` times every conv and linear layer of a model by itself, at its real input resolution and at
each batch size, as a plain layer with ``kept_out`` x ``kept_in`` channels for a few fractions of its widths
(rounded to ``round_to``), in eager PyTorch (``runtime="torch"``) or in ONNX Runtime's CPU provider (one single-layer
ONNX graph per grid point). :meth:`LatencyTable.layer_ms` interpolates bilinearly between the grid points. Tables are
cached as JSON files keyed by device, runtime, batch sizes, dtype, memory format, grid and the model's layer shapes, so sweeps reuse
them. ``measure`` (the timing of one module on its inputs) is injectable: tests pass a deterministic one.
"""
from __future__ import annotations

import bisect
import copy
import hashlib
import heapq
import json
import os
import platform
import statistics
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .conv import PenniConv2d
from .export import export_onnx, to_torch

RUNTIMES: tuple[str, ...] = ("torch", "onnxruntime")
DEFAULT_GRID: tuple[float, ...] = (0.125, 0.25, 0.5, 0.75, 1.0)

#: Milliseconds that ``module(*inputs)`` takes (inputs already at the batch size and on the device).
Measure = Callable[[nn.Module, tuple], float]


def speedup_target(speedup: float) -> float:
    """The fraction of latency to remove for a speed-up ``speedup`` (> 1): ``1 - 1 / speedup``."""
    if isinstance(speedup, bool) or not speedup > 1.0:
        raise ValueError(f"a speed-up must be a number > 1, got {speedup!r}")
    return 1.0 - 1.0 / speedup


def default_round_to(runtime: str = "torch", device: str = "cpu", dtype: torch.dtype = torch.float32) -> int:
    """Channel multiple the runtime's kernels like: 8 on CPU (ORT's NCHWc blocks, oneDNN) and for fp32 on GPU, 16 for half types on GPU."""
    if str(device).startswith("cuda") and dtype in (torch.float16, torch.bfloat16):
        return 16
    return 8


@dataclass
class LatencySettings:
    """Where and how latency is measured, and how ``prune_channels(cost="latency")`` checks it."""

    runtime: str = "torch"
    batch_sizes: tuple[int, ...] = (1,)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    channels_last: bool = False  # eager PyTorch only: layers, models and inputs in torch.channels_last
    grid: tuple[float, ...] = DEFAULT_GRID
    round_to: int | None = None  # None: default_round_to(runtime, device, dtype)
    repeats: int = 5
    statistic: str = "min"  # or "median"; the fastest run is what other jobs on the machine disturb least
    rounds: int = 4  # selections checked by timing the shrunk model
    tolerance: float = 0.02  # accept a measured speed-up this much (relative) below the target
    cache_dir: str | os.PathLike | None = None
    measure: Measure | None = None  # None: time the module in ``runtime``

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}: use one of {RUNTIMES}")
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive ints, got {self.batch_sizes!r}")
        if self.statistic not in ("min", "median"):
            raise ValueError(f"statistic must be 'min' or 'median', got {self.statistic!r}")
        if self.runtime == "onnxruntime" and not str(self.device).startswith("cpu"):
            raise ValueError("runtime 'onnxruntime' is measured on the CPU provider: use device='cpu'")
        if self.runtime == "onnxruntime" and (self.channels_last or self.dtype != torch.float32):
            raise ValueError("runtime 'onnxruntime' is measured in float32 and its own layout: "
                             "leave dtype=torch.float32 and channels_last=False")

    @property
    def multiple(self) -> int:
        """The ``round_to`` in force."""
        return self.round_to or default_round_to(self.runtime, self.device, self.dtype)


@dataclass(frozen=True)
class LayerSpec:
    """A conv or linear layer's shape and its input's per-sample shape: all a latency measurement needs."""

    kind: str  # "conv" or "linear"
    out: int
    inp: int
    input_shape: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.inp == self.out

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def build(self, out: int, inp: int, dtype: torch.dtype, device: str) -> tuple[nn.Module, torch.Tensor]:
        """A plain layer with ``out`` x ``inp`` channels and a per-sample input for it."""
        shape = list(self.input_shape)
        if self.kind == "linear":
            shape[-1] = inp
            return nn.Linear(inp, out, bias=self.bias, device=device, dtype=dtype).eval(), torch.randn(shape)
        groups = out if self.depthwise else self.groups
        inp = out if self.depthwise else inp
        shape[0] = inp
        conv = getattr(nn, f"Conv{len(self.kernel)}d")(inp, out, self.kernel, self.stride, self.padding,
                                                        self.dilation, groups, self.bias, device=device, dtype=dtype)
        return conv.eval(), torch.randn(shape)


_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, PenniConv2d)


def _spec(module: nn.Module, x: torch.Tensor) -> LayerSpec | None:
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.out_features, module.in_features, tuple(x.shape[1:]), bias=module.bias is not None)
    if isinstance(module, _LAYER_TYPES):
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        return LayerSpec("conv", module.out_channels, module.in_channels, tuple(x.shape[1:]), tuple(module.kernel_size),
                         tuple(module.stride), padding, tuple(module.dilation), module.groups, module.bias is not None)
    return None


def layer_specs(model: nn.Module, example_inputs: Any) -> dict[str, LayerSpec]:
    """Every conv and linear layer of ``model`` (by name) with the input shape it sees on ``example_inputs``."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    specs: dict[str, LayerSpec] = {}
    hooks = []
    for name, module in model.named_modules():
        def hook(m: nn.Module, args: tuple, _out: Any, name: str = name) -> None:
            if name not in specs and (spec := _spec(m, args[0])) is not None:
                specs[name] = spec
        if isinstance(module, _LAYER_TYPES):
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return specs


def _widths(full: int, grid: Sequence[float], step: int) -> list[int]:
    """Grid widths of an axis: ``fraction * full`` rounded up to a multiple of ``step``, at most ``full``."""
    return sorted({min(full, max(step, -(-round(f * full) // step) * step)) for f in grid} | {full})


def _axis_step(spec: LayerSpec, multiple: int) -> int:
    return spec.groups * -(-multiple // spec.groups) if spec.groups > 1 and not spec.depthwise else multiple


@dataclass
class _Grid:
    """Measured ms of one layer shape at one batch size: ``ms[i][j]`` at ``outs[i]`` x ``ins[j]``."""

    outs: list[int]
    ins: list[int]
    ms: list[list[float]]

    def monotone(self) -> list[list[float]]:
        """The grid made non-decreasing in both widths (a running minimum from the full widths down): noise cleared."""
        m = [row[:] for row in self.ms]
        for i in range(len(m) - 1, -1, -1):
            for j in range(len(m[i]) - 1, -1, -1):
                if i + 1 < len(m):
                    m[i][j] = min(m[i][j], m[i + 1][j])
                if j + 1 < len(m[i]):
                    m[i][j] = min(m[i][j], m[i][j + 1])
        return m

    def at(self, out: float, inp: float) -> float:
        """Bilinear interpolation (clamped to the grid's range)."""
        m = self.monotone()
        (i0, i1, a), (j0, j1, b) = _bracket(self.outs, out), _bracket(self.ins, inp)
        top = m[i0][j0] * (1 - b) + m[i0][j1] * b
        bottom = m[i1][j0] * (1 - b) + m[i1][j1] * b
        return top * (1 - a) + bottom * a


def _bracket(points: list[int], value: float) -> tuple[int, int, float]:
    """Indices around ``value`` in sorted ``points`` and its weight on the upper one."""
    value = min(max(value, points[0]), points[-1])
    hi = min(bisect.bisect_left(points, value), len(points) - 1)
    lo = max(hi - 1, 0)
    if points[hi] == points[lo]:
        return lo, hi, 0.0
    return lo, hi, (value - points[lo]) / (points[hi] - points[lo])


@dataclass
class LatencyTable:
    """Per conv/linear layer and batch size: latency on a grid of kept widths, interpolated by :meth:`layer_ms`."""

    settings: LatencySettings
    specs: dict[str, LayerSpec]
    grids: dict[tuple[str, int], _Grid] = field(default_factory=dict)  # (spec key, batch size)
    path: Path | None = None  # the cache file, if any

    def layer_ms(self, name: str, kept_out: float, kept_in: float, batch_size: int) -> float:
        """Interpolated milliseconds of layer ``name`` alone with the given kept widths."""
        spec = self.specs[name]
        return self.grids[(spec.key(), batch_size)].at(kept_out, kept_out if spec.depthwise else kept_in)

    def curve(self, name: str, base: dict[int, float]) -> Callable[[float, float], float]:
        """``(kept_out, kept_in) ->`` the layer's latency as a fraction of ``base`` (ms per batch size), summed."""
        return lambda out, inp: sum(self.layer_ms(name, out, inp, b) / ms for b, ms in base.items())

    def total_ms(self, batch_size: int) -> float:
        """Sum of every layer's measured latency at full widths."""
        return sum(self.layer_ms(n, s.out, s.inp, batch_size) for n, s in self.specs.items())


def device_name(device: str) -> str:
    """What identifies the device's speed: the GPU's name, or the CPU model and torch's thread count."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu:{model}:{os.cpu_count()}cores:{torch.get_num_threads()}threads"


#: On a GPU each sample is this many back-to-back calls, one synchronization, divided: a layer inside a model runs
#: queued behind the one before it, so timing it alone with a sync per call would count launch latency it never pays.
GPU_CALLS_PER_SAMPLE = 10


def _samples(fn: Callable[[], Any], repeats: int, device: str) -> list[float]:
    """Milliseconds per call of ``fn``, ``repeats`` samples after two warm-up calls (see GPU_CALLS_PER_SAMPLE)."""
    cuda = str(device).startswith("cuda")
    sync, calls = (torch.cuda.synchronize, GPU_CALLS_PER_SAMPLE) if cuda else ((lambda: None), 1)
    with torch.inference_mode():
        for _ in range(2):
            fn()
        sync()
        found = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            found.append((time.perf_counter() - t0) * 1e3 / calls)
    return found


def _placed(module: nn.Module, inputs: tuple, settings: LatencySettings) -> tuple[nn.Module, tuple]:
    """``module`` and ``inputs`` on the settings' device, in its dtype and memory format; the module is copied
    first when that changes its parameters, so the caller's model is never cast in place."""
    fmt = torch.channels_last if settings.channels_last else torch.preserve_format
    first = next(iter(module.parameters()), None)
    if first is not None and (first.dtype != settings.dtype or settings.channels_last):
        module = copy.deepcopy(module)
    module = module.to(settings.device, settings.dtype).eval()
    if settings.channels_last:
        module = module.to(memory_format=torch.channels_last)

    def place(x: torch.Tensor) -> torch.Tensor:
        x = x.to(settings.device, settings.dtype if x.is_floating_point() else x.dtype)
        return x.contiguous(memory_format=fmt) if x.dim() == 4 else x

    return module, tuple(place(x) for x in inputs)


def time_module(module: nn.Module, inputs: tuple, settings: LatencySettings) -> float:
    """Milliseconds of ``module(*inputs)`` in the settings' runtime (ONNX Runtime: a fixed-batch ONNX export), by
    ``settings.statistic`` over ``settings.repeats`` runs; eager PyTorch in the settings' dtype and memory format."""
    if settings.runtime == "torch":
        module, inputs = _placed(module, inputs, settings)
        samples = _samples(lambda: module(*inputs), settings.repeats, settings.device)
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(module.eval(), inputs, Path(tmp) / "m.onnx", dynamic_batch=False)
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
        samples = _samples(lambda: session.run(None, feed), settings.repeats, "cpu")
    return min(samples) if settings.statistic == "min" else statistics.median(samples)


def _cache_key(settings: LatencySettings, specs: dict[str, LayerSpec]) -> dict:
    measure = settings.measure
    return {"device": device_name(settings.device), "runtime": settings.runtime,
            "batch_sizes": list(settings.batch_sizes), "dtype": str(settings.dtype), "grid": list(settings.grid),
            "channels_last": settings.channels_last,
            "round_to": settings.multiple, "repeats": settings.repeats, "statistic": settings.statistic,
            "measure": None if measure is None else f"{measure.__module__}.{getattr(measure, '__qualname__', '')}",
            "layers": hashlib.sha256("\n".join(sorted({s.key() for s in specs.values()})).encode()).hexdigest()}


def _measure_grid(spec: LayerSpec, batch: int, settings: LatencySettings, measure: Measure) -> _Grid:
    step = _axis_step(spec, settings.multiple)
    outs = _widths(spec.out, settings.grid, step)
    ins = [spec.inp] if spec.depthwise else _widths(spec.inp, settings.grid, step)
    ms = []
    for out in outs:
        row = []
        for inp in ins:
            layer, sample = spec.build(out, inp, settings.dtype, settings.device)
            x = sample.unsqueeze(0).expand(batch, *sample.shape).contiguous().to(settings.device, settings.dtype)
            row.append(float(measure(layer, (x,))))
        ms.append(row)
    return _Grid(outs, ins, ms)


def latency_table(model: nn.Module, example_inputs: Any, settings: LatencySettings | None = None) -> LatencyTable:
    """Measure (or read from ``settings.cache_dir``) the latency grid of every conv/linear layer of ``model``."""
    settings = settings or LatencySettings()
    specs = layer_specs(model, example_inputs)
    key = _cache_key(settings, specs)
    table = LatencyTable(settings, specs)
    cached: dict = {}
    if settings.cache_dir is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        table.path = Path(settings.cache_dir) / f"latency-{digest}.json"
        if table.path.exists():
            cached = json.loads(table.path.read_text())["grids"]
    measure = settings.measure or (lambda m, xs: time_module(m, xs, settings))
    stored: dict[str, dict] = {}
    new = False
    for spec in {s.key(): s for s in specs.values()}.values():
        for batch in settings.batch_sizes:
            entry = cached.get(spec.key(), {}).get(str(batch))
            grid = _Grid(**entry) if entry else _measure_grid(spec, batch, settings, measure)
            new = new or not entry
            table.grids[(spec.key(), batch)] = grid
            stored.setdefault(spec.key(), {})[str(batch)] = asdict(grid)
    if table.path is not None and new:
        table.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = table.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "grids": stored}, indent=1, sort_keys=True))
        os.replace(tmp, table.path)
    return table


def measure_model(model: nn.Module, example_inputs: Any, settings: LatencySettings) -> dict[int, float]:
    """Milliseconds of the whole model (as plain torch layers, see ``penni.to_torch``) at each batch size."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    plain = to_torch(model).to(settings.device)
    measure = settings.measure or (lambda m, xs: time_module(m, xs, settings))
    found = {}
    for batch in settings.batch_sizes:
        xs = tuple(x[:1].expand(batch, *x.shape[1:]).contiguous().to(settings.device) for x in inputs)
        found[batch] = float(measure(plain, xs))
    return found


def greedy_by_ratio(queues: Sequence[deque], score: Callable[[Any], float], saving: Callable[[Any], float | None],
                    take: Callable[[Any], float], remaining: float, min_saving: float = 0.0) -> list:
    """Take queue heads (each queue in its order, consumed in place) by least ``score`` per ``saving`` while
    ``remaining > 0`` (a lazy greedy: a head's saving is recomputed when it comes up); ``take`` removes an item and
    returns what it saved; a head whose saving is None or at most ``min_saving`` ends its queue (removing it would
    cost accuracy for nothing: an unreachable ``remaining`` must not prune everything). Returns the items taken."""
    def key(q: int) -> float | None:
        saved = saving(queues[q][0]) if queues[q] else None
        return None if saved is None or saved <= min_saving else score(queues[q][0]) / max(saved, 1e-12)

    heap = [(k, q) for q in range(len(queues)) if (k := key(q)) is not None]
    heapq.heapify(heap)
    taken = []
    while heap and remaining > 0:
        _, q = heapq.heappop(heap)
        fresh = key(q)
        if fresh is None:
            continue
        if heap and fresh > heap[0][0]:
            heapq.heappush(heap, (fresh, q))
            continue
        item = queues[q].popleft()
        remaining -= take(item)
        taken.append(item)
        if (k := key(q)) is not None:
            heapq.heappush(heap, (k, q))
    return taken


def select_to_speedup(select: Callable[[float], tuple[bool, float]],
                      measure: Callable[[], tuple[dict[int, float], dict[int, float]]],
                      base: dict[int, float], target: float, settings: LatencySettings) -> dict:
    """Rounds of ``select(goal)`` (prune on until the modelled cost is ``goal`` of the full cost; returns whether it
    took anything and the fraction reached) and ``measure()`` (baseline and pruned ms per batch size, timed
    together; the baseline's fastest so far counts, so one disturbed timing does not stop the rounds) until the
    measured latency falls by ``target`` at every batch size (within ``settings.tolerance``), each round's goal
    corrected by the last miss; at most ``settings.rounds``. Returns the timings."""
    goal, info = 1.0 - target, {"baseline_ms": base, "round_to": settings.multiple, "rounds": 0}
    for _ in range(settings.rounds):
        progressed, reached = select(goal)
        again, info["pruned_ms"] = measure()
        base = info["baseline_ms"] = {b: min(ms, again[b]) for b, ms in base.items()}
        info["rounds"] += 1
        ratio = max(info["pruned_ms"][b] / base[b] for b in base)
        if ratio * (1.0 - settings.tolerance) <= 1.0 - target or not progressed:
            break
        goal = reached * (1.0 - target) / ratio
    info["speedup"] = {b: base[b] / info["pruned_ms"][b] for b in base}
    worst = min(base, key=info["speedup"].get)
    info["worst_ms"] = (base[worst], info["pruned_ms"][worst])
    return info
