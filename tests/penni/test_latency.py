"""Latency tables and pruning to a latency target (``prune_channels(cost="latency")``).

Selection and interpolation are tested with an injected, deterministic "latency" (blocked MACs plus a per-layer
overhead), so nothing here depends on the machine's speed; the real measurements are only checked to run.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import pytest
import torch
from torch import nn

import penni
from penni.latency import LatencySettings, latency_table, layer_specs, measure_model
from penni.models import build_model
from tests.helpers import randomize_batchnorm

BLOCK = 8


def blocked(n: int) -> int:
    return BLOCK * math.ceil(n / BLOCK)


def _per_layer_ms(module: nn.Module, inputs: tuple, layer_ms: Callable[[nn.Module, torch.Tensor], float]) -> float:
    """Sum of ``layer_ms(layer, output)`` over the conv/linear layers, run on the meta device (shapes only: no
    arithmetic, so the tests stay fast)."""
    found = []
    shapes = copy.deepcopy(module).to("meta")
    for m in shapes.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda m, args, out: found.append(layer_ms(m, out)))
    with torch.no_grad():
        shapes(*(x.to("meta") for x in inputs))
    return sum(found)


def _shape(m: nn.Module, out: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch x pixels, kernel taps, output channels, input channels per group) of one layer's call."""
    per_in = m.in_channels // m.groups if isinstance(m, nn.Conv2d) else m.in_features
    taps = math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else 1
    pixels = out[0, 0].numel() if isinstance(m, nn.Conv2d) else 1
    return out.shape[0] * pixels, taps, out.shape[1], per_in


def fake_ms(module: nn.Module, inputs: tuple) -> float:
    """Deterministic ms: per conv/linear, MACs with channels rounded up to blocks of 8 (linear in them and in their
    square root: not bilinear in the widths), plus 0.02 ms per layer."""
    def layer(m: nn.Module, out: torch.Tensor) -> float:
        pixels, taps, cout, cin = _shape(m, out)
        macs = pixels * taps * blocked(cout) * blocked(cin)
        return 0.02 + macs * 1e-6 + math.sqrt(macs) * 1e-3

    return _per_layer_ms(module, inputs, layer)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def test_speedup_target_and_settings_are_checked():
    assert penni.speedup_target(2.0) == pytest.approx(0.5)
    assert penni.speedup_target(4.0) == pytest.approx(0.75)
    for bad in (1.0, 0.5, True):
        with pytest.raises(ValueError):
            penni.speedup_target(bad)
    with pytest.raises(ValueError, match="runtime"):
        LatencySettings(runtime="tvm")
    with pytest.raises(ValueError, match="batch_sizes"):
        LatencySettings(batch_sizes=())


def test_table_interpolates_held_out_widths_within_15_percent(tmp_path):
    model, x = small_net(), torch.randn(2, 3, 16, 16)
    settings = LatencySettings(batch_sizes=(1, 4), measure=fake_ms, cache_dir=tmp_path)
    table = latency_table(model, x, settings)
    specs = layer_specs(model, x)
    assert set(table.specs) == {"0", "3", "6", "11"}
    worst, held_out = 0.0, 0
    for name, spec in specs.items():  # widths the pruner makes (multiples of round_to), off the measured grid
        for out in range(BLOCK, spec.out + 1, BLOCK):
            for inp in range(BLOCK, spec.inp + 1, BLOCK) if spec.inp > BLOCK else [spec.inp]:
                grid = table.grids[(spec.key(), 1)]
                if out in grid.outs and inp in grid.ins:
                    continue
                held_out += 1
                for batch in settings.batch_sizes:
                    layer, sample = spec.build(out, inp, torch.float32, "cpu")
                    truth = fake_ms(layer, (sample.unsqueeze(0).expand(batch, *sample.shape),))
                    worst = max(worst, abs(table.layer_ms(name, out, inp, batch) / truth - 1))
    assert held_out >= 10 and worst <= 0.15, (held_out, worst)
    assert table.layer_ms("3", 64, 32, 4) == pytest.approx(fake_ms(model[3], (torch.randn(4, 32, 16, 16),)))


