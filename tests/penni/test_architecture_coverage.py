"""Channel pruning and exact shrink through the CNNs users bring: every torchvision classification CNN and 30+
timm families (smallest variant, ``pretrained=False``; the list and the measurement are in
``tests/penni/architectures.py``, shared with ``benchmarks/architecture_coverage.py``).

Each case: ``decompose``, ``prune_channels`` to -50% dense MACs lands within 2% (FlopCounterMode on
``to_torch`` of the shrunk model against the original), ``shrink`` is exact to 1e-5 relative against the masked
model, and ``to_torch`` + ``torch.export`` succeed. Models penni does not cover yet are strict xfails with the
reason, so this test fails the day one starts working.
"""
from __future__ import annotations

import pytest

from tests.penni.architectures import CASES, TARGET, run_penni

NOT_YET = {
    "timm:skresnet18": "selective-kernel attention stacks the paths on a new dim 1 (torch.stack): channels kept",
    "timm:mixnet_s": "MixedConv2d splits its input channels at fixed sizes (torch.split): those channels are kept",
    "timm:nf_regnet_b0": "ScaledStdConv2d standardizes its weight in the graph (F.batch_norm on a computed weight)",
}


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=NOT_YET[case.id])] if case.id in NOT_YET else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # prune_channels warns when it falls short: asserted below
@pytest.mark.parametrize("case", list(_params()))
def test_prune_shrink_export(case) -> None:
    outcome = run_penni(case)
    assert outcome.reason is None, outcome.reason
    assert abs(outcome.reached - TARGET) <= 0.02, f"reached {100 * outcome.reached:.1f}% fewer dense MACs"
    assert outcome.exact < 1e-5, f"shrink is off by {outcome.exact:.1e} (relative)"
    assert outcome.exported


def test_the_list_covers_the_families() -> None:
    """At least 40 CNNs, every torchvision classification family and 25+ timm families."""
    libraries = [c.library for c in CASES]
    assert len(CASES) >= 40 and libraries.count("timm") >= 25
    torchvision_names = {c.name for c in CASES if c.library == "torchvision"}
    for family in ("resnet", "resnext", "wide_resnet", "vgg", "mobilenet_v2", "mobilenet_v3", "efficientnet_b",
                   "efficientnet_v2", "regnet", "shufflenet", "squeezenet", "mnasnet", "densenet", "googlenet",
                   "inception", "alexnet", "convnext"):
        assert any(n.startswith(family) for n in torchvision_names), family
