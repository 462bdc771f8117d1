"""Sweeps over ``decompose.d`` and ``retrain.l1`` (λ) with Ray Tune; every trial is one pipeline run.

    python workflows/sweep.py --config quickstart --d 3,5,7 --l1 1e-3,3e-3
    python workflows/sweep.py --d 3,5,7 --l1 1e-3,3e-3,1e-2 --search optuna --num-samples 6

1. The base config's ``baseline`` stage runs once, as run ``<sweep>-base`` (skipped when done).
2. A Ray Tune ``Tuner`` runs one trial per (d, λ): the pipeline run ``<sweep>-d<d>-l1_<λ>`` with
   ``baseline.checkpoint`` = the base run's baseline model and ``baseline.epochs=0``, every stage
   in the trial's own process (``ray.in_process=true``, ``--cpus-per-trial`` torch threads).
   Run names are deterministic, so re-running a sweep skips every stage already done.
3. A table of all trials, Pareto-optimal ones marked (max validation top-1, max sparse MAC
   reduction), is printed and written to ``<storage>/<sweep>-sweep.md``.

Model selection uses the validation split only (``val_top1`` is the fine-tune stage's
best validation top-1); test top-1 is reported, never optimized. MLflow: every run of the sweep
(base and trials) is a parent run tagged ``penni.sweep=<sweep>`` in one store, by default
``sqlite:///<storage>/mlflow.db``.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import STAGES, ConfigError, PipelineConfig, apply_overrides, available_configs, \
    from_dict, load_config, to_dict
from .runner import preflight

SWEEP_TAG = "penni.sweep"
OBJECTIVES = ("val_top1", "sparse_macs_reduction_pct")  # both maximized; the Pareto front and Optuna's
REPORTED = ("val_top1", "compressed_test_top1", "sparse_macs_reduction_pct", "dense_macs_reduction_pct",
            "params_reduction_pct")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_BASE_SHA_KEY = "sweep_base_model_sha256"


class SweepUsageError(ValueError):
    """A bad command line; the message says what to fix."""


# ------------------------------------------------------------------------------------ naming


def l1_tag(l1: float) -> str:
    """Short, exact, filesystem-safe text of λ: 0.003 -> '0.003', 1e-05 -> '1e-5', 1e+20 -> '1e20'."""
    return repr(float(l1)).replace("e+", "e").replace("e-0", "e-")


def trial_name(sweep_name: str, d: int, l1: float) -> str:
    return f"{sweep_name}-d{int(d)}-l1_{l1_tag(l1)}"


def base_name(sweep_name: str) -> str:
    return f"{sweep_name}-base"


# ------------------------------------------------------------------------------------ command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sweep.py",
        description="Ray Tune sweep over PENNI's d (basis kernels per layer) and λ (retrain.l1); "
                    "compare the runs in the MLflow UI.")
    parser.add_argument("--config", default=None,
                        help=f"YAML file or a shipped config name ({', '.join(available_configs())}); default quickstart")
    parser.add_argument("--d", required=True, help="comma-separated values of decompose.d, e.g. 3,5,7 (ints >= 1)")
    parser.add_argument("--l1", required=True, help="comma-separated values of retrain.l1, e.g. 1e-3,3e-3 (floats >= 0)")
    parser.add_argument("--search", choices=("grid", "optuna"), default="grid",
                        help="grid: every (d, l1) pair (default); optuna: multi-objective Optuna (max val top-1, "
                             "max sparse MAC reduction) over the same values")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="trials for --search optuna (default: the number of (d, l1) pairs)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0,
                        help="CPUs Ray reserves per trial; also its torch threads (default 1). With "
                             "ray.use_gpu: true each trial also reserves one GPU")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="at most this many trials at once (default: as many as the CPUs allow)")
    parser.add_argument("--max-failures", type=int, default=0,
                        help="Ray Tune retries of a failed trial (a retry skips its stages already done; default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the base config (repeatable); the sweep's own values "
                             "(name, decompose.d, retrain.l1, baseline.*) win in the trials")
    parser.add_argument("--storage", default=None, help="local directory or shared mount (default: the config's)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, the config's, else "
                             "sqlite:///<storage>/mlflow.db)")
    parser.add_argument("--sweep-name", default=None,
                        help="sweep name: runs <name>-base and <name>-d<d>-l1_<l1> (default: <config name>-sweep)")
    return parser.parse_args(list(argv))


def parse_list(text: str, flag: str, kind: type) -> list:
    """``"3,5,7"`` -> ``[3, 5, 7]`` (duplicates dropped, order kept); a SweepUsageError names the bad item."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise SweepUsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    values: list = []
    for item in items:
        if not item:
            raise SweepUsageError(f"{flag}: empty item in {text!r} (write e.g. {'3,5,7' if kind is int else '1e-3,3e-3'})")
        if kind is int:
            try:
                value = int(item)
            except ValueError:
                raise SweepUsageError(f"{flag}: {item!r} is not a whole number (decompose.d is the number of basis "
                                      "kernels per layer, an int >= 1)") from None
            if value < 1:
                raise SweepUsageError(f"{flag}: {value} must be >= 1 (decompose.d is the number of basis kernels)")
        else:
            try:
                value = float(item)
            except ValueError:
                raise SweepUsageError(f"{flag}: {item!r} is not a number (retrain.l1, e.g. 1e-3)") from None
            if not math.isfinite(value) or value < 0:
                raise SweepUsageError(f"{flag}: {item!r} must be a finite number >= 0 (retrain.l1)")
        if value not in values:
            values.append(value)
    return values


