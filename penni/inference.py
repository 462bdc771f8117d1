"""optimize_for_inference(model, example_inputs): the fastest forward form per PenniConv2d, measured.

Every decomposed layer can run as a baked dense conv, as a basis conv + dense 1x1 coefficient
conv, or as a basis conv + sparse (CSR) coefficient matmul (``penni.INFERENCE_MODES``). Which is
fastest depends on the layer's width, spatial size, sparsity, batch size and the machine, so it is
measured: each layer's real input is captured by a hook at the given batch size and every form is
timed on it (warm-up, forms interleaved round by round so machine noise hits all of them, median).
The model is then timed as a whole against the all-dense form and left all-dense unless the
per-layer choice is faster: it never makes a model slower than dense (within the timing's noise).
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .conv import INFERENCE_MODES, PenniConv2d, penni_layers, set_forward_mode

__all__ = ["optimize_for_inference", "InferencePlan", "LayerTiming", "time_forward", "time_onnx_runtime"]


@dataclass
class LayerTiming:
    """One layer's measured forms (median ms) and the chosen one."""

    name: str
    in_channels: int
    out_channels: int
    d: int
    input_size: tuple[int, ...]
    coefficient_sparsity: float
    timings_ms: dict[str, float]
    chosen: str


@dataclass
class InferencePlan:
    """What optimize_for_inference measured and chose (per layer and for the whole model)."""

    layers: list[LayerTiming] = field(default_factory=list)
    model_ms: float = float("nan")
    dense_model_ms: float = float("nan")
    kept: str = "per-layer"  # or "all-dense" when the per-layer choice was not faster
    device: str = "cpu"
    batch_size: int = 0
    repeats: int = 0

    @property
    def modes(self) -> dict[str, str]:
        """Layer name -> forward mode now set on the model."""
        if self.kept == "all-dense":
            return {layer.name: "dense" for layer in self.layers}
        return {layer.name: layer.chosen for layer in self.layers}

    @property
    def speedup(self) -> float:
        """All-dense model latency / kept model latency (>= 1 by construction, up to noise)."""
        return self.dense_model_ms / self.model_ms if self.model_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (for evaluation.json / MLflow)."""
        return {"layers": [asdict(layer) for layer in self.layers], "model_ms": self.model_ms,
                "dense_model_ms": self.dense_model_ms, "kept": self.kept, "modes": self.modes,
                "device": self.device, "batch_size": self.batch_size, "repeats": self.repeats}

    def to_markdown(self) -> str:
        """A per-layer table of median latencies (ms), the chosen form marked with *."""
        forms = [m for m in INFERENCE_MODES if any(m in layer.timings_ms for layer in self.layers)]
        head = ["layer", "in", "out", "d", "input", "zero coeffs"] + forms + ["chosen"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 6 + "---:|" * len(forms) + "---|"]
        for layer in self.layers:
            cells = [layer.name, str(layer.in_channels), str(layer.out_channels), str(layer.d),
                     "x".join(map(str, layer.input_size)), f"{100 * layer.coefficient_sparsity:.1f}%"]
            for form in forms:
                ms = layer.timings_ms.get(form)
                text = "-" if ms is None else f"{ms:.3f}"
                cells.append(f"**{text}**" if form == layer.chosen else text)
            cells.append(self.modes.get(layer.name, layer.chosen))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"Whole model ({self.device}, batch {self.batch_size}, median of {self.repeats}): "
                     f"per-layer choice {self.model_ms:.3f} ms, all-dense {self.dense_model_ms:.3f} ms; "
                     f"kept: {self.kept}.")
        return "\n".join(lines) + "\n"


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_forward(fns: Sequence[Callable[[], Any]], repeats: int, device: torch.device,
                 warmup: int = 3) -> list[float]:
    """Median milliseconds of each callable, run interleaved round by round after a warm-up."""
    sync = _sync(device)
    samples: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            for _ in range(warmup):
                fn()
        sync()
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                sync()
                samples[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(s) for s in samples]


def time_onnx_runtime(paths: Sequence[Any], x: torch.Tensor, repeats: int, threads: int | None = None,
                      warmup: int = 3) -> list[float]:
    """Median ms of ONNX Runtime (CPU provider) on each ONNX file, interleaved like :func:`time_forward`.

    ``threads`` sets ``intra_op_num_threads`` (default: torch's thread count, so both runtimes get
    the same cores). Needs onnxruntime (``pip install penni[export]``); imported only here.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    feed = {"input": x.detach().cpu().numpy()}
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
    return time_forward([lambda s=s: s.run(None, feed) for s in sessions], repeats, torch.device("cpu"), warmup)


