"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Everything goes through an explicit ``MlflowClient`` (no reliance on MLflow's global active-run
stack), so the same run ids can be written from the driver, Ray tasks and Ray Train rank-0
workers. ``mlflow`` is imported lazily: ``import pipeline.tracking`` works without it.
Metric names and rounding: ``pipeline/tracking/metric_names.py``; the tracking URI: ``pipeline/tracking/uri.py``;
what the UI opens on: ``pipeline/tracking/ui_link.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from typing import Iterator, Mapping

from .metric_names import clean_key as _clean_key
from .metric_names import flatten, split_for_mlflow
from .uri import TrackingError, create_sqlite_store, default_artifact_location, validate_uri

log = logging.getLogger(__name__)

MAX_PARAM_VAL = 6000
MAX_TAG_VAL = 8000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
PIPELINE_STATE = "pipeline.json"  # per run: the MLflow parent run id, so a resumed run re-attaches
PARENT_ID_KEY = "mlflow_parent_run_id"


def _param_str(v) -> str:
    s = "None" if v is None else str(v)
    return s if len(s) <= MAX_PARAM_VAL else s[: MAX_PARAM_VAL - 3] + "..."


def _tag_str(v) -> str:
    s = str(v)
    return s if len(s) <= MAX_TAG_VAL else s[: MAX_TAG_VAL - 3] + "..."


def _log_metrics(client, run_id: str, values: Mapping, step: int | None, where: str) -> None:
    """Numbers as grouped, rounded metrics (``val/top1``); counters and text as ``penni.*`` tags."""
    from mlflow.entities import Metric, RunTag

    metrics, tags, dropped = split_for_mlflow(values, step)
    for key in dropped:
        warnings.warn(f"{where}: not logging metric {key!r} (not finite)", RuntimeWarning, stacklevel=3)
    ts = int(time.time() * 1000)
    ents = [Metric(k, x, ts, int(step) if step is not None else 0) for k, x in metrics.items()]
    tag_ents = [RunTag(k, _tag_str(v)) for k, v in tags.items()]
    batches = max(-(-len(ents) // _METRICS_PER_BATCH), -(-len(tag_ents) // _PARAMS_PER_BATCH))
    for b in range(batches):  # MLflow's limits per call: 1000 metrics, 100 tags
        client.log_batch(run_id, metrics=ents[b * _METRICS_PER_BATCH : (b + 1) * _METRICS_PER_BATCH],
                         tags=tag_ents[b * _PARAMS_PER_BATCH : (b + 1) * _PARAMS_PER_BATCH])


def _log_params(client, run_id: str, params: Mapping) -> dict[str, str]:
    """Log flattened params; re-logging an equal value is a no-op, a changed value becomes a
    ``penni.param_changed.<key>`` tag. Returns the changed keys -> new values."""
    from mlflow.entities import Param, RunTag

    flat = {_clean_key(k): _param_str(v) for k, v in flatten(params).items()}
    if not flat:
        return {}
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in flat.items() if k not in existing]
    changed = {k: v for k, v in flat.items() if k in existing and existing[k] != v}
    for i in range(0, len(new), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[i : i + _PARAMS_PER_BATCH])
    if changed:
        for k, v in changed.items():
            log.warning(
                "param %r changed on resume: %r -> %r (recorded as tag penni.param_changed.%s)",
                k, existing[k], v, k,
            )
        tags = [RunTag(_clean_key(f"penni.param_changed.{k}"), _tag_str(v)) for k, v in changed.items()]
        for i in range(0, len(tags), _PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=tags[i : i + _PARAMS_PER_BATCH])
    return changed


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    create_sqlite_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


# --------------------------------------------------------------------------------------------


class StageRun:
    """A child run of the pipeline's parent run (one per stage attempt)."""

    def __init__(self, client, run_id: str, stage: str, tracking_uri: str):
        self._client = client
        self.run_id = run_id
        self.stage = stage
        self.tracking_uri = tracking_uri

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        _log_metrics(self._client, self.run_id, metrics, step, f"stage {self.stage!r}")

    def log_params(self, params: dict) -> None:
        _log_params(self._client, self.run_id, params)

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, os.fspath(path), artifact_path)

    def log_artifacts(self, dir, artifact_path: str | None = None) -> None:  # noqa: A002
        self._client.log_artifacts(self.run_id, os.fspath(dir), artifact_path)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        ents = [RunTag(_clean_key(k), _tag_str(v)) for k, v in tags.items()]
        for i in range(0, len(ents), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=ents[i : i + _PARAMS_PER_BATCH])

    def epoch_logger(self) -> "EpochLogger":
        """A picklable logger into this run for another process (Ray Train rank 0)."""
        return EpochLogger(self.tracking_uri, self.run_id)

    def __repr__(self) -> str:
        return f"StageRun(stage={self.stage!r}, run_id={self.run_id!r})"


