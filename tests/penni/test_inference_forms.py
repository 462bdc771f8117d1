"""Every inference form of PenniConv2d gives the dense form's outputs; optimize_for_inference picks one."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import penni
from penni import INFERENCE_MODES, PenniConv2d
from penni.models import build_model


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def sparsify_layer(layer: PenniConv2d, level: str, seed: int = 0) -> None:
    """Zero coefficients: a fraction at random, or whole input channels (and some entries)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        coeff = layer.coefficients
        if level == "dead_inputs":
            coeff[:, ::2] = 0
            coeff.mul_(torch.rand(coeff.shape, generator=g) >= 0.5)
        elif level == "all_zero":
            coeff.zero_()
        else:
            coeff.mul_(torch.rand(coeff.shape, generator=g) >= float(level))


GEOMETRIES = [  # (stride, padding, dilation, bias, groups)
    (1, 1, 1, True, 1), (2, 0, 1, False, 1), (1, 2, 2, True, 1), (2, "valid", 1, True, 1),
    (1, "same", 1, False, 1), (2, 1, 1, True, 2), (1, 1, 1, False, 4),
]
LEVELS = ["0.0", "0.9", "0.99", "dead_inputs", "all_zero"]
CASES = [(g, level, d) for (g, level), d in zip(itertools.product(GEOMETRIES, LEVELS), itertools.cycle(range(1, 10)))]


@pytest.mark.parametrize("geometry,level,d", CASES, ids=[f"{g}-{lv}-d{d}" for g, lv, d in CASES])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_inference_form_gives_the_dense_outputs(geometry, level, d, batch):
    stride, padding, dilation, bias, groups = geometry
    torch.manual_seed(d)
    layer = PenniConv2d(8, 12, 3, d, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    sparsify_layer(layer, level, seed=d)
    layer.eval()
    x = torch.randn(batch, 8, 9, 10)
    layer.set_forward_mode("dense")
    with torch.inference_mode():
        expected = layer(x)
        for mode in INFERENCE_MODES:
            layer.set_forward_mode(mode)
            got = layer(x)
            assert got.shape == expected.shape, mode
            if level == "all_zero" and not bias:
                assert not got.any(), mode
            else:
                assert rel_err(got, expected) <= 1e-5, mode


def test_sparse_forms_drop_dead_input_channels_and_rebake():
    layer = PenniConv2d(6, 4, 3, 3, padding=1).eval()
    with torch.no_grad():
        layer.coefficients[:, [1, 4]] = 0
    layer.set_forward_mode("factorized_sparse")
    assert layer._baked_keep.tolist() == [0, 2, 3, 5]
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        layer.coefficients[:, 0] = 0  # parameters changed: the baked form is stale until the mode is set again
        layer.set_forward_mode("factorized_sparse")
        got = layer(x)
        layer.set_forward_mode("dense")
        assert rel_err(got, layer(x)) <= 1e-5
    assert layer._baked_mix_values is None and layer._baked_keep is None


def test_sparse_form_survives_deepcopy_and_dtype_moves():
    layer = PenniConv2d(5, 7, 3, 4, padding=1).eval()
    sparsify_layer(layer, "0.9")
    layer.set_forward_mode("factorized_batched_sparse")
    other = copy.deepcopy(layer).to(torch.float64)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(x, layer.reconstructed_weight().double(), layer.bias.double(), padding=1)
        assert other._baked_mix_values.dtype == torch.float64 and rel_err(other(x), expected) <= 1e-6


def _compressed(arch: str, shape: tuple[int, ...], sparsity: float = 0.9) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=shape[1]).eval()
    penni.decompose(model, d=5)
    penni.prune(model, rule="sparsity", target=sparsity)
    x = torch.randn(*shape)
    return penni.shrink(model, x).eval(), x


def test_optimize_for_inference_sets_valid_modes_returns_a_table_and_round_trips(tmp_path):
    model, x = _compressed("fashion_cnn", (2, 1, 28, 28))
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
    plan = penni.optimize_for_inference(model, x, repeats=2)
    layers = penni.penni_layers(model)
    assert {row.name for row in plan.layers} == set(layers)
    assert all(set(row.timings_ms) == set(INFERENCE_MODES) for row in plan.layers)
    assert plan.modes == {name: layer.forward_mode for name, layer in layers.items()}
    assert all(mode in INFERENCE_MODES for mode in plan.modes.values())
    assert plan.kept in ("per-layer", "all-dense") and plan.model_ms <= plan.dense_model_ms
    table = plan.to_markdown()
    assert all(name in table for name in layers) and "kept:" in table
    assert plan.to_dict()["modes"] == plan.modes
    with torch.no_grad():
        assert rel_err(model(x), expected) <= 1e-5
    # the choice survives save/load, and every non-dense form is tried there too
    forms = list(INFERENCE_MODES[1:])
    for i, layer in enumerate(layers.values()):
        layer.set_forward_mode(forms[i % len(forms)])
    chosen = {name: layer.forward_mode for name, layer in layers.items()}
    penni.save(model, tmp_path / "m.safetensors")
    loaded = penni.load(tmp_path / "m.safetensors").eval()
    assert {name: layer.forward_mode for name, layer in penni.penni_layers(loaded).items()} == chosen
    with torch.no_grad():
        assert rel_err(loaded(x), expected) <= 1e-5


def test_optimize_for_inference_rejects_bad_arguments():
    model, x = _compressed("fashion_cnn", (1, 1, 28, 28))
    with pytest.raises(ValueError, match="forms must be among"):
        penni.optimize_for_inference(model, x, forms=("factorized", "magic"))
    with pytest.raises(ValueError, match="repeats"):
        penni.optimize_for_inference(model, x, repeats=0)