@dataclass
class SweepPlan:
    """Everything the sweep needs, validated; built before Ray or MLflow start."""

    sweep_name: str
    base_cfg: PipelineConfig          # the base run (name <sweep>-base), user overrides applied
    d_values: list[int]
    l1_values: list[float]
    search: str
    num_samples: int
    cpus_per_trial: float
    max_concurrent: int | None
    max_failures: int
    tracking_uri: str | None          # None: MLflow is not installed, tracking is off
    cwd: str
    config_label: str = "quickstart"  # the --config given

    @property
    def storage(self) -> str:
        return self.base_cfg.storage

    @property
    def base_checkpoint(self) -> Path:
        return Path(self.storage) / self.base_cfg.name / "baseline" / "model.safetensors"

    def trial_overrides(self, d: int, l1: float) -> list[str]:
        overrides = [f"name={trial_name(self.sweep_name, d, l1)}", f"decompose.d={int(d)}",
                     f"retrain.l1={json.dumps(float(l1))}", f"baseline.checkpoint={json.dumps(str(self.base_checkpoint))}",
                     "baseline.epochs=0", "ray.in_process=true"]
        if self.tracking_uri:
            overrides.append(f"tracking.uri={json.dumps(self.tracking_uri)}")
        return overrides

    def trial_config(self, d: int, l1: float) -> PipelineConfig:
        return apply_overrides(self.base_cfg, self.trial_overrides(d, l1))


