"""``workflows/sweep.py``: the shared baseline, the trials on Ray Tune, the Pareto front and the winner's full run."""
from __future__ import annotations

import sys
import time
from typing import Sequence

from ..cli.launch import interrupted_exit_code, stop_cleanly_on_sigterm
from ..config.loading import ConfigError
from .plan import SweepPlan, build_plan, parse_args
from .space import SweepUsageError


def main(argv: Sequence[str]) -> int:
    """Run (or resume) a sweep; exit 0, 1 (a trial or stage failed) or 2 (bad input, nothing started)."""
    args = parse_args(argv)
    try:
        plan = build_plan(args)
        concurrency = _start_ray(plan)
    except SweepUsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: invalid configuration:\n{err}", file=sys.stderr)
        return 2
    print(f"penni sweep '{plan.sweep_name}': {len(plan.trials)} trials ({plan.sweep.workers_per_trial} worker(s) "
          f"each, {'in-process' if plan.sweep.in_process else 'Ray Train'}, at most {concurrency} at once, "
          f"scheduler {plan.sweep.scheduler}) -> {plan.storage}", flush=True)
    stop_cleanly_on_sigterm()
    try:
        return _run(plan, concurrency)
    except KeyboardInterrupt as err:
        print("interrupted: re-run the same command to resume (finished trials and stages are kept)", file=sys.stderr)
        return interrupted_exit_code(err)
    except Exception as err:  # noqa: BLE001 - report and exit non-zero
        import traceback

        traceback.print_exc()
        print(f"\nerror: the sweep failed: {type(err).__name__}: {err}\n"
              "Finished trials and stages are kept; fix the cause and re-run the same command to resume.",
              file=sys.stderr)
        return 1


def _start_ray(plan: SweepPlan) -> int:
    """Ray up (quiet), and how many trials fit at once on it."""
    import ray

    from ..cli.launch import quiet_output
    from ..cli.launch import start_ray as start
    from .tuning import concurrent_trials

    quiet_output(False)
    start(plan.base_cfg)
    return concurrent_trials(plan, ray.cluster_resources())


def _run(plan: SweepPlan, concurrency: int) -> int:
    from .mlflow_runs import end_unfinished_trials, log_sweep, sweep_parent
    from .outcomes import collect, pending_trials
    from .pipeline_runs import baseline_val_top1, run_base, run_winner
    from .report import decide, write_outputs
    from .tuning import run_tune

    started = time.perf_counter()
    with sweep_parent(plan) as tracker:
        sweep_run_id = tracker.parent_run_id if tracker is not None else None
        print(f"\n== step 1: baseline of run '{plan.base_cfg.name}'", flush=True)
        base_manifest = run_base(plan, sweep_run_id)
        base_sha, base_val = base_manifest["files"]["model.safetensors"]["sha256"], baseline_val_top1(base_manifest)
        pending = pending_trials(plan, base_sha)
        print(f"\n== step 2: {len(pending)} of {len(plan.trials)} trial(s) to run on Ray Tune", flush=True)
        results = run_tune(plan, pending, sweep_run_id=sweep_run_id, base_sha=base_sha,
                           concurrency=concurrency) if pending else []
        outcomes = collect(plan, results, base_sha)
        end_unfinished_trials(plan, outcomes)
        front, winner, rule = decide(plan, outcomes, base_val)
        files = write_outputs(plan, outcomes, front, winner, rule, base_val)
        log_sweep(tracker, plan, files, winner, rule)
        print("\n" + files[-1].read_text() + f"\nWritten to {plan.sweep_dir}", flush=True)
        if winner is not None and plan.sweep.finish_winner:
            _finish(plan, winner, sweep_run_id, run_winner)
    _closing_lines(plan, outcomes, time.perf_counter() - started)
    return 1 if outcomes.failed else 0


def _finish(plan: SweepPlan, winner: dict, sweep_run_id: str | None, run_winner) -> None:
    trial = next(t for t in plan.trials if t.name == winner["run"])
    print(f"\n== step 3: the winner {trial.name}, full length, as run '{plan.winner_config(trial).name}'", flush=True)
    cfg, outcomes, seeded = run_winner(plan, trial, sweep_run_id)
    ran = [o.stage for o in outcomes if o.status == "ran"]
    print(f"winner run {cfg.name}: stages from the trial {', '.join(seeded) or '(already there)'}; "
          f"ran {', '.join(ran) or 'nothing (up to date)'}; report in {plan.storage}/{cfg.name}/report", flush=True)


def _closing_lines(plan: SweepPlan, outcomes, seconds: float) -> None:
    if plan.tracking_uri:
        print(f"MLflow: {plan.tracking_uri}\n  open the UI: mlflow ui --backend-store-uri {plan.tracking_uri}\n"
              f"  the sweep is the parent run '{plan.sweep_dir.name}'; its trials are its children")
    print(f"\nWall time: {seconds:.1f}s")
    if outcomes.failed:
        print(f"error: {len(outcomes.failed)} trial(s) failed (see the table); re-run the same command to retry them",
              file=sys.stderr)
