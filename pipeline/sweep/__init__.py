"""Sweeps with Ray Tune: trials on Ray Train, ASHA early stopping, a Pareto front, the winner handed on.

    python workflows/sweep.py --config quickstart                  # the config's sweep: section
    python workflows/sweep.py --d 3,5,7 --l1 1e-5,1e-3 --num-samples 8 --workers-per-trial 2

1. The base config's ``baseline`` stage runs once, as run ``<sweep>-base`` (skipped when done).
2. ``sweep.num_samples`` trials are drawn (seeded) from the ``sweep:`` section: d from its list, λ
   log-uniform between its bounds, optionally prune.s and the channel target from theirs. Each trial is
   the pipeline run ``<sweep>-tNN`` up to ``evaluate``, from the shared baseline, with fine-tuning
   shortened by ``--trial-finetune-epochs``. Its training stages are Ray Train runs with
   ``sweep.workers_per_trial`` workers whose every epoch (validation top-1, sparsity) reaches Tune, where
   ASHA stops hopeless trials (``sweep.scheduler``, ``sweep.grace_period``). ``sweep.in_process``:
   each trial in one process instead.
3. The Pareto front of validation top-1 against ``sweep.objective`` (dense-executable MACs, measured
   latency or sparse MACs), the winner by ``sweep.select``, in ``<storage>/<sweep>-sweep/``
   (trials.csv, pareto.csv, pareto.png, sweep.md) and on the sweep's MLflow parent run, whose
   children are the base run, every trial and the winner's run.
4. The winner's full-length run ``<trial>-full``: the trial's stages up to prune are copied in (their
   fingerprints match), fine-tune at ``finetune.epochs``, shrink, evaluate and report run.

Everything is resumable: a rerun of the same command skips finished trials (and trials ASHA
stopped), resumes unfinished ones from their committed stages and training checkpoints, and
resumes the winner's run. Selection uses the validation split only; test top-1 is reported.
"""
import sys

from .command import main
from .pareto import pareto_front, select_winner
from .space import SweepUsageError, TrialSpec, draw_trials, l1_tag, parse_list, trial_name

__all__ = ["main", "sweep_main", "pareto_front", "select_winner", "SweepUsageError", "TrialSpec", "draw_trials", "l1_tag",
           "parse_list", "trial_name"]


def sweep_main() -> int:
    """``penni-sweep`` (pyproject.toml): the same command line as ``python workflows/sweep.py``."""
    return main(sys.argv[1:])