class EpochLogger:
    """Picklable per-epoch metric logger into an existing run, usable from any process.

    Holds only ``tracking_uri`` and ``run_id``; the MLflow client is created lazily in the
    process that logs. A failing log call (e.g. the tracking server is briefly unreachable)
    warns instead of killing the training loop; set ``strict=True`` to raise instead.
    """

    def __init__(self, tracking_uri: str, run_id: str, strict: bool = False):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.strict = strict
        self._client = None

    def __getstate__(self):
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "strict": self.strict}

    def __setstate__(self, state):
        self.tracking_uri = state["tracking_uri"]
        self.run_id = state["run_id"]
        self.strict = state.get("strict", False)
        self._client = None

    def log(self, metrics: dict, step: int) -> None:
        try:
            if self._client is None:
                self._client = _client(self.tracking_uri)
            _log_metrics(self._client, self.run_id, metrics, step, f"run {self.run_id}")
        except Exception as e:
            if self.strict:
                raise
            warnings.warn(
                f"could not log epoch {step} metrics to MLflow run {self.run_id} at "
                f"{self.tracking_uri}: {type(e).__name__}: {e}",
                RuntimeWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return f"EpochLogger({self.tracking_uri!r}, {self.run_id!r})"


class Tracker:
    """Parent run per pipeline run; child run per stage."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        artifact_root: str | None = None,
    ):
        self.tracking_uri = validate_uri(tracking_uri, "Tracker(tracking_uri=...)")
        self.experiment = experiment
        self.run_name = run_name
        self._client = _client(self.tracking_uri)
        self.artifact_location = (
            artifact_root
            if artifact_root is not None
            else default_artifact_location(self.tracking_uri, experiment)
        )
        self.experiment_id = self._get_or_create_experiment()
        self._parent_run_id: str | None = None

    # ---------------------------------------------------------------- experiment

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        from .ui_link import experiment_tags

        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return self._client.create_experiment(
                    self.experiment, artifact_location=self.artifact_location, tags=experiment_tags()
                )
            except MlflowException as e:  # created concurrently by another process
                exp = self._client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise TrackingError(
                        f"cannot create MLflow experiment {self.experiment!r} at "
                        f"{self.tracking_uri}: {e}"
                    ) from e
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {self.experiment!r} at {self.tracking_uri} is deleted. "
                "Restore it (mlflow experiments restore --experiment-id "
                f"{exp.experiment_id}), delete it permanently (mlflow gc), or choose another "
                "name with --set tracking.experiment=<name>."
            )
        for key, value in experiment_tags().items():
            if exp.tags.get(key) != value:  # an experiment made by an older penni or by hand
                self._client.set_experiment_tag(exp.experiment_id, key, value)
        if (
            self.artifact_location is not None
            and exp.artifact_location.rstrip("/") != self.artifact_location.rstrip("/")
        ):
            log.info(
                "experiment %r already exists with artifact location %s (not %s); using it",
                self.experiment, exp.artifact_location, self.artifact_location,
            )
        return exp.experiment_id

    def ui_url(self, *, charts: bool = False) -> str:
        """The link that opens this experiment's runs table (or chart view) in MLflow's UI."""
        from .ui_link import runs_url

        return runs_url(self.tracking_uri, self.experiment_id, charts=charts)

    def ui_lines(self) -> list[str]:
        """Console lines: how to start the UI (for a database) and the link to the runs table."""
        from .ui_link import ui_lines

        return ui_lines(self.tracking_uri, self.experiment_id)

    # ---------------------------------------------------------------- parent

    @property
    def parent_run_id(self) -> str | None:
        return self._parent_run_id

    def _require_parent(self) -> str:
        if self._parent_run_id is None:
            raise TrackingError("Tracker.start_parent() must be called before logging stages")
        return self._parent_run_id

    def _find_parent(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as e:
            log.warning(
                "MLflow parent run %s recorded for %r was not found at %s (%s); "
                "starting a new parent run", run_id, self.run_name, self.tracking_uri, e,
            )
            return None
        if run.info.experiment_id != self.experiment_id:
            log.warning(
                "MLflow parent run %s belongs to experiment %s, not %r; starting a new parent run",
                run_id, run.info.experiment_id, self.experiment,
            )
            return None
        if run.info.lifecycle_stage == "deleted":
            log.warning("MLflow parent run %s was deleted; starting a new parent run", run_id)
            return None
        return run

    def start_parent(
        self, parent_run_id: str | None, params: dict, tags: dict | None = None
    ) -> str:
        """Re-attach to ``parent_run_id`` (when it exists in this experiment) or create a
        parent run; log params; mark leftover RUNNING children FAILED. Returns the run id."""
        from mlflow.entities import RunTag

        run = self._find_parent(parent_run_id) if parent_run_id else None
        base_tags = {"penni.role": "pipeline", "penni.run_name": self.run_name}
        if run is None:
            run = self._client.create_run(
                self.experiment_id,
                run_name=self.run_name,
                tags={**base_tags, **{k: _tag_str(v) for k, v in (tags or {}).items()}},
            )
            run_id = run.info.run_id
            log.info("MLflow parent run %s created for %r", run_id, self.run_name)
        else:
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                self._client.update_run(run_id, status="RUNNING")
            resumes = int(run.data.tags.get("penni.resumes", "0") or 0) + 1
            extra = {"penni.resumes": str(resumes), **(tags or {})}
            self._client.log_batch(
                run_id, tags=[RunTag(_clean_key(k), _tag_str(v)) for k, v in extra.items()]
            )
            log.info("MLflow parent run %s re-attached (resume #%d)", run_id, resumes)
        self._parent_run_id = run_id
        _log_params(self._client, run_id, params or {})
        self._fail_orphans(run_id)
        return run_id

    def _fail_orphans(self, parent_id: str) -> list[str]:
        runs = self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
        failed = []
        for r in runs:
            rid = r.info.run_id
            log.warning(
                "MLflow child run %s (stage %s) was left RUNNING by an earlier crash; marking FAILED",
                rid, r.data.tags.get("penni.stage", "?"),
            )
            self._client.set_tag(rid, "penni.crashed", "true")
            self._client.set_terminated(rid, "FAILED")
            failed.append(rid)
        return failed

    def end_parent(self, status: str = "FINISHED") -> None:
        if self._parent_run_id is not None:
            self._client.set_terminated(self._parent_run_id, status)

    @contextlib.contextmanager
    def parent_run(
        self, params: Mapping | None = None, tags: Mapping | None = None, *, store=None,
        resume_run_id: str | None = None,
    ) -> Iterator["Tracker"]:
        """The parent run around a ``with`` body, like ``stage_run``: FINISHED when the body returns,
        FAILED on an error, KILLED on Ctrl-C. Re-attaches to ``resume_run_id``, else to the id that
        ``store``'s ``pipeline.json`` recorded, and records the id (and URI) there."""
        state = (store.read_json(PIPELINE_STATE) or {}) if store is not None else {}
        run_id = self.start_parent(resume_run_id or state.get(PARENT_ID_KEY), dict(params or {}), dict(tags or {}))
        if store is not None:
            store.write_json_atomic(PIPELINE_STATE, {**state, PARENT_ID_KEY: run_id, "tracking_uri": self.tracking_uri})
        try:
            yield self
        except BaseException as e:
            self._end_parent_quietly("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
            raise
        self.end_parent("FINISHED")

    def _end_parent_quietly(self, status: str) -> None:
        """End the parent run; a tracking failure here must not hide the error that ended it."""
        try:
            self.end_parent(status)
        except Exception:
            log.debug("could not mark the MLflow parent run %s %s", self._parent_run_id, status, exc_info=True)

    # ---------------------------------------------------------------- stages

    @contextlib.contextmanager
    def stage_run(self, stage: str, params: dict | None = None) -> Iterator[StageRun]:
        """A child run for ``stage``: FINISHED on success, FAILED (KILLED on Ctrl-C) on error."""
        parent = self._require_parent()
        run = self._client.create_run(
            self.experiment_id,
            run_name=stage,
            tags={
                "mlflow.parentRunId": parent,
                "penni.stage": stage,
                "penni.run_name": self.run_name,
            },
        )
        sr = StageRun(self._client, run.info.run_id, stage, self.tracking_uri)
        try:
            if params:
                sr.log_params(params)
            yield sr
        except BaseException as e:
            status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
            try:
                self._client.set_tag(sr.run_id, "penni.error", _tag_str(f"{type(e).__name__}: {e}"))
                self._client.set_terminated(sr.run_id, status)
            except Exception as e2:  # noqa: BLE001 - never mask the stage's own error
                log.warning("could not mark MLflow run %s %s: %s", sr.run_id, status, e2)
            raise
        else:
            self._client.set_terminated(sr.run_id, "FINISHED")

    def log_skipped(self, stage: str, manifest: dict) -> None:
        """Tag the parent: ``penni.skipped.<stage>=true`` (no child run)."""
        parent = self._require_parent()
        from mlflow.entities import RunTag

        tags = [RunTag(_clean_key(f"penni.skipped.{stage}"), "true")]
        fp = (manifest or {}).get("fingerprint")
        if fp:
            tags.append(RunTag(_clean_key(f"penni.fingerprint.{stage}"), _tag_str(fp)))
        self._client.log_batch(parent, tags=tags)

    def log_parent_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Summary metrics on the parent run (e.g. final accuracy, compression ratio)."""
        _log_metrics(self._client, self._require_parent(), metrics, step, "parent run")

    def log_parent_artifact(self, path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self._require_parent(), os.fspath(path), artifact_path)


# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def parent_run(
    cfg, tracking_uri: str | None, store, tags: Mapping | None = None, config_name: str | None = None
) -> Iterator[Tracker | None]:
    """The MLflow parent run of the pipeline run ``cfg`` (see ``Tracker.parent_run``), with the
    flattened config as params; yields None (tracking off) when ``tracking_uri`` is None."""
    if tracking_uri is None:
        yield None
        return
    from ..config.loading import flatten as flatten_config

    tracker = Tracker(tracking_uri, cfg.tracking.experiment, cfg.name)
    named = {"penni.config": config_name} if config_name else {}
    with tracker.parent_run(flatten_config(cfg), {**named, **(tags or {})}, store=store):
        yield tracker


def read_runs(tracking_uri: str, experiment: str, parent_run_id: str) -> list[dict]:
    """Child runs of ``parent_run_id`` (oldest first): run_id, name, stage, status,
    metrics (latest values), params, tags, start_time, end_time."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=5000,
        order_by=["attributes.start_time ASC"],
    )
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "stage": r.data.tags.get("penni.stage"),
            "status": r.info.status,
            "metrics": dict(r.data.metrics),
            "params": dict(r.data.params),
            "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
            "start_time": r.info.start_time,
            "end_time": r.info.end_time,
        }
        for r in runs
    ]


def log_curve_point(tracking_uri: str, run_id: str, metrics: dict, step: int) -> None:
    """One point of a run's curve (``step`` is the MLflow step) on stage run ``run_id`` and on its parent run
    (the pipeline's), so the parent carries the whole trade-off of e.g. the accuracy-budget steps."""
    client = _client(tracking_uri)
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    for target in (run_id, parent):
        if target:
            _log_metrics(client, target, metrics, step, f"run {target}")
