"""The ``penni-pipeline`` console script declared in pyproject.toml."""
from __future__ import annotations

import sys


def pipeline_main() -> int:
    """``penni-pipeline``: the same command line as ``python workflows/full_pipeline.py``."""
    from .runner import main

    return main(sys.argv[1:])

