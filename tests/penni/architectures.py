"""The CNNs users bring (torchvision and timm, pretrained=False), and what penni and Torch-Pruning do to each.

One home for the list and the measurement: ``tests/penni/test_architecture_coverage.py`` asserts on it and
``benchmarks/architecture_coverage.py`` tabulates it side by side with Torch-Pruning. Every model is the smallest
variant of its family, built with 10 classes, at a small input (2x3x64x64 unless the model needs more).
"""
from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import penni
from tests.helpers import randomize_batchnorm

TARGET = 0.5
CLASSES = 10


@dataclass(frozen=True)
class Case:
    """One model: ``library`` ("torchvision" or "timm"), its builder name, the input side."""
    library: str
    name: str
    size: int = 64

    @property
    def id(self) -> str:
        return f"{self.library}:{self.name}"


TORCHVISION = [Case("torchvision", n) for n in (
    "alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d", "wide_resnet50_2", "squeezenet1_1", "densenet121",
    "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5", "efficientnet_b0",
    "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
)] + [Case("torchvision", "googlenet", 96), Case("torchvision", "inception_v3", 96)]

TIMM = [Case("timm", n) for n in (
    "resnet10t", "seresnet18", "ecaresnet26t", "skresnet18", "resnest14d", "res2net50_14w_8s",
    "cs3darknet_s", "darknet17", "dpn48b", "dla46_c", "ese_vovnet19b_slim_dw", "hrnet_w18_small", "selecsls42b",
    "ghostnet_050", "repvgg_a0", "mobileone_s0", "rexnet_100", "mobilenetv3_small_050", "mobilenetv2_050",
    "efficientnet_lite0", "efficientnet_b0", "mixnet_s", "tinynet_e", "lcnet_050", "semnasnet_050", "fbnetc_100",
    "hardcorenas_a", "regnetx_002", "regnetz_b16", "gernet_s", "nf_regnet_b0", "convnext_atto", "densenet121",
)]

CASES = TORCHVISION + TIMM


def build(case: Case) -> nn.Module:
    """The model with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    if case.library == "timm":
        import timm

        model = timm.create_model(case.name, pretrained=False, num_classes=CLASSES)
    else:
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": False} if case.name in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(case.name, weights=None, num_classes=CLASSES, **kwargs)
    randomize_batchnorm(model)
    return model.eval()


def example(case: Case) -> torch.Tensor:
    return torch.randn(2, 3, case.size, case.size, generator=torch.Generator().manual_seed(1))


def dense_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the convs and matmuls the model runs (FlopCounterMode counts 2 per MAC)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text[:200]


@dataclass
class Outcome:
    """What one tool did to one model; ``reason`` says why a step failed."""
    reached: float | None = None      # 1 - dense MACs after / before
    exact: float | None = None        # relative error of the shrunk model against the masked one (penni)
    exported: bool | None = None      # torch.export of the result
    seconds: float = 0.0
    reason: str | None = None
    notes: list[str] = field(default_factory=list)


def _export(model: nn.Module, x: torch.Tensor) -> None:
    torch.export.export(model, (x,), strict=False)


def run_penni(case: Case, export: bool = True) -> Outcome:
    """decompose, prune_channels to -50% dense MACs, shrink; MACs, exactness, to_torch + torch.export."""
    out = Outcome()
    model, x = build(case), example(case)
    before = dense_macs(model, x)
    start = time.perf_counter()
    try:
        penni.decompose(model)
        penni.prune_channels(model, TARGET, x)
        small = penni.shrink(model, x)
    except Exception as err:  # noqa: BLE001  (the table records why)
        out.seconds = time.perf_counter() - start
        out.reason = one_line(err)
        out.notes.append(traceback.format_exc(limit=3))
        return out
    out.seconds = time.perf_counter() - start
    with torch.no_grad():
        out.exact = relative_error(small(x), model(x))
    try:
        plain = penni.to_torch(small)
        out.reached = 1.0 - dense_macs(plain, x) / before
        if export:
            _export(plain, x)
            out.exported = True
    except Exception as err:  # noqa: BLE001  (the table records why)
        out.exported = False
        out.reason = f"export: {one_line(err)}"
    return out


def _tp_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    head = [m for m in pruned.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and getattr(m, "out_features", getattr(m, "out_channels", None)) == CLASSES]
    pruner = tp.pruner.BasePruner(pruned, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=head)
    pruner.step()
    return pruned


def run_torch_pruning(case: Case, target: float = TARGET, steps: int = 7) -> Outcome:
    """Torch-Pruning 1.6, magnitude importance, the pruning ratio bisected to ``target`` fewer dense MACs."""
    out = Outcome()
    model, x = build(case), example(case)
    before = dense_macs(model, x)
    start = time.perf_counter()
    lo, hi, best = 0.0, 0.95, None
    try:
        for _ in range(steps):
            ratio = (lo + hi) / 2
            pruned = _tp_prune(model, x, ratio)
            reached = 1.0 - dense_macs(pruned, x) / before
            if best is None or abs(reached - target) < abs(best[0] - target):
                best = (reached, pruned)
            if abs(reached - target) < 0.005:
                break
            lo, hi = (ratio, hi) if reached < target else (lo, ratio)
    except Exception as err:  # noqa: BLE001  (the table records why)
        out.seconds = time.perf_counter() - start
        out.reason = one_line(err)
        return out
    out.seconds = time.perf_counter() - start
    out.reached, pruned = best
    try:
        _export(pruned, x)
        out.exported = True
    except Exception as err:  # noqa: BLE001  (the table records why)
        out.exported = False
        out.reason = f"export: {one_line(err)}"
    return out
