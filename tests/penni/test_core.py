"""Core layer tests: decomposition exactness, forward modes, held masks, L1, alternation."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import penni
from penni.masking import get_mask, raw_parameter
from penni.models import build_model
from tests.helpers import randomize_batchnorm

torch.manual_seed(0)

MODELS = [
    ("vgg16", 32), ("resnet18", 32), ("resnet56", 32),
    ("torchvision:resnet18", 64), ("torchvision:resnet50", 64),
]



def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@pytest.mark.parametrize("arch,size", MODELS)
def test_full_rank_decomposition_reproduces_model(arch, size):
    model = build_model(arch, num_classes=10, in_channels=3).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        penni.decompose(model, d=49)  # capped at kh*kw per layer: exact
        got = model(x)
    layers = penni.penni_layers(model)
    assert layers and all(m.d == m.kernel_size[0] * m.kernel_size[1] for m in layers.values())
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.groups == 1 for m in model.modules())
    assert rel_err(got, expected) <= 1e-5


def test_decompose_keeps_the_mean_kernel():
    """The reference's PCA dropped the mean: a layer whose kernels share a large mean would be
    shifted. An uncentered SVD with d=1 keeps a rank-1 layer exactly."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(6, 4, 1, 1) * torch.randn(3, 3) + 0.0)
    model = nn.Sequential(conv)
    x = torch.randn(1, 4, 8, 8)
    expected = model(x)
    penni.decompose(model, d=1)
    assert rel_err(model(x), expected) < 1e-5


def test_decompose_per_layer_d_and_exclusion():
    model = build_model("vgg16", in_channels=3)
    penni.decompose(model, d={"features.conv1_1": 3, "features.conv5_*": 2, "default": 5},
                    exclude=["features.conv2_1"])
    layers = penni.penni_layers(model)
    assert layers["features.conv1_1"].d == 3
    assert layers["features.conv5_3"].d == 2
    assert layers["features.conv3_1"].d == 5
    assert "features.conv2_1" not in layers
    assert penni.get_recipe(model).decomposed["features.conv1_1"] == 3
    model2 = penni.decompose(build_model("resnet18"), d=lambda name, conv: 4 if "layer4" in name else None)
    assert all("layer4" in n for n in penni.penni_layers(model2))


def test_depthwise_stays_dense_and_grouped_is_exact():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 12, 3, padding=1, groups=4))
    x = torch.randn(2, 8, 9, 9)
    expected = model(x)
    penni.decompose(model, d=9)
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1], penni.PenniConv2d)
    for mode in penni.FORWARD_MODES:
        penni.set_forward_mode(model, mode)
        assert rel_err(model(x), expected) <= 1e-5, mode


