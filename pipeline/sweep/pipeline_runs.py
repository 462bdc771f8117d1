"""The sweep's pipeline runs outside Tune: the shared baseline before the trials, the winner's full-length run after."""
from __future__ import annotations

import shutil

from ..stages.table import STAGES
from ..storage.run_store import RunStore
from .mlflow_runs import child_tags
from .plan import SweepPlan
from .space import TrialSpec


def _locked(store):
    from ..storage.lock import RunLock

    return RunLock(store).acquire(wait=None)


def run_base(plan: SweepPlan, sweep_run_id: str | None) -> dict:
    """Step 1: the base run's baseline stage (skipped when done); returns its manifest."""
    from ..cli.launch import use_ray as _use_ray
    from ..stages.dag import Pipeline
    from ..tracking.runs import parent_run

    cfg = plan.base_cfg
    store = RunStore(cfg.storage, cfg.name)
    lock = _locked(store)
    try:
        with parent_run(cfg, plan.tracking_uri, store, child_tags(plan, sweep_run_id, "base"),
                        config_name=plan.config_label) as tracker:
            Pipeline(cfg, use_ray=_use_ray(cfg), tracker=tracker).run(stages=["baseline"])
            manifest = store.read_manifest("baseline")
            if tracker is not None:
                tracker.log_parent_metrics({"baseline_val_top1": baseline_val_top1(manifest)})
    finally:
        lock.release()
    return manifest


def baseline_val_top1(manifest: dict) -> float:
    """The baseline's validation top-1 (the reference of ``sweep.max_top1_drop``)."""
    metrics = manifest.get("metrics", {})
    return float(metrics.get("selected_val_top1", metrics.get("val_top1")))


def seed_winner(plan: SweepPlan, trial: TrialSpec) -> list[str]:
    """Copy the trial's committed stages into the winner's run directory, in pipeline order, while their
    fingerprints equal the winner config's (baseline to prune; fine-tune too when the trial's was full length).
    The winner's run then skips them, like any resumed pipeline run. Returns the stages copied."""
    from ..stages.fingerprints import stage_fingerprints

    cfg = plan.winner_config(trial)
    source, target = RunStore(plan.storage, trial.name), RunStore(plan.storage, cfg.name)
    prints = stage_fingerprints(cfg)
    copied = []
    for stage in STAGES:
        if target.is_complete(stage, prints[stage]):
            continue
        if not source.is_complete(stage, prints[stage]):
            break
        staging = target.local_path(stage).with_name(f"{stage}.seeding")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source.local_path(stage), staging)
        shutil.rmtree(target.local_path(stage), ignore_errors=True)
        staging.rename(target.local_path(stage))
        copied.append(stage)
    return copied


def run_winner(plan: SweepPlan, trial: TrialSpec, sweep_run_id: str | None):
    """Step 3: the winner's full-length pipeline run ``<trial>-full`` (fine-tune at ``finetune.epochs``,
    shrink, evaluate, report) from the trial's committed stages; resumable like any pipeline run.
    Returns ``(config, stage outcomes, stages seeded from the trial)``."""
    from ..cli.launch import log_summary as _log_summary
    from ..cli.launch import use_ray as _use_ray
    from ..stages.dag import Pipeline
    from ..tracking.runs import parent_run

    cfg = plan.winner_config(trial)
    store = RunStore(cfg.storage, cfg.name)
    lock = _locked(store)
    try:
        seeded = seed_winner(plan, trial)
        tags = {**child_tags(plan, sweep_run_id, "winner"), "penni.trial": trial.name}
        with parent_run(cfg, plan.tracking_uri, store, tags, config_name=plan.config_label) as tracker:
            outcomes = Pipeline(cfg, use_ray=_use_ray(cfg), tracker=tracker).run()
            if tracker is not None:
                _log_summary(tracker, store)
    finally:
        lock.release()
    return cfg, outcomes, seeded