def build_plan(args: argparse.Namespace) -> SweepPlan:
    """Validate the command line and every trial's config; raises SweepUsageError or ConfigError."""
    d_values = parse_list(args.d, "--d", int)
    l1_values = parse_list(args.l1, "--l1", float)
    if args.cpus_per_trial is None or not math.isfinite(args.cpus_per_trial) or args.cpus_per_trial <= 0:
        raise SweepUsageError(f"--cpus-per-trial: must be > 0, got {args.cpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SweepUsageError(f"--max-concurrent: must be >= 1, got {args.max_concurrent}")
    if args.max_failures < 0:
        raise SweepUsageError(f"--max-failures: must be >= 0, got {args.max_failures}")
    pairs = len(d_values) * len(l1_values)
    if args.search == "grid":
        if args.num_samples not in (None, 1):
            raise SweepUsageError("--num-samples applies to --search optuna; a grid runs every (d, l1) pair once")
        num_samples = 1
    else:
        num_samples = pairs if args.num_samples is None else args.num_samples
        if num_samples < 1:
            raise SweepUsageError(f"--num-samples: must be >= 1, got {args.num_samples}")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SweepUsageError("--search optuna needs Optuna: pip install optuna") from None
    try:
        import ray.tune  # noqa: F401
    except ImportError:
        raise SweepUsageError("the sweep needs Ray Tune: pip install 'ray[default,train,tune]==2.60.0'") from None

    probe = load_config(args.config, list(args.overrides))  # the user's config, validated as given
    sweep_name = args.sweep_name or f"{probe.name}-sweep"
    if not _NAME_RE.fullmatch(sweep_name) or sweep_name in (".", ".."):
        raise SweepUsageError(f"--sweep-name: {sweep_name!r} must match [A-Za-z0-9_.-]+ (no spaces or '/')")
    storage = args.storage if args.storage is not None else probe.storage
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", storage) and not storage.startswith("file://"):
        raise SweepUsageError(
            f"--storage: {storage!r} is a remote URI; a sweep needs a local directory or a mount shared by all "
            "nodes (every trial loads the base run's baseline model from a file path)")
    storage = str(Path(storage.removeprefix("file://")).expanduser().resolve())
    base_cfg = load_config(args.config, [*args.overrides, f"name={json.dumps(base_name(sweep_name))}",
                                         f"storage={json.dumps(storage)}"])
    plan = SweepPlan(sweep_name, base_cfg, d_values, l1_values, args.search, num_samples, args.cpus_per_trial,
                     args.max_concurrent, args.max_failures, None, os.getcwd(), args.config or "quickstart")
    for d, l1 in itertools.product(d_values, l1_values):  # every trial's config is valid before anything starts
        plan.trial_config(d, l1)
    problems = preflight(base_cfg)
    if problems:
        raise SweepUsageError("the configuration does not fit this machine:\n" + "\n".join(f"  - {p}" for p in problems))
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print("MLflow is not installed: tracking is off (pip install 'mlflow>=3.7,<4')")
    else:
        from .tracking import TrackingError, resolve_tracking_uri

        try:
            plan.tracking_uri = resolve_tracking_uri(args.tracking_uri, base_cfg.tracking.uri, Path(storage))
        except TrackingError as err:
            raise SweepUsageError(str(err)) from None
    return plan


# ------------------------------------------------------------------------------------ runs


def start_tracker(cfg: PipelineConfig, tracking_uri: str | None, store, sweep_name: str, tags: dict):
    """The run's MLflow parent (re-attached through ``pipeline.json``), tagged ``penni.sweep``."""
    if tracking_uri is None:
        return None
    from .runner import attach_tracker

    return attach_tracker(cfg, tracking_uri, store, {SWEEP_TAG: sweep_name, **tags})


def run_base(plan: SweepPlan) -> dict:
    """Step 1: the base run's baseline stage (skipped when done); returns its manifest."""
    from .dag import Pipeline
    from .runner import _use_ray
    from .storage import RunStore

    cfg = plan.base_cfg
    store = RunStore(cfg.storage, cfg.name)
    tracker = start_tracker(cfg, plan.tracking_uri, store, plan.sweep_name, {"penni.sweep_role": "base"})
    try:
        Pipeline(cfg, use_ray=_use_ray(cfg), tracker=tracker).run(stages=["baseline"])
    except BaseException:
        if tracker is not None:
            tracker.end_parent("FAILED")
        raise
    manifest = store.read_manifest("baseline")
    if tracker is not None:
        metrics = manifest.get("metrics", {})
        tracker.log_parent_metrics({"baseline_val_top1": metrics.get("selected_val_top1", metrics.get("val_top1"))})
        tracker.end_parent("FINISHED")
    return manifest


@contextlib.contextmanager
def _run_lock(store):
    """The run's lock (pipeline.lock), waited for: Optuna may propose one (d, l1) pair twice."""
    from .lock import RunLock

    lock = RunLock(store).acquire(wait=None)
    try:
        yield
    finally:
        lock.release()


def _invalidate_if_base_changed(store, base_sha: str, log) -> None:
    """A trial's stages were derived from the base model with this checksum; when the base baseline
    was re-trained since (same path, new weights), they are stale: drop their manifests."""
    state = store.read_json("pipeline.json") or {}
    if state.get(_BASE_SHA_KEY) != base_sha:
        if any(store.read_manifest(s) is not None for s in STAGES):
            log("the base run's baseline model changed since this trial ran: re-running all its stages")
            store.invalidate_from(list(STAGES))
        store.write_json_atomic("pipeline.json", {**state, _BASE_SHA_KEY: base_sha})


def trial_metrics(outcomes, d: int, l1: float) -> dict:
    by_stage = {o.stage: o.metrics for o in outcomes}
    evaluation = by_stage["evaluate"]
    return {"d": int(d), "l1": float(l1),
            "val_top1": float(by_stage["finetune"]["selected_val_top1"]),  # selection metric: validation only
            **{k: float(evaluation[k]) for k in REPORTED if k != "val_top1"}}


def run_trial(config: dict, spec: dict) -> None:
    """Ray Tune function trainable: one pipeline run for ``config["d"]``, ``config["l1"]``."""
    import ray.tune
    import torch

    from .dag import Pipeline
    from .runner import _log_summary
    from .storage import RunStore

    if os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])  # Tune starts trials in their own directory; relative config paths mean the driver's
    torch.set_num_threads(spec["torch_threads"])
    d, l1 = int(config["d"]), float(config["l1"])
    cfg = from_dict(spec["base_config"], spec["overrides"][trial_name(spec["sweep_name"], d, l1)])
    store = RunStore(cfg.storage, cfg.name)

    def log(message: str) -> None:
        print(f"[{cfg.name}] {message}", flush=True)

    with _run_lock(store):
        _invalidate_if_base_changed(store, spec["base_sha256"], log)
        tracker = start_tracker(cfg, spec["tracking_uri"], store, spec["sweep_name"],
                                {"penni.sweep_role": "trial", "penni.d": d, "penni.l1": l1})
        try:
            outcomes = Pipeline(cfg, use_ray=False, tracker=tracker, log=log).run()
        except BaseException:
            if tracker is not None:
                tracker.end_parent("FAILED")
            raise
        metrics = trial_metrics(outcomes, d, l1)
        if tracker is not None:
            _log_summary(tracker, store)
            tracker.log_parent_metrics({"val_top1": metrics["val_top1"]})
            tracker.end_parent("FINISHED")
    ray.tune.report(metrics)


