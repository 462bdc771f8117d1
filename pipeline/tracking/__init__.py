"""MLflow tracking: the pipeline's parent and stage runs, the tracking URI, metric names, the link into the UI and
the logged compressed model (``pyfunc.py`` is the model-from-code file MLflow loads; it is not imported here)."""
from .runs import EpochLogger, StageRun, Tracker, parent_run, read_runs
from .uri import TrackingError, resolve_tracking_uri, tracking_uri_problem

__all__ = ["EpochLogger", "StageRun", "Tracker", "TrackingError", "parent_run", "read_runs", "resolve_tracking_uri",
           "tracking_uri_problem"]
