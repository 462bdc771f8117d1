"""Ray Tune over the pending trials: resources per trial, how many at once, ASHA, and the outcome of each."""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..config.loading import to_dict
from .plan import SweepPlan
from .space import SweepUsageError, TrialSpec
from .trial import run_trial


def trial_reservation(plan: SweepPlan) -> dict[str, float]:
    """What Tune reserves for a trial's own process, which runs its non-training stages: one CPU (and one
    GPU with ray.use_gpu) on Ray Train, whose workers are scheduled beside it; in-process, the workers' share."""
    ray_cfg, sweep = plan.base_cfg.ray, plan.sweep
    if sweep.in_process:
        return {"CPU": max(1.0, sweep.workers_per_trial * ray_cfg.cpus_per_worker), "GPU": float(ray_cfg.use_gpu)}
    return {"CPU": 1.0, "GPU": float(ray_cfg.use_gpu)}


def trial_peak(plan: SweepPlan) -> dict[str, float]:
    """The most a running trial holds at once: its own process plus its Ray Train workers."""
    ray_cfg, sweep = plan.base_cfg.ray, plan.sweep
    own = trial_reservation(plan)
    if sweep.in_process:
        return own
    return {"CPU": own["CPU"] + sweep.workers_per_trial * ray_cfg.cpus_per_worker,
            "GPU": own["GPU"] + float(sweep.workers_per_trial if ray_cfg.use_gpu else 0)}


def concurrent_trials(plan: SweepPlan, cluster: dict[str, float]) -> int:
    """How many trials run at once so that none waits for its own workers: what the cluster holds,
    capped by ``sweep.max_concurrent_trials``; a SweepUsageError when not even one trial fits."""
    peak = trial_peak(plan)
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in peak.items() if v > 0)
    if fits < 1:
        need = ", ".join(f"{v:g} {k}" for k, v in peak.items() if v > 0)
        have = ", ".join(f"{cluster.get(k, 0.0):g} {k}" for k, v in peak.items() if v > 0)
        raise SweepUsageError(f"one trial needs {need} at once (its process, {plan.sweep.workers_per_trial} Ray Train "
                              f"worker(s) x ray.cpus_per_worker) but the cluster has {have}: lower "
                              "sweep.workers_per_trial or ray.cpus_per_worker, or add nodes")
    wanted = plan.sweep.max_concurrent_trials
    return fits if wanted is None else min(wanted, fits)


def epochs_per_trial(plan: SweepPlan) -> int:
    """Reports of a full trial: one per retrain and fine-tune epoch, and the final one (ASHA's max_t)."""
    return plan.base_cfg.retrain.epochs + plan.trial_finetune_epochs + 1


def build_scheduler(plan: SweepPlan):
    """ASHA on validation top-1 per reported epoch (None: ``sweep.scheduler=none``)."""
    if plan.sweep.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=max(epochs_per_trial(plan), plan.sweep.grace_period),
                         grace_period=plan.sweep.grace_period, reduction_factor=2)


def run_tune(plan: SweepPlan, pending: list[TrialSpec], *, sweep_run_id: str | None, base_sha: str,
             concurrency: int):
    """The Tuner over ``pending`` (a grid over their indices: the trials were drawn by the plan); the ResultGrid."""
    from ray import tune

    spec = {"sweep_name": plan.sweep_name, "tracking_uri": plan.tracking_uri,
            "sweep_run_id": sweep_run_id, "base_sha256": base_sha, "cwd": plan.cwd, "config_label": plan.config_label,
            "threads_per_trial": trial_reservation(plan)["CPU"],
            "trials": {str(t.index): {"params": t.params, "config": to_dict(plan.trial_config(t))} for t in pending}}
    reservation = {k: v for k, v in trial_reservation(plan).items() if v > 0}
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), reservation)
    names = {t.index: t.name for t in pending}
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.index for t in pending])},
        tune_config=tune.TuneConfig(metric="val_top1", mode="max", scheduler=build_scheduler(plan),
                                    max_concurrent_trials=concurrency, trial_name_creator=_TrialName(names),
                                    trial_dirname_creator=_TrialDirName(names)),
        run_config=tune.RunConfig(name=plan.sweep_name, storage_path=str(Path(plan.storage) / "_tune"),
                                  failure_config=tune.FailureConfig(max_failures=plan.max_failures), verbose=1,
                                  callbacks=_release_callbacks(plan, pending)),
    )
    return tuner.fit()


def _release_callbacks(plan: SweepPlan, pending: list[TrialSpec]) -> list:
    """The driver-side release of the Ray Train resources of trials that ended (see release.py)."""
    if plan.sweep.in_process:
        return []
    from .release import RECORD_FILE, ReleaseEndedTrials

    return [ReleaseEndedTrials({t.index: str(Path(plan.storage) / t.name / RECORD_FILE) for t in pending})]


class _TrialName:
    """Tune's trial name = the trial's run name (picklable: Tune may ship it)."""

    def __init__(self, names: dict[int, str]):
        self.names = names

    def __call__(self, trial) -> str:
        return self.names[int(trial.config["trial"])]


class _TrialDirName(_TrialName):
    def __call__(self, trial) -> str:
        return f"{super().__call__(trial)}_{trial.trial_id}"


def error_line(error: BaseException | None) -> str:
    """The exception line of a trial's error (Ray wraps it in a remote traceback), table-safe."""
    if error is None:
        return "no metrics reported"
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if ln.strip()]
    line = lines[-1] if len(lines) > 1 else f"{type(error).__name__}: {lines[0] if lines else ''}"
    return line.replace("|", "/")[:200]
