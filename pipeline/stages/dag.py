"""The stage DAG: order, fingerprints, skip/resume, Ray task wrapping, retries and tracking.

Durability is ours (``ray.workflow`` is gone since Ray 2.48): every stage commits its outputs
with a manifest (``pipeline.storage``); a stage whose manifest matches its fingerprint (the
hash of its config section and of its inputs' fingerprints) is skipped, so changing
``finetune.epochs`` re-runs ``finetune`` and everything downstream of it, nothing upstream.
An interrupted training stage resumes from its last Ray Train checkpoint, because its
``RunConfig.name`` is derived from that same fingerprint and the content hash of its input model
(``training_run_name``). Non-training stages run as Ray tasks chained by their results; training
stages fan out to Ray Train from the driver.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config.loading import flatten, from_dict, to_dict
from ..config.schema import PipelineConfig
from ..errors import find_cause
from ..storage.run_store import RunStore
from ..training.distributed import TrainJob, run_training, training_run_name
from .fingerprints import stage_fingerprints
from .functions import StageContext
from .table import STAGE_READS, STAGES, stage_function
from .table import stage as stage_entry


@dataclass
class StageOutcome:
    stage: str
    status: str                   # "ran" | "skipped"
    seconds: float
    metrics: dict = field(default_factory=dict)


def _execute_stage(cfg_dict: dict, stage: str, stage_fingerprint: str, storage: str, run_name: str,
                   use_ray_train: bool, tracking_uri: str | None, mlflow_run_id: str | None,
                   train_callbacks: Sequence = ()) -> dict:
    """Run one stage and commit its outputs; returns the manifest. Runs in a Ray task or in-process.
    ``train_callbacks``: extra Ray Train callbacks of its training runs (a sweep forwards epochs to Tune)."""
    cfg = from_dict(cfg_dict)
    store = RunStore(storage, run_name)
    with tempfile.TemporaryDirectory(prefix=f"penni-{stage}-") as tmp:
        tmp = Path(tmp)
        inputs = {s: store.fetch_stage(s, tmp / "inputs" / s) for s in STAGE_READS[stage]}
        out_dir = tmp / "out"
        out_dir.mkdir()
        scratch = store.local_path("_work") if store.is_local else tmp / "work"

        def train(job: TrainJob):
            return run_training(
                job, use_ray=use_ray_train, run_name=training_run_name(stage, stage_fingerprint, job.input_model),
                storage=store.train_storage(), num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                cpus_per_worker=cfg.ray.cpus_per_worker, max_failures=cfg.ray.max_failures, local_dir=scratch,
                callbacks=list(train_callbacks))

        ctx = StageContext(cfg=cfg, stage=stage, inputs=inputs, out_dir=out_dir, train=train,
                           tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id, work_dir=scratch)
        metrics = stage_function(stage)(ctx)
        return store.commit_stage(stage, out_dir, stage_fingerprint, metrics)


class Pipeline:
    """Runs the stages of one pipeline run in order, skipping those already done."""

    def __init__(self, cfg: PipelineConfig, *, use_ray: bool, tracker: Any = None,
                 log: Callable[[str], None] = print, train_callbacks: Sequence = (),
                 stage_tasks: bool = True) -> None:
        self.cfg = cfg
        self.train_callbacks = list(train_callbacks)  # Ray Train callbacks of the training stages
        self.stage_tasks = stage_tasks  # False: with Ray, only training runs on Ray (a sweep trial's own process)
        self.use_ray = use_ray
        self.store = RunStore(cfg.storage, cfg.name)
        self.tracker = tracker
        self.log = log
        self.fingerprints = stage_fingerprints(cfg)

    def plan(self) -> dict[str, str]:
        """Stage -> "skip" or "run" (a stage runs if it or anything upstream is not done)."""
        plan, upstream_runs = {}, False
        for stage in STAGES:
            done = self.store.is_complete(stage, self.fingerprints[stage])
            upstream_runs = upstream_runs or not done
            plan[stage] = "run" if upstream_runs else "skip"
        return plan

    def run(self, stages: Sequence[str] | None = None) -> list[StageOutcome]:
        """Run (or skip) every stage, or only ``stages`` (in pipeline order; e.g. ``["baseline"]``)."""
        unknown = sorted(set(stages or ()) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; expected some of {', '.join(STAGES)}")
        selected = [s for s in STAGES if stages is None or s in stages]
        plan = self.plan()
        to_run = [s for s in STAGES if plan[s] == "run"]
        self.store.invalidate_from(to_run)  # downstream outputs of a re-run stage are stale
        self.log("plan: " + ", ".join(f"{s}={plan[s]}" for s in selected))
        outcomes = []
        for stage in selected:
            if plan[stage] == "skip":
                manifest = self.store.read_manifest(stage) or {}
                if self.tracker is not None:
                    self.tracker.log_skipped(stage, manifest)
                self.log(f"[{stage}] up to date (manifest matches), skipped")
                outcomes.append(StageOutcome(stage, "skipped", 0.0, manifest.get("metrics", {})))
                continue
            outcomes.append(self._run_stage(stage))
        return outcomes

    def _run_stage(self, stage: str) -> StageOutcome:
        retries = self.cfg.ray.stage_retries
        for attempt in range(retries + 1):
            t0 = time.perf_counter()
            self.log(f"[{stage}] running" + (f" (retry {attempt}/{retries})" if attempt else ""))
            try:
                manifest = self._attempt(stage)
            except Exception as err:
                if attempt == retries or _fails_the_same_way(err):
                    raise
                self.log(f"[{stage}] failed ({type(err).__name__}: {err}); retrying")
                continue
            seconds = time.perf_counter() - t0
            self.log(f"[{stage}] done in {seconds:.1f}s")
            return StageOutcome(stage, "ran", seconds, manifest["metrics"])
        raise AssertionError("unreachable")

    def _attempt(self, stage: str) -> dict:
        args = (to_dict(self.cfg), stage, self.fingerprints[stage], self.cfg.storage, self.cfg.name, self.use_ray)
        context = (self.tracker.stage_run(stage, params=_stage_params(self.cfg, stage)) if self.tracker
                   else contextlib.nullcontext())
        with context as run:
            tracking = (self.tracker.tracking_uri, run.run_id) if run is not None else (None, None)
            if self.use_ray and self.stage_tasks and not stage_entry(stage).trains_for(self.cfg):
                manifest = _remote_stage(self.cfg).remote(*args, *tracking)
                import ray

                manifest = ray.get(manifest)
            else:
                manifest = _execute_stage(*args, *tracking, self.train_callbacks)
            if run is not None:
                run.log_metrics(manifest["metrics"])
                run.set_tags({"penni.fingerprint": self.fingerprints[stage]})
                stage_dir = self.store.local_path(stage)
                if stage_dir is not None:
                    for path in sorted(stage_dir.iterdir()):
                        if path.is_file() and path.name != "manifest.json":
                            run.log_artifact(path)
        return manifest


def _fails_the_same_way(err: BaseException) -> bool:
    """Bad data or config (ValueError such as DataError or TrainingError, TypeError, KeyError) fail
    the same way on a retry, also when raised in a Ray task (its ``cause``) or a Ray Train worker;
    one wrapper deep, and not through ``__cause__``/``__context__`` (an error raised while handling
    a ValueError may well pass on a retry)."""
    return find_cause(err, (ValueError, TypeError, KeyError), chained=False, depth=1) is not None


def _stage_params(cfg: PipelineConfig, stage: str) -> dict:
    prefix = f"{stage}."
    return {k: v for k, v in flatten(cfg).items() if k.startswith(prefix)}


def _remote_stage(cfg: PipelineConfig):
    """``_execute_stage`` as a Ray task (a GPU one when the pipeline uses GPUs)."""
    import ray

    return ray.remote(_execute_stage).options(
        num_cpus=1, num_gpus=1 if cfg.ray.use_gpu else 0, max_retries=1, name="penni-stage")
