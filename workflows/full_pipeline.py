"""Run the PENNI pipeline: baseline -> decompose -> retrain -> prune -> finetune -> shrink -> evaluate -> report.

    python workflows/full_pipeline.py                              # quickstart: local Ray, Fashion-MNIST, SQLite MLflow
    python workflows/full_pipeline.py --config fashion_vgg16 --set retrain.l1=5e-5
    ray job submit --working-dir . -- python workflows/full_pipeline.py --config imagenet_resnet50

Re-running the same command skips every stage that is already done and resumes an
interrupted training stage from its last checkpoint.
"""
from __future__ import annotations

import sys

from pipeline.cli.runner import main  # the installed package (pip install -e .); same as `penni-pipeline`

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