def run_tune(plan: SweepPlan, base_manifest: dict):
    """Step 2: the Tuner over ``run_trial``; returns the ResultGrid."""
    from ray import tune

    pairs = list(itertools.product(plan.d_values, plan.l1_values))
    spec = {
        "base_config": to_dict(plan.base_cfg),
        "overrides": {trial_name(plan.sweep_name, d, l1): plan.trial_overrides(d, l1) for d, l1 in pairs},
        "sweep_name": plan.sweep_name,
        "tracking_uri": plan.tracking_uri,
        "base_sha256": base_manifest["files"]["model.safetensors"]["sha256"],
        "torch_threads": max(1, int(round(plan.cpus_per_trial))),
        "cwd": plan.cwd,
    }
    resources = {"CPU": plan.cpus_per_trial, **({"GPU": 1} if plan.base_cfg.ray.use_gpu else {})}
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)
    if plan.search == "grid":
        space = {"d": tune.grid_search(plan.d_values), "l1": tune.grid_search(plan.l1_values)}
        search_alg = None
    else:
        from ray.tune.search.optuna import OptunaSearch

        space = {"d": tune.choice(plan.d_values), "l1": tune.choice(plan.l1_values)}
        # multi-objective: metric and mode go on the searcher, not on TuneConfig
        search_alg = OptunaSearch(metric=list(OBJECTIVES), mode=["max", "max"], seed=plan.base_cfg.seed)
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=plan.num_samples,
                                    max_concurrent_trials=plan.max_concurrent,
                                    trial_name_creator=_tune_trial_name(plan.sweep_name),
                                    trial_dirname_creator=_tune_trial_dirname(plan.sweep_name)),
        run_config=tune.RunConfig(name=plan.sweep_name, storage_path=str(Path(plan.storage) / "_tune"),
                                  failure_config=tune.FailureConfig(max_failures=plan.max_failures), verbose=1),
    )
    return tuner.fit()


class _tune_trial_name:
    def __init__(self, sweep_name: str):
        self.sweep_name = sweep_name

    def __call__(self, trial) -> str:
        return trial_name(self.sweep_name, trial.config["d"], trial.config["l1"])


class _tune_trial_dirname(_tune_trial_name):
    def __call__(self, trial) -> str:
        return f"{super().__call__(trial)}_{trial.trial_id}"


# ------------------------------------------------------------------------------------ summary


def pareto_front(rows: Sequence[dict], objectives: Sequence[str] = OBJECTIVES) -> list[bool]:
    """For each row: True when no other row is >= on every objective and > on one (all maximized)."""
    def dominates(a: dict, b: dict) -> bool:
        return all(a[k] >= b[k] for k in objectives) and any(a[k] > b[k] for k in objectives)

    return [not any(dominates(other, row) for other in rows if other is not row) for row in rows]


