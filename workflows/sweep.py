"""Sweep PENNI's d and λ with Ray Tune; compare the runs in the MLflow UI.

    python workflows/sweep.py --config quickstart --d 3,5,7 --l1 1e-3,3e-3
    python workflows/sweep.py --d 3,5,7 --l1 1e-3,3e-3,1e-2 --search optuna --num-samples 6

The base config's baseline is trained once (run <sweep>-base); every trial starts from it. Re-running
the same command skips every stage already done. See pipeline/sweep.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
