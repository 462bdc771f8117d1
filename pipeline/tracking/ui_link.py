"""What a user sees first in MLflow's UI (3.17): the runs view with useful columns, one link away.

How the UI decides (read from ``mlflow/server/js/build``): MLflow 3.17 opens an experiment in its
GenAI view ("Traces") unless the URL says ``workflowType=machine_learning`` or the browser stored
that choice from the sidebar toggle; the ``mlflow.experimentKind`` experiment tag is only read when
that toggle is disabled, so we set it too (older UIs and Databricks read it). The runs table's
columns and sort order come from a *shared view*: an experiment tag
``mlflow.sharedViewState.<key>`` holding JSON, applied when the URL carries ``viewStateShareKey=<key>``.
``compareRunsMode=CHART`` opens the chart view, where runs are compared.
"""

from __future__ import annotations

import json
import urllib.parse

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Model training" kind
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "penni-runs"
DEFAULT_UI = "http://127.0.0.1:5000"

# the runs table's columns: what a pipeline run is (config, d, l1, prune target) and what it gave
COLUMNS = (
    ("tags", "penni.config"),
    ("params", "decompose.d"),
    ("params", "retrain.l1"),
    ("params", "prune.rule"),
    ("metrics", "val/top1"),
    ("metrics", "test/top1"),
    ("metrics", "reduction/dense_macs_pct"),
    ("metrics", "cost/dense_macs"),
    ("metrics", "speedup/latency_bs1"),
)
# the chart view: trade-off scatters first, then the metric sections in this order (the UI adds
# every metric's own chart to the section named by its prefix; unknown prefixes come after)
SCATTERS = (("reduction/dense_macs_pct", "val/top1"), ("reduction/dense_macs_pct", "test/top1"),
            ("reduction/sparse_macs_pct", "test/top1"))
SECTIONS = ("trade-off", "val", "test", "reduction", "cost", "speedup", "latency", "baseline")


def column_key(kind: str, name: str) -> str:
    """The UI's column id: ``metrics.`val/top1```."""
    return f"{kind}.`{name}`"


def runs_view_state() -> dict:
    """The shared view: newest runs first, the useful columns shown, every run visible in charts."""
    return {
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "selectedColumns": [column_key(kind, name) for kind, name in COLUMNS],
        "runsHiddenMode": "SHOW_ALL",
        "hideEmptyCharts": True,
        **chart_layout(),
    }


def chart_layout() -> dict:
    """Sections in a useful order (not alphabetical, where ``baseline`` came first) and the
    validation/test top-1 against MAC reduction scatters at the top."""
    sections = [{"uuid": f"penni-section-{name}", "name": name, "display": True, "isReordered": False,
                 "deleted": False, "isGenerated": False} for name in SECTIONS]
    charts = [{"uuid": f"penni-scatter-{i}", "type": "SCATTER", "runsCountToCompare": 100,
               "metricSectionId": "penni-section-trade-off", "deleted": False, "isGenerated": False,
               "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"}}
              for i, (x, y) in enumerate(SCATTERS)]
    return {"compareRunSections": sections, "compareRunCharts": charts, "isAccordionReordered": True}


def experiment_tags() -> dict[str, str]:
    """Tags that make the experiment open as a model-training experiment with the shared runs view."""
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
            SHARED_VIEW_PREFIX + VIEW_KEY: json.dumps(runs_view_state(), separators=(",", ":"))}


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, else where ``mlflow ui`` listens by default."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.split("?", 1)[0].rstrip("/")
    return DEFAULT_UI


def runs_url(tracking_uri: str, experiment_id: str, *, charts: bool = False) -> str:
    """The link that opens the experiment's runs table (or its chart view) with penni's columns."""
    query = {"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY}
    if charts:
        query["compareRunsMode"] = "CHART"
    return (f"{ui_base(tracking_uri)}/#/experiments/{urllib.parse.quote(str(experiment_id))}/runs?"
            + urllib.parse.urlencode(query))


def ui_lines(tracking_uri: str, experiment_id: str) -> list[str]:
    """Console lines saying how to open the runs table (starting the UI first when MLflow is a database)."""
    lines = []
    if not tracking_uri.startswith(("http://", "https://")):
        lines.append(f"MLflow: mlflow ui --backend-store-uri {tracking_uri}   then open")
    else:
        lines.append("MLflow: open")
    lines.append(f"  {runs_url(tracking_uri, experiment_id)}")
    return lines
