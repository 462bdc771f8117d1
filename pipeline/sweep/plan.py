"""The sweep's command line and plan, validated before Ray or MLflow start."""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config.loading import apply_overrides, available_configs, load_config
from ..config.schema import PipelineConfig
from .space import SweepUsageError, TrialSpec, base_name, draw_trials, list_override, parse_list, sweep_dir_name

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")

#: flag -> (sweep key, type); each given flag becomes a ``--set sweep.<key>=...`` override
_SCALAR_FLAGS = {"num_samples": int, "workers_per_trial": int, "max_concurrent_trials": int, "scheduler": str,
                 "grace_period": int, "objective": str, "select": str, "max_top1_drop": float, "max_macs": float}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Every flag is optional: its default is the config's ``sweep:`` section (``--set sweep.KEY=VALUE`` too)."""
    p = argparse.ArgumentParser(
        prog="sweep.py", description="Ray Tune sweep over PENNI's d and λ (and optionally the pruning threshold "
        "and channel target): trials on Ray Train, ASHA early stopping, a Pareto front, the winner finished.")
    p.add_argument("--config", default=None,
                   help=f"YAML file or a shipped config name ({', '.join(available_configs())}); default quickstart")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set sweep.max_top1_drop=1.0")
    p.add_argument("--d", help="decompose.d values to choose from, e.g. 3,5,7 (sweep.d)")
    p.add_argument("--l1", help="log-uniform bounds of retrain.l1, e.g. 1e-5,1e-3 (sweep.l1)")
    p.add_argument("--prune-s", help="prune.s values to choose from, e.g. 0.5,1.0 (sweep.prune_s)")
    p.add_argument("--channel-target", help="prune.target_dense_macs_reduction values, e.g. 0.3,0.6")
    p.add_argument("--num-samples", type=int, help="number of trials (sweep.num_samples)")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers of each trial (sweep.workers_per_trial)")
    p.add_argument("--max-concurrent", dest="max_concurrent_trials", type=int,
                   help="at most this many trials at once (default: as many as the cluster holds)")
    p.add_argument("--in-process", action="store_true", help="each trial runs its stages in one process (no Ray Train)")
    p.add_argument("--scheduler", choices=("asha", "none"), help="early stopping (sweep.scheduler)")
    p.add_argument("--grace-period", type=int, help="epochs before ASHA may stop a trial (sweep.grace_period)")
    p.add_argument("--objective", choices=("dense_macs", "latency", "sparse_macs"),
                   help="the cost traded against validation top-1 (sweep.objective)")
    p.add_argument("--select", choices=("fewest_macs_within", "best_top1_under"), help="winner rule (sweep.select)")
    p.add_argument("--max-top1-drop", type=float, help="points under the baseline's val top-1 (sweep.max_top1_drop)")
    p.add_argument("--max-macs", type=float, help="cost limit of best_top1_under (sweep.max_macs)")
    p.add_argument("--no-finish-winner", action="store_true", help="do not run the winner's full-length stages")
    p.add_argument("--trial-finetune-epochs", type=int, default=None,
                   help="fine-tuning epochs of a trial (default: finetune.epochs; the winner always gets those)")
    p.add_argument("--max-failures", type=int, default=0, help="Ray Tune retries of a failed trial (default 0)")
    p.add_argument("--storage", default=None, help="local directory or shared mount (default: the config's)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<storage>/mlflow.db)")
    p.add_argument("--sweep-name", default=None, help="runs <name>-base, <name>-t00... (default: <config name>-sweep)")
    return p.parse_args(list(argv))


def sweep_overrides(args: argparse.Namespace) -> list[str]:
    """The sweep flags given, as ``sweep.*`` overrides (lists checked here, so errors name the flag)."""
    out = []
    for flag, key, kind in (("--d", "d", int), ("--l1", "l1", float), ("--prune-s", "prune_s", float),
                            ("--channel-target", "channel_target", float)):
        text = getattr(args, key)
        if text is not None:
            out.append(list_override(key, parse_list(text, flag, kind)))
    for key in _SCALAR_FLAGS:
        value = getattr(args, key)
        if value is not None:
            out.append(f"sweep.{key}={json.dumps(value)}")
    if args.in_process:
        out.append("sweep.in_process=true")
    if args.no_finish_winner:
        out.append("sweep.finish_winner=false")
    return out


