"""One sweep trial: a pipeline run up to ``evaluate`` inside a Ray Tune trial, its epochs reported to Tune."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config.loading import from_dict
from ..stages.table import STAGES

SWEEP_TAG = "penni.sweep"
TRIAL_STAGES = tuple(s for s in STAGES if s != "report")
RESULT_FILE = "sweep_trial.json"   # written by a trial when it finished: a rerun of the sweep never reruns it
_BASE_SHA_KEY = "sweep_base_model_sha256"


def trial_metrics(outcomes, params: dict, batch_size: int) -> dict:
    """What a finished trial reports: val top-1 (the selection metric, validation split) and its costs."""
    by_stage = {o.stage: o.metrics for o in outcomes}
    ev = by_stage["evaluate"]
    return {**params, "val_top1": float(by_stage["finetune"]["selected_val_top1"]),
            "dense_macs": float(ev["compressed.dense_macs"]), "sparse_macs": float(ev["compressed.sparse_macs"]),
            "latency_ms": float(ev[f"compressed.latency_ms_bs{batch_size}"]),
            "test_top1": float(ev["compressed_test_top1"]),
            "dense_macs_reduction_pct": float(ev["dense_macs_reduction_pct"]),
            "sparse_macs_reduction_pct": float(ev["sparse_macs_reduction_pct"]),
            "params_reduction_pct": float(ev["params_reduction_pct"]),
            "sparsity": float(by_stage["prune"]["sparsity"])}


def finished_result(store, params: dict, base_sha: str) -> dict | None:
    """The metrics a trial recorded when it finished with these values from this baseline (else None)."""
    record = store.read_json(RESULT_FILE)
    if not record or record.get("params") != params or record.get("base_sha256") != base_sha:
        return None
    return record["metrics"]


def run_trial(config: dict, spec: dict) -> None:
    """Ray Tune function trainable: the pipeline run of trial ``config["trial"]``; training on Ray Train
    (``sweep.workers_per_trial`` workers) with every epoch forwarded to Tune, or all in this process."""
    import ray.tune

    from ..storage.lock import RunLock
    from ..storage.run_store import RunStore

    if os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])  # Tune starts trials in their own directory; relative config paths mean the driver's
    trial = spec["trials"][str(config["trial"])]
    cfg = from_dict(trial["config"])
    store = RunStore(cfg.storage, cfg.name)
    with RunLock(store).acquire(wait=None):
        _invalidate_if_base_changed(store, spec["base_sha256"], lambda m: print(f"[{cfg.name}] {m}", flush=True))
        outcomes = _run_stages(cfg, store, spec, trial)
        metrics = trial_metrics(outcomes, trial["params"], cfg.evaluate.latency_batch_sizes[0])
        store.write_json_atomic(RESULT_FILE, {"params": trial["params"], "base_sha256": spec["base_sha256"],
                                             "metrics": metrics})
    ray.tune.report(metrics)


def _run_stages(cfg, store, spec: dict, trial: dict):
    """The trial's stages under its MLflow run, a child of the sweep's parent run."""
    import torch

    from ..stages.dag import Pipeline
    from ..tracking.runs import parent_run

    callbacks: list[Any] = []
    if cfg.ray.in_process:
        torch.set_num_threads(max(1, int(round(spec["threads_per_trial"]))))
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        from .release import RECORD_FILE, RecordPlacementGroup

        callbacks.append(TuneReportCallback())  # each epoch's metrics (val_top1, sparsity) reach ASHA
        callbacks.append(RecordPlacementGroup(str(Path(store.root) / RECORD_FILE)))
    tags = {SWEEP_TAG: spec["sweep_name"], "penni.sweep_role": "trial", "penni.trial": cfg.name,
            **({"mlflow.parentRunId": spec["sweep_run_id"]} if spec["sweep_run_id"] else {}),
            **{f"penni.{k}": v for k, v in trial["params"].items()}}
    uri = spec["tracking_uri"]
    with parent_run(cfg, uri, store, tags, config_name=spec["config_label"]) as tracker:
        log = lambda m: print(f"[{cfg.name}] {m}", flush=True)  # noqa: E731
        pipeline = Pipeline(cfg, use_ray=not cfg.ray.in_process, tracker=tracker, log=log,
                            train_callbacks=callbacks, stage_tasks=False)
        _replay_done_epochs(pipeline, store)
        outcomes = pipeline.run(stages=list(TRIAL_STAGES))
        if tracker is not None:
            metrics = trial_metrics(outcomes, trial["params"], cfg.evaluate.latency_batch_sizes[0])
            tracker.log_parent_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
    return outcomes


def _replay_done_epochs(pipeline, store) -> None:
    """A resumed trial reports the epochs of its training stages already done again (from their history),
    so that ASHA compares every trial at the same epoch count."""
    import json

    import ray.tune

    plan = pipeline.plan()
    for stage in ("retrain", "finetune"):
        if plan.get(stage) != "skip":
            return
        path = store.local_path(stage) / "history.json"
        for epoch in (json.loads(path.read_text()) if path.exists() else []):
            ray.tune.report({k: float(v) for k, v in epoch.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _invalidate_if_base_changed(store, base_sha: str, log) -> None:
    """A trial's stages were derived from the base model with this checksum; when the base baseline
    was re-trained since (same path, new weights), they are stale: drop their manifests."""
    state = store.read_json("pipeline.json") or {}
    if state.get(_BASE_SHA_KEY) != base_sha:
        if any(store.read_manifest(s) is not None for s in STAGES):
            log("the base run's baseline model changed since this trial ran: re-running all its stages")
            store.invalidate_from(list(STAGES))
        store.write_json_atomic("pipeline.json", {**state, _BASE_SHA_KEY: base_sha})