def summary_markdown(plan: SweepPlan, rows: list[dict], failed: list[dict], base_manifest: dict) -> str:
    """The sweep table (one row per distinct trial run), Pareto-optimal rows marked '*'."""
    unique: dict[str, dict] = {}
    for row in rows:
        unique.setdefault(row["run"], row)
    rows = sorted(unique.values(), key=lambda r: (r["d"], r["l1"]))
    front = pareto_front(rows)
    base = base_manifest.get("metrics", {})
    base_val = base.get("selected_val_top1", base.get("val_top1"))
    base_val = f"{100 * base_val:.2f}%" if isinstance(base_val, (int, float)) else "n/a"
    lines = [f"# Sweep {plan.sweep_name}", "",
             f"Config: {plan.config_label}; base run {plan.base_cfg.name} (baseline val top-1 "
             f"{base_val}); search: {plan.search}; {len(rows)} trial run(s).", "",
             "| run | d | l1 | val top-1 % | test top-1 % | sparse MACs | dense MACs | params | Pareto |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for row, optimal in zip(rows, front):
        lines.append(f"| {row['run']} | {row['d']} | {row['l1']:g} | {100 * row['val_top1']:.2f} | "
                     f"{100 * row['compressed_test_top1']:.2f} | -{row['sparse_macs_reduction_pct']:.1f}% | "
                     f"-{row['dense_macs_reduction_pct']:.1f}% | -{row['params_reduction_pct']:.1f}% | "
                     f"{'*' if optimal else ''} |")
    for row in failed:
        lines.append(f"| {row['run']} | {row['d']} | {row['l1']:g} | failed: {row['error']} | | | | | |")
    lines += ["", "`*` Pareto-optimal: no other trial has a higher-or-equal validation top-1 and sparse MAC reduction "
                  "with one of them strictly higher. Runs are selected on the validation split; test top-1 is "
                  "reported only. MAC and parameter columns are reductions vs the baseline."]
    return "\n".join(lines) + "\n"


def _error_line(error: BaseException | None) -> str:
    """The exception line of a trial's error (Ray wraps it in a remote traceback), table-safe."""
    if error is None:
        return "no metrics reported"
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if ln.strip()]
    line = lines[-1] if len(lines) > 1 else f"{type(error).__name__}: {lines[0] if lines else ''}"
    return line.replace("|", "/")[:200]


def collect(plan: SweepPlan, results) -> tuple[list[dict], list[dict]]:
    rows, failed = [], []
    for result in results:
        config = result.config or {}
        d, l1 = config.get("d"), config.get("l1")
        if d is None or l1 is None:
            continue
        name = trial_name(plan.sweep_name, d, l1)
        metrics = result.metrics or {}
        if result.error is not None or not all(k in metrics for k in REPORTED):
            failed.append({"run": name, "d": int(d), "l1": float(l1), "error": _error_line(result.error)})
            continue
        rows.append({"run": name, "d": int(d), "l1": float(l1), **{k: float(metrics[k]) for k in REPORTED}})
    return rows, failed


# ------------------------------------------------------------------------------------ main


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        plan = build_plan(args)
    except SweepUsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: invalid configuration:\n{err}", file=sys.stderr)
        return 2
    from .runner import _start_ray

    started = time.perf_counter()
    n_pairs = len(plan.d_values) * len(plan.l1_values)
    print(f"penni sweep '{plan.sweep_name}': d in {plan.d_values}, l1 in {[l1_tag(v) for v in plan.l1_values]}, "
          f"{plan.search} search ({plan.num_samples if plan.search == 'optuna' else n_pairs} trials) -> {plan.storage}",
          flush=True)
    try:
        _start_ray(plan.base_cfg)
        print(f"\n== step 1: baseline of run '{plan.base_cfg.name}'", flush=True)
        base_manifest = run_base(plan)
        base_seconds = time.perf_counter() - started
        print(f"\n== step 2: Ray Tune, {plan.cpus_per_trial:g} CPU(s) per trial", flush=True)
        results = run_tune(plan, base_manifest)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume (finished stages are kept)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - report and exit non-zero
        import traceback

        traceback.print_exc()
        print(f"\nerror: the sweep failed: {type(err).__name__}: {err}\n"
              "Completed stages are kept; fix the cause and re-run the same command to resume.", file=sys.stderr)
        return 1
    rows, failed = collect(plan, results)
    table = summary_markdown(plan, rows, failed, base_manifest)
    out = Path(plan.storage) / f"{plan.sweep_name}-sweep.md"
    out.write_text(table)
    total = time.perf_counter() - started
    print("\n" + table)
    print(f"Written to {out}")
    if plan.tracking_uri:
        print(f"MLflow: {plan.tracking_uri}\n  open the UI: mlflow ui --backend-store-uri {plan.tracking_uri}\n"
              f"  then search runs with: tags.`{SWEEP_TAG}` = '{plan.sweep_name}' and plot val_top1 or "
              "compressed_test_top1 against sparse_macs_reduction_pct")
    print(f"\nWall time: {total:.1f}s (baseline step {base_seconds:.1f}s, trials {total - base_seconds:.1f}s)")
    if failed:
        print(f"error: {len(failed)} trial(s) failed (see the table); re-run the same command to retry them",
              file=sys.stderr)
        return 1
    return 0
