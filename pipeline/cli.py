"""Console-script entry points declared in pyproject.toml (``penni-pipeline``, ``penni-sweep``)."""
from __future__ import annotations

import sys


def pipeline_main() -> int:
    """``penni-pipeline``: the same command line as ``python workflows/full_pipeline.py``."""
    from .runner import main

    return main(sys.argv[1:])


def sweep_main() -> int:
    """``penni-sweep``: the same command line as ``python workflows/sweep.py``."""
    from .sweep import main

    return main(sys.argv[1:])
