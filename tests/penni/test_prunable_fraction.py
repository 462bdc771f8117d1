"""penni.prunable_fraction previews what the element pruning rule would remove, without changing the model."""
from __future__ import annotations

import copy

import pytest
import torch

import penni
from penni.models import build_model


@pytest.mark.parametrize("rule,kwargs", [("std", {"s": 1.0}), ("std", {"s": 0.5}), ("sparsity", {"target": 0.8})])
def test_preview_equals_what_prune_removes(rule: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = penni.decompose(build_model("fashion_cnn", num_classes=10, in_channels=1), d=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    preview = penni.prunable_fraction(model, rule=rule, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the preview changed the model"
    pruned = copy.deepcopy(model)
    penni.prune(pruned, rule=rule, **kwargs)
    assert preview == pytest.approx(penni.coefficient_sparsity(pruned), abs=1e-9)
    assert 0.0 < preview < 1.0


def test_zeros_already_there_count_as_removed() -> None:
    model = penni.decompose(build_model("fashion_cnn", num_classes=10, in_channels=1), d=3)
    with torch.no_grad():
        for layer in penni.penni_layers(model).values():
            layer.coefficients.zero_()
    assert penni.prunable_fraction(model, rule="std", s=1.0) == 1.0