def _call(model: nn.Module, inputs: tuple) -> Callable[[], Any]:
    return lambda: model(*inputs)


def _as_tuple(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _time_layer(name: str, layer: PenniConv2d, x: torch.Tensor, forms: Sequence[str], repeats: int,
                device: torch.device) -> LayerTiming:
    """Time every form of ``layer`` on its real input ``x`` (one copy of the layer per form)."""
    candidates: dict[str, Callable[[], Any]] = {}
    for form in forms:
        variant = copy.deepcopy(layer)
        variant._forward_pre_hooks.clear()  # the copy would carry the timing hook along
        try:
            variant.set_forward_mode(form)
            with torch.inference_mode():
                variant(x)
        except (RuntimeError, NotImplementedError, ValueError) as err:  # a form this device/dtype lacks
            warnings.warn(f"{name}: form {form!r} skipped ({err})", stacklevel=3)
            continue
        candidates[form] = _call(variant, (x,))
    timings = dict(zip(candidates, time_forward(list(candidates.values()), repeats, device)))
    coeff = layer.coefficients.detach()
    return LayerTiming(name=name, in_channels=layer.in_channels, out_channels=layer.out_channels, d=layer.d,
                       input_size=tuple(x.shape), coefficient_sparsity=float((coeff == 0).float().mean()),
                       timings_ms=timings, chosen=min(timings, key=timings.get))


def _time_layers(model: nn.Module, inputs: tuple, forms: Sequence[str], repeats: int,
                 device: torch.device) -> list[LayerTiming]:
    """Run the model once; a pre-hook times each layer's forms on the input it really gets."""
    layers = penni_layers(model)
    timed: dict[str, LayerTiming] = {}
    started: set[str] = set()
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in started:  # a layer called twice is timed on its first input
                started.add(name)
                timed[name] = _time_layer(name, module, args[0].detach(), forms, repeats, device)
        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(hook_for(name)))
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [timed[name] for name in layers if name in timed]


def optimize_for_inference(model: nn.Module, example_inputs: Any, device: torch.device | str | None = None,
                           repeats: int = 20, forms: Sequence[str] = INFERENCE_MODES) -> InferencePlan:
    """Set each PenniConv2d of ``model`` to its fastest form at the batch size of ``example_inputs``.

    The model is put in eval mode (and moved to ``device`` when given); each layer's forms are
    timed on its real input, the fastest kept; then the whole model is timed against the
    all-dense form and left all-dense unless the per-layer choice is faster. Layers the model
    never called stay dense. The modes are saved by ``penni.save``. Returns the timing table.
    """
    unknown = [f for f in forms if f not in INFERENCE_MODES]
    if unknown or "dense" not in forms:
        raise ValueError(f"forms must be among {INFERENCE_MODES} and include 'dense', got {list(forms)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    model.eval()
    if device is not None:
        model.to(device)
    inputs = _as_tuple(example_inputs)
    dev = torch.device(device) if device is not None else next(
        (t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in inputs)
    set_forward_mode(model, "dense")
    layers = _time_layers(model, inputs, forms, repeats, dev)
    plan = InferencePlan(layers=layers, device=str(dev), repeats=repeats,
                         batch_size=int(inputs[0].shape[0]) if isinstance(inputs[0], torch.Tensor) else 0)
    _choose_whole_model(model, inputs, plan, repeats, dev)
    return plan


def _apply(model: nn.Module, modes: dict[str, str]) -> None:
    for name, layer in penni_layers(model).items():
        layer.set_forward_mode(modes.get(name, "dense"))


def _choose_whole_model(model: nn.Module, inputs: tuple, plan: InferencePlan, repeats: int,
                        device: torch.device) -> None:
    """Time the per-layer choice against all-dense (interleaved); keep all-dense unless slower."""
    chosen = {layer.name: layer.chosen for layer in plan.layers}
    if all(mode == "dense" for mode in chosen.values()):
        (ms,) = time_forward([_call(model, inputs)], repeats, device)
        plan.model_ms = plan.dense_model_ms = ms
        plan.kept = "all-dense"
        return
    dense_model = copy.deepcopy(model)
    set_forward_mode(dense_model, "dense")
    _apply(model, chosen)
    plan.model_ms, plan.dense_model_ms = time_forward([_call(model, inputs), _call(dense_model, inputs)],
                                                      repeats, device)
    if plan.model_ms >= plan.dense_model_ms:
        set_forward_mode(model, "dense")
        plan.kept, plan.model_ms = "all-dense", plan.dense_model_ms