@pytest.mark.parametrize("stride,padding,dilation,bias,k", [
    (1, 1, 1, True, 3), (2, 1, 1, False, 3), (2, 2, 2, True, 3), (1, 0, 1, True, 5), (2, 3, 1, True, 7),
])
def test_forward_modes_agree(stride, padding, dilation, bias, k):
    for d in range(1, k * k + 1, max(1, (k * k) // 6)):
        layer = penni.PenniConv2d(5, 7, k, d, stride=stride, padding=padding, dilation=dilation, bias=bias)
        x = torch.randn(2, 5, 17, 12)  # non-square
        layer.set_forward_mode("reconstruct")
        ref = layer(x)
        for mode in ("factorized", "dense"):
            layer.set_forward_mode(mode)
            assert rel_err(layer(x), ref) <= 1e-5, (mode, d)


def test_factorized_mode_trains_the_same_gradients():
    layer = penni.PenniConv2d(3, 4, 3, 4, padding=1)
    x = torch.randn(2, 3, 6, 6)
    grads = {}
    for mode in ("reconstruct", "factorized"):
        layer.zero_grad()
        layer.set_forward_mode(mode)
        layer(x).square().sum().backward()
        grads[mode] = (layer.basis.grad.clone(), layer.coefficients.grad.clone())
    for a, b in zip(grads["reconstruct"], grads["factorized"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_l1_penalty():
    model = penni.decompose(build_model("resnet18"), d=5)
    expected = sum(m.coefficients.abs().sum() for m in penni.penni_layers(model).values())
    assert torch.allclose(penni.l1_penalty(model), expected)
    pointwise = sum(m.weight.abs().sum() for m in model.modules()
                    if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    assert torch.allclose(penni.l1_penalty(model, include_pointwise=True), expected + pointwise)


def _train_steps(model, optimizer, steps):
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 1e-3 * penni.l1_penalty(model)
        loss.backward()
        optimizer.step()


def _pruned_entries_are_zero(model) -> bool:
    ok = True
    for _, module, tensor_name, mask in penni.masking.iter_masks(model):
        ok &= bool((getattr(module, tensor_name)[mask == 0] == 0).all())
    return ok


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_masks_hold_through_training_and_resumed_state(opt):
    model = penni.decompose(build_model("resnet18", in_channels=3), d=5).train()

    def make_opt(m):
        if opt == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)

    optimizer = make_opt(model)
    _train_steps(model, optimizer, 3)          # momentum / Adam state is non-zero everywhere now
    sparsity = penni.prune(model, rule="std", s=1.0, include_pointwise=True)
    assert all(0.4 < s < 0.9 for s in sparsity.values())
    masked = list(penni.masking.iter_masks(model))
    assert len(masked) == len(penni.penni_layers(model)) + 3  # 3 pointwise shortcut convs
    # the optimizer must now track the parametrization's originals
    optimizer2 = make_opt(model)
    _train_steps(model, optimizer2, 50)
    assert _pruned_entries_are_zero(model)
    # save and reload optimizer state, continue training
    buf = io.BytesIO()
    torch.save(optimizer2.state_dict(), buf)
    buf.seek(0)
    optimizer3 = make_opt(model)
    optimizer3.load_state_dict(torch.load(buf, weights_only=True))
    _train_steps(model, optimizer3, 50)
    assert _pruned_entries_are_zero(model)
    # kept entries did learn
    layer = next(iter(penni.penni_layers(model).values()))
    assert (layer.coefficients != 0).any()


def test_mask_hold_survives_stale_momentum_on_raw_parameter():
    """Even when an optimizer keeps a momentum buffer for a pruned entry (resumed state from
    before pruning), the effective value the layer computes with stays exactly zero."""
    layer = penni.PenniConv2d(4, 4, 3, 5, padding=1)
    penni.prune(nn.Sequential(layer), rule="sparsity", target=0.5)
    raw = raw_parameter(layer, "coefficients")
    opt = torch.optim.SGD([raw], lr=0.1, momentum=0.9)
    opt.state[raw]["momentum_buffer"] = torch.ones_like(raw)  # stale velocity everywhere
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(1, 4, 6, 6)).sum().backward()
        opt.step()
    mask = get_mask(layer, "coefficients")
    assert (layer.coefficients[mask == 0] == 0).all()
    assert abs(float(1 - mask.mean()) - 0.5) < 0.02


def test_prune_global_sparsity_target_and_masks_combine():
    model = penni.decompose(build_model("vgg16", in_channels=3), d=5)
    penni.prune(model, rule="sparsity", target=0.8)
    assert abs(penni.coefficient_sparsity(model) - 0.8) < 0.01
    penni.prune(model, rule="sparsity", target=0.9)
    assert penni.coefficient_sparsity(model) >= 0.9 - 0.01
    with pytest.raises(ValueError, match="target"):
        penni.prune(model, rule="sparsity")
    with pytest.raises(ValueError, match="decompose"):
        penni.prune(build_model("vgg16"))


def test_alternating_schedule_phases():
    s = penni.AlternatingSchedule(every=2, start_with="coefficients")
    assert [s.phase(e) for e in range(6)] == ["coefficients"] * 2 + ["basis"] * 2 + ["coefficients"] * 2
    j = penni.AlternatingSchedule(every=1, start_with="joint")
    assert [j.phase(e) for e in range(4)] == ["joint", "basis", "coefficients", "basis"]
    with pytest.raises(ValueError):
        penni.AlternatingSchedule(every=0)


def test_alternating_schedule_freezes_by_gradient_dropping():
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5)
    schedule = penni.AlternatingSchedule(every=1, start_with="coefficients")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    layer = next(iter(penni.penni_layers(model).values()))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for epoch in range(2):
        schedule.start_epoch(model, opt, epoch)
        before = (layer.basis.detach().clone(), layer.coefficients.detach().clone())
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        schedule.drop_frozen_gradients(model, epoch)
        opt.step()
        basis_moved = not torch.equal(before[0], layer.basis)
        coef_moved = not torch.equal(before[1], layer.coefficients)
        assert (basis_moved, coef_moved) == ((False, True) if epoch == 0 else (True, False))
    assert all(p.requires_grad for p in model.parameters())  # never toggled (DDP-safe)


def test_decompose_a_layer_with_fewer_kernels_than_d():
    """A 1 -> 4 channel 3x3 stem has 4 kernels; d=5 still gives 5 basis kernels (the extra one unused), exactly."""
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        penni.decompose(model, d=5)
        assert model[0].basis.shape == (5, 3, 3) and model[0].coefficients.shape == (4, 1, 5)
        assert torch.allclose(model(x), expected, atol=1e-5)  # 4 kernels span at most 4 directions: exact
