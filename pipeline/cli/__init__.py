"""The command line: ``workflows/full_pipeline.py`` and ``penni-pipeline`` (the runner), and the launch of a run
(tracking, lock, preflight checks) that the runner and the sweep share."""
from .main import pipeline_main

__all__ = ["pipeline_main"]
