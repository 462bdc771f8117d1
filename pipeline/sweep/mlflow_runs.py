"""The sweep in MLflow: one parent run, every trial (and the base and winner runs) a child of it."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from ..storage.run_store import RunStore
from .outcomes import Outcomes, sweep_store
from .plan import SweepPlan

SWEEP_TAG = "penni.sweep"


def child_tags(plan: SweepPlan, sweep_run_id: str | None, role: str) -> dict:
    """Tags of a run under the sweep's parent run (``mlflow.parentRunId`` nests it in the UI)."""
    return {SWEEP_TAG: plan.sweep_name, "penni.sweep_role": role,
            **({"mlflow.parentRunId": sweep_run_id} if sweep_run_id else {})}


@contextlib.contextmanager
def sweep_parent(plan: SweepPlan) -> Iterator:
    """The sweep's parent run (re-attached on a rerun through the sweep directory's pipeline.json); None
    when tracking is off. Params: the sweep section; FINISHED when the body returns, FAILED on an error."""
    if plan.tracking_uri is None:
        yield None
        return
    from ..config.loading import flatten
    from ..tracking.runs import Tracker

    tracker = Tracker(plan.tracking_uri, plan.base_cfg.tracking.experiment, plan.sweep_dir.name)
    params = {k: v for k, v in flatten(plan.base_cfg).items() if k.startswith("sweep.")}
    params["sweep.trial_finetune_epochs"] = plan.trial_finetune_epochs
    tags = {SWEEP_TAG: plan.sweep_name, "penni.role": "sweep", "penni.config": plan.config_label}
    with tracker.parent_run(params, tags, store=sweep_store(plan)):
        yield tracker


def trial_run_id(plan: SweepPlan, run_name: str) -> str | None:
    """The MLflow run id a pipeline run of the sweep recorded in its pipeline.json."""
    from ..tracking.runs import PARENT_ID_KEY

    return (RunStore(plan.storage, run_name).read_json("pipeline.json") or {}).get(PARENT_ID_KEY)


def end_unfinished_trials(plan: SweepPlan, outcomes: Outcomes) -> None:
    """Trials that Tune stopped (ASHA) or that failed end their MLflow run here: their process was ended
    before it could (KILLED with ``penni.stopped_early=true``, or FAILED)."""
    if plan.tracking_uri is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(plan.tracking_uri)
    for rows, status in ((outcomes.stopped, "KILLED"), (outcomes.failed, "FAILED")):
        for row in rows:
            run_id = trial_run_id(plan, row["run"])
            if run_id is None:
                continue
            if status == "KILLED":
                client.set_tag(run_id, "penni.stopped_early", "true")
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)


def log_sweep(tracker, plan: SweepPlan, files: list[Path], winner: dict | None, rule: str) -> None:
    """The Pareto CSV and PNG, the trial table and the summary on the parent run; the winner tagged there
    and on its trial run."""
    if tracker is None:
        return
    from mlflow.tracking import MlflowClient

    for path in files:
        tracker.log_parent_artifact(path)
    client = MlflowClient(plan.tracking_uri)
    parent = tracker.parent_run_id
    client.set_tag(parent, "penni.select_rule", rule)
    if winner is None:
        client.set_tag(parent, "penni.winner", "none")
        return
    client.set_tag(parent, "penni.winner", winner["run"])
    tracker.log_parent_metrics({f"winner.{k}": v for k, v in winner.items() if isinstance(v, float)})
    run_id = trial_run_id(plan, winner["run"])
    if run_id is not None:
        client.set_tag(run_id, "penni.winner", "true")
