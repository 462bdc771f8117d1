"""What became of each trial: finished (its recorded result), stopped early by ASHA, or failed."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..storage.run_store import RunStore
from .plan import SweepPlan
from .space import TrialSpec
from .trial import finished_result

STATE_FILE = "state.json"   # in the sweep directory: trials stopped early (a rerun does not restart them)


@dataclass
class Outcomes:
    finished: list[dict] = field(default_factory=list)   # one row per finished trial: run, values, metrics
    stopped: list[dict] = field(default_factory=list)    # run, values, last val_top1, epochs reported
    failed: list[dict] = field(default_factory=list)     # run, values, error line


def sweep_store(plan: SweepPlan) -> RunStore:
    """The sweep's own directory as a run store (its state files, its MLflow parent id)."""
    return RunStore(plan.storage, plan.sweep_dir.name)


def read_state(plan: SweepPlan) -> dict:
    return sweep_store(plan).read_json(STATE_FILE) or {}


def write_state(plan: SweepPlan, state: dict) -> None:
    sweep_store(plan).write_json_atomic(STATE_FILE, state)


def finished_rows(plan: SweepPlan, base_sha: str) -> dict[str, dict]:
    """Run name -> table row of every planned trial that finished (with these values, from this baseline)."""
    rows = {}
    for trial in plan.trials:
        metrics = finished_result(RunStore(plan.storage, trial.name), trial.params, base_sha)
        if metrics is not None:
            rows[trial.name] = {"run": trial.name, **metrics}
    return rows


def stopped_earlier(plan: SweepPlan, base_sha: str) -> dict[str, dict]:
    """Trials an earlier run of this sweep stopped early (same values, same baseline)."""
    by_name = {t.name: t for t in plan.trials}
    stopped = read_state(plan).get("stopped", {})
    return {name: row for name, row in stopped.items()
            if name in by_name and row.get("params") == by_name[name].params and row.get("base_sha256") == base_sha}


def pending_trials(plan: SweepPlan, base_sha: str) -> list[TrialSpec]:
    """The trials still to run: neither finished nor stopped early by an earlier run of the sweep."""
    done = set(finished_rows(plan, base_sha)) | set(stopped_earlier(plan, base_sha))
    return [t for t in plan.trials if t.name not in done]


def collect(plan: SweepPlan, results, base_sha: str) -> Outcomes:
    """Every planned trial's outcome: the result files first, then what Tune says of the others."""
    from .tuning import error_line

    out = Outcomes(finished=list(finished_rows(plan, base_sha).values()))
    by_name = {t.name: t for t in plan.trials}
    stopped = stopped_earlier(plan, base_sha)
    done = {r["run"] for r in out.finished}
    for result in results or []:
        trial = plan.trials[int((result.config or {})["trial"])]
        if trial.name in done:
            continue
        metrics = result.metrics or {}
        if result.error is not None:
            out.failed.append({"run": trial.name, **trial.params, "error": error_line(result.error)})
        else:
            stopped[trial.name] = {"params": trial.params, "base_sha256": base_sha,
                                   "val_top1": metrics.get("val_top1"), "epochs": metrics.get("training_iteration")}
    out.stopped = [{"run": name, **by_name[name].params, **row} for name, row in sorted(stopped.items())]
    write_state(plan, {**read_state(plan), "stopped": stopped})
    return out
