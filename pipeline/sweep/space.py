"""The search space of a sweep: names of its trials, and the trials drawn from the ``sweep:`` section."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence


class SweepUsageError(ValueError):
    """A bad command line or sweep section; the message says what to fix."""


@dataclass(frozen=True)
class TrialSpec:
    """One trial: its index, run name and the values it tries (d, l1, optionally prune_s, channel_target)."""

    index: int
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> list[str]:
        """The config overrides that make the trial's values."""
        out = [f"decompose.d={int(self.params['d'])}", f"retrain.l1={json.dumps(float(self.params['l1']))}"]
        if "prune_s" in self.params:
            out.append(f"prune.s={json.dumps(float(self.params['prune_s']))}")
        if "channel_target" in self.params:
            out.append(f"prune.target_dense_macs_reduction={json.dumps(float(self.params['channel_target']))}")
        return out


def l1_tag(l1: float) -> str:
    """Short, exact, filesystem-safe text of λ: 0.003 -> '0.003', 1e-05 -> '1e-5', 1e+20 -> '1e20'."""
    return repr(float(l1)).replace("e+", "e").replace("e-0", "e-")


def trial_name(sweep_name: str, index: int) -> str:
    """``<sweep>-t00``: a trial's run name (its values are in the trial table and its MLflow params)."""
    return f"{sweep_name}-t{int(index):02d}"


def base_name(sweep_name: str) -> str:
    return f"{sweep_name}-base"


def sweep_dir_name(sweep_name: str) -> str:
    """The directory of the sweep's own outputs (plan, trial table, Pareto front, MLflow parent id)."""
    return f"{sweep_name}-sweep"


def draw_trials(sweep: Any, sweep_name: str, seed: int) -> list[TrialSpec]:
    """``sweep.num_samples`` trials: d (and prune_s, channel_target) uniformly from their lists, λ log-uniform
    between the two bounds of ``sweep.l1`` (3 significant digits). Seeded: the same section draws the same
    trials, and raising num_samples keeps the first ones (a rerun resumes them)."""
    rng = random.Random(f"penni-sweep-{seed}")
    low, high = (float(v) for v in sweep.l1)
    trials = []
    for index in range(sweep.num_samples):
        params: dict[str, Any] = {"d": int(rng.choice(list(sweep.d)))}
        params["l1"] = float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}")
        for key in ("prune_s", "channel_target"):
            values = getattr(sweep, key)
            params[key] = float(rng.choice(list(values))) if values else None
        trials.append(TrialSpec(index, trial_name(sweep_name, index),
                                {k: v for k, v in params.items() if v is not None}))
    return trials


def parse_list(text: str, flag: str, kind: type) -> list:
    """``"3,5,7"`` -> ``[3, 5, 7]`` (duplicates dropped, order kept); a SweepUsageError names the bad item."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise SweepUsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    values: list = []
    for item in items:
        if not item:
            raise SweepUsageError(f"{flag}: empty item in {text!r} (write e.g. {'3,5' if kind is int else '1e-5,1e-3'})")
        value = _parse_item(item, flag, kind)
        if value not in values:
            values.append(value)
    return values


def _parse_item(item: str, flag: str, kind: type):
    if kind is int:
        try:
            value = int(item)
        except ValueError:
            raise SweepUsageError(f"{flag}: {item!r} is not a whole number (an int >= 1)") from None
        if value < 1:
            raise SweepUsageError(f"{flag}: {value} must be >= 1")
        return value
    try:
        value = float(item)
    except ValueError:
        raise SweepUsageError(f"{flag}: {item!r} is not a number (e.g. 1e-3)") from None
    if not math.isfinite(value) or value <= 0:
        raise SweepUsageError(f"{flag}: {item!r} must be a finite number > 0")
    return value


def list_override(key: str, values: Sequence) -> str:
    """``sweep.d=[3, 5]`` from a parsed list."""
    return f"sweep.{key}={json.dumps(list(values))}"
