"""Helpers shared by the test modules."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from penni.conv import PenniConv2d


def randomize_batchnorm(model: nn.Module, seed: int = 1, mean_scale: float = 0.1, bias_scale: float = 0.1) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode outputs (and the constants a
    dead channel produces) depend on every channel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * mean_scale)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * bias_scale)


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor holding a layer's kernels: coefficients of a PenniConv2d, else the weight."""
    m = model.get_submodule(name)
    return m.coefficients if isinstance(m, PenniConv2d) else m.weight


def kill_out(model: nn.Module, name: str, channels) -> None:
    """All weights writing output ``channels`` of a conv/linear become zero."""
    with torch.no_grad():
        weight_of(model, name)[list(channels)] = 0


def kill_in(model: nn.Module, name: str, channels) -> None:
    """All weights reading input ``channels`` of a (groups=1) conv or a Linear become zero."""
    with torch.no_grad():
        weight_of(model, name)[:, list(channels)] = 0


class GroupedNet(nn.Module):
    """1x1 -> grouped 3x3 (4 groups of 3 in, 2 out) -> BN -> ReLU -> 1x1, then a depthwise conv with
    channel multiplier 2 -> 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(12)
        self.g = nn.Conv2d(12, 8, 3, padding=1, groups=4, bias=False)
        self.bn_g = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)))
        y = torch.relu(self.bn_g(self.g(y)))
        y = torch.relu(self.bn_b(self.b(y)))
        return self.head(self.dw(y))


def has_train_checkpoint(root: Path, stage: str) -> bool:
    """Ray Train has recorded a checkpoint of ``stage`` under the run root ``root`` (its snapshot names one)."""
    for snapshot in (root / "_train").glob(f"{stage}-*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):
            continue
    return False


def _timed(key: str) -> bool:
    """A value measured with a clock (latencies, speedups, per-layer timings) or chosen by one (the
    inference plan keeps whichever form was fastest): it differs between any two runs."""
    return "latency" in key or key.endswith("_ms") or key == "inference_plans"


def without_timings(obj):
    """``obj`` (a parsed ``evaluation.json``) without the values a clock decides: what two runs must share."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if not _timed(k)}
    return obj


def pipeline_run_status(root: Path) -> str:
    """The status of the one MLflow pipeline (parent) run in the run root's default SQLite store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("penni")
    assert experiment is not None, f"no experiment 'penni' in {root / 'mlflow.db'}"
    runs = client.search_runs([experiment.experiment_id], "tags.`penni.role` = 'pipeline'")
    assert len(runs) == 1, f"expected one pipeline run, found {len(runs)}"
    return runs[0].info.status


def assert_stopped_cleanly(driver, log: Path, root: Path, stage: str, alive) -> None:
    """After a SIGTERM to ``driver``: exit 143 with the resume hint and no traceback, no lock, ``stage`` not
    published, no process of the run left (``alive(pid)``: its live processes), the MLflow parent run KILLED."""
    import time

    code = driver.wait(timeout=120)
    text = log.read_text()
    assert code == 143, f"exit {code}:\n{text[-3000:]}"
    assert "interrupted: re-run the same command to resume" in text and "Traceback" not in text, text[-3000:]
    assert not (root / ".lock").exists(), "the lock was left behind"
    assert not (root / stage / "manifest.json").exists(), f"{stage} was published although it was stopped"
    deadline = time.monotonic() + 60
    while alive(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(driver.pid), "processes of the stopped run are still alive"
    assert pipeline_run_status(root) == "KILLED"