@dataclass
class SweepPlan:
    """Everything the sweep needs, validated; built before Ray or MLflow start."""

    sweep_name: str
    base_cfg: PipelineConfig          # the base run (name <sweep>-base); its sweep section is the sweep's
    trials: list[TrialSpec]
    trial_finetune_epochs: int
    max_failures: int
    tracking_uri: str | None          # None: MLflow is not installed, tracking is off
    cwd: str
    config_label: str = "quickstart"

    @property
    def sweep(self):
        return self.base_cfg.sweep

    @property
    def storage(self) -> str:
        return self.base_cfg.storage

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage) / sweep_dir_name(self.sweep_name)

    @property
    def base_checkpoint(self) -> Path:
        return Path(self.storage) / self.base_cfg.name / "baseline" / "model.safetensors"

    def trial_config(self, trial: TrialSpec) -> PipelineConfig:
        """The trial's pipeline config: the base config with the trial's values, from the shared baseline."""
        return apply_overrides(self.base_cfg, [
            f"name={trial.name}", *trial.overrides(), f"baseline.checkpoint={json.dumps(str(self.base_checkpoint))}",
            "baseline.epochs=0", f"finetune.epochs={self.trial_finetune_epochs}",
            f"ray.num_workers={self.sweep.workers_per_trial}", f"ray.in_process={json.dumps(self.sweep.in_process)}",
            *([f"tracking.uri={json.dumps(self.tracking_uri)}"] if self.tracking_uri else [])])

    def winner_config(self, trial: TrialSpec) -> PipelineConfig:
        """The winner's full-length run: the trial's config with the base config's epochs and workers."""
        base = self.base_cfg
        return apply_overrides(self.trial_config(trial), [
            f"name={trial.name}-full", f"finetune.epochs={base.finetune.epochs}",
            f"ray.num_workers={base.ray.num_workers}", f"ray.in_process={json.dumps(base.ray.in_process)}"])


def build_plan(args: argparse.Namespace) -> SweepPlan:
    """Validate the command line, the sweep section and every trial's config; raises SweepUsageError or ConfigError."""
    if args.max_failures < 0:
        raise SweepUsageError(f"--max-failures: must be >= 0, got {args.max_failures}")
    if args.trial_finetune_epochs is not None and args.trial_finetune_epochs < 1:
        raise SweepUsageError(f"--trial-finetune-epochs: must be >= 1, got {args.trial_finetune_epochs}")
    overrides = [*args.overrides, *sweep_overrides(args)]
    probe = load_config(args.config, overrides)
    sweep_name = args.sweep_name or f"{probe.name}-sweep"
    if not _NAME_RE.fullmatch(sweep_name) or sweep_name in (".", ".."):
        raise SweepUsageError(f"--sweep-name: {sweep_name!r} must match [A-Za-z0-9_.-]+ (no spaces or '/')")
    storage = _local_storage(args.storage if args.storage is not None else probe.storage)
    base_cfg = load_config(args.config, [*overrides, f"name={json.dumps(base_name(sweep_name))}",
                                         f"storage={json.dumps(storage)}"])
    _check_rule(base_cfg.sweep)
    plan = SweepPlan(sweep_name, base_cfg, draw_trials(base_cfg.sweep, sweep_name, base_cfg.seed),
                     args.trial_finetune_epochs or base_cfg.finetune.epochs, args.max_failures, None, os.getcwd(),
                     args.config or "quickstart")
    for trial in plan.trials:  # every trial's config is valid before anything starts
        plan.winner_config(trial)
    _check_machine(plan, args.tracking_uri)
    return plan


def _local_storage(storage: str) -> str:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", storage) and not storage.startswith("file://"):
        raise SweepUsageError(
            f"--storage: {storage!r} is a remote URI; a sweep needs a local directory or a mount shared by all "
            "nodes (every trial loads the base run's baseline model from a file path)")
    return str(Path(storage.removeprefix("file://")).expanduser().resolve())


def _check_rule(sweep) -> None:
    if sweep.select == "best_top1_under" and sweep.max_macs is None:
        raise SweepUsageError("sweep.select=best_top1_under needs sweep.max_macs (the cost limit, in the unit of "
                              "sweep.objective: MACs, or ms for latency); set it with --max-macs")


def _check_machine(plan: SweepPlan, cli_uri: str | None) -> None:
    """The runner's preflight (files, storage, data) and the tracking URI."""
    from ..cli.launch import preflight

    problems = preflight(plan.base_cfg)
    if problems:
        raise SweepUsageError("the configuration does not fit this machine:\n" + "\n".join(f"  - {p}" for p in problems))
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print("MLflow is not installed: tracking is off (pip install 'mlflow>=3.7,<4')")
        return
    from ..tracking.uri import TrackingError, resolve_tracking_uri

    try:
        plan.tracking_uri = resolve_tracking_uri(cli_uri, plan.base_cfg.tracking.uri, Path(plan.storage))
    except TrackingError as err:
        raise SweepUsageError(str(err)) from None