def test_table_is_cached_per_model_and_settings(tmp_path):
    calls = []

    def counting(module: nn.Module, inputs: tuple) -> float:
        calls.append(1)
        return fake_ms(module, inputs)

    model, x = small_net(), torch.randn(2, 3, 16, 16)
    first = latency_table(model, x, LatencySettings(measure=counting, cache_dir=tmp_path))
    measured = len(calls)
    assert measured > 0 and first.path is not None and first.path.exists()
    again = latency_table(model, x, LatencySettings(measure=counting, cache_dir=tmp_path))
    assert len(calls) == measured and again.path == first.path  # read back, nothing measured
    assert again.layer_ms("6", 37, 45, 1) == pytest.approx(first.layer_ms("6", 37, 45, 1))
    latency_table(model, x, LatencySettings(measure=counting, cache_dir=tmp_path, batch_sizes=(2,)))
    assert len(calls) > measured  # another batch size: another table
    assert len(list(tmp_path.glob("latency-*.json"))) == 2


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    randomize_batchnorm(model, seed=3)
    return model


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_selection_stops_at_the_latency_target(resnet18, target):
    model, x = copy.deepcopy(resnet18), torch.randn(2, 3, 32, 32)
    settings = LatencySettings(batch_sizes=(1, 8), measure=fake_ms, tolerance=0.0)
    report = penni.prune_channels(model, target, x, cost="latency", latency=settings)
    small = penni.shrink(model, x)
    base, pruned = measure_model(resnet18, x, settings), measure_model(small, x, settings)
    for batch in settings.batch_sizes:
        reached = 1 - pruned[batch] / base[batch]
        assert reached == pytest.approx(1 - report.latency["pruned_ms"][batch] / report.latency["baseline_ms"][batch])
        assert target <= reached <= target + 0.06, (batch, reached)  # reaches the target and stops soon after
    assert report.reduction >= target and report.latency["rounds"] <= settings.rounds


def test_shrink_is_exact_and_widths_follow_round_to(resnet18):
    model, x = copy.deepcopy(resnet18), torch.randn(2, 3, 32, 32)
    report = penni.prune_channels(model, 0.5, x, cost="latency", latency=LatencySettings(measure=fake_ms))
    assert report.latency["round_to"] == 8
    for small in (penni.shrink(model, x), penni.shrink(model, x, round_to=report.latency["round_to"])):
        with torch.no_grad():
            reference, got = model.eval()(x), small.eval()(x)
        assert float((got - reference).abs().max() / reference.abs().max()) <= 1e-5
        widths = {n: m.out_channels for n, m in small.named_modules() if isinstance(m, nn.Conv2d)}
        full = {n: m.out_channels for n, m in resnet18.named_modules() if isinstance(m, nn.Conv2d)}
        assert any(widths[n] < full[n] for n in full)
        assert all(widths[n] % 8 == 0 for n in widths), widths


def test_real_measurement_runs_without_asserting_speed(tmp_path):
    model, x = small_net(), torch.randn(1, 3, 8, 8)
    runtimes = ["torch"] + (["onnxruntime"] if _has("onnxruntime") and _has("onnx") else [])
    for runtime in runtimes:
        settings = LatencySettings(runtime=runtime, grid=(0.5, 1.0), repeats=2, cache_dir=tmp_path)
        table = latency_table(model, x, settings)
        values = [table.layer_ms(n, s.out, s.inp, 1) for n, s in table.specs.items()]
        assert all(math.isfinite(v) and v > 0 for v in values)
        assert all(v > 0 for v in measure_model(model, x, settings).values())


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def floored_ms(module: nn.Module, inputs: tuple) -> float:
    """A launch-bound device: every layer costs what it would at 32 channels once it is narrower (GPU-like)."""
    def layer(m: nn.Module, out: torch.Tensor) -> float:
        pixels, _, cout, cin = _shape(m, out)
        return 0.02 + pixels * max(cout, 32) * max(cin, 32) * 1e-6

    return _per_layer_ms(module, inputs, layer)


def test_unreachable_target_prunes_only_what_saves_latency(resnet18):
    """A speed-up the device cannot give (most of the latency is a floor no width removes) must not prune channels
    that save nothing: the selection stops where the table's savings end instead of emptying every layer."""
    model, x = copy.deepcopy(resnet18), torch.randn(2, 3, 32, 32)
    settings = LatencySettings(batch_sizes=(1,), measure=floored_ms, grid=(0.125, 0.25, 0.5, 0.75, 1.0))
    report = penni.prune_channels(model, 0.95, x, cost="latency", latency=settings)
    small = penni.shrink(model, x)
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert min(widths) >= 32, widths  # below 32 channels nothing is faster: nothing pruned there
    assert report.latency["speedup"][1] < 1 / (1 - 0.95)  # the target was out of reach, and says so
    assert report.latency["rounds"] <= settings.rounds


def test_timing_in_another_dtype_and_layout_leaves_the_model_alone():
    """bf16 / channels-last timings run on a copy: the caller's float32 model is not cast in place."""
    from penni.latency import time_module

    model, x = small_net(), torch.randn(1, 3, 8, 8)
    settings = LatencySettings(dtype=torch.bfloat16, channels_last=True, repeats=1)
    assert time_module(model, (x,), settings) > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model[0].weight.is_contiguous()
    with pytest.raises(ValueError, match="float32"):
        LatencySettings(runtime="onnxruntime", dtype=torch.bfloat16)
