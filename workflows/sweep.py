"""Sweep PENNI's d and λ with Ray Tune; compare the runs in the MLflow UI.

    python workflows/sweep.py --config quickstart --d 3,5,7 --l1 1e-3,3e-3
    python workflows/sweep.py --d 3,5,7 --l1 1e-5,1e-3 --num-samples 6 --workers-per-trial 2

The base config's baseline is trained once (run <sweep>-base); every trial starts from it. Re-running
the same command skips every stage already done. See pipeline/sweep/__init__.py.
"""
from __future__ import annotations

import sys

from pipeline.sweep import main  # the installed package (pip install -e .); same as `penni-sweep`

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
