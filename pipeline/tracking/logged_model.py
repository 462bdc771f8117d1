"""The compressed model as an MLflow Model on the run's parent run ("Logged models"; registrable).

A ``pyfunc`` whose code is ``pipeline/tracking/pyfunc.py`` (models from code: no pickle) and whose
weights are the evaluate stage's ``compressed.safetensors``; the ``penni`` package travels with it
(``code_paths``) so the model loads where torch and safetensors are installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import penni

MODEL_NAME = "compressed"
WEIGHTS = ("evaluate", "compressed.safetensors")
MODEL_CODE = Path(__file__).with_name("pyfunc.py")
REQUIREMENTS = ["torch", "safetensors", "numpy"]


def example_input(cfg):
    """One input image of the shape the model expects (zeros: it only shows the shape)."""
    import numpy as np

    size = cfg.data.image_size
    return np.zeros((1, cfg.model.in_channels, size, size), dtype=np.float32)


def log_compressed_model(tracker, store, cfg, register_as: str | None = None):
    """Log the compressed model on ``tracker``'s parent run (and register it as ``register_as``).
    Returns MLflow's ModelInfo, or None when the run has no compressed model (evaluate did not run)."""
    import mlflow
    import torch
    from mlflow.models import Model, infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with tempfile.TemporaryDirectory(prefix="penni-model-") as tmp:
        weights = _fetch_weights(store, Path(tmp))
        if weights is None:
            return None
        x = example_input(cfg)
        with torch.inference_mode():
            y = penni.load(weights).eval()(torch.as_tensor(x)).numpy()
        with _use_tracking_uri(tracker.tracking_uri), _mlflow_settings(tracker.experiment_id):
            return Model.log(
                artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=tracker.parent_run_id,
                python_model=str(MODEL_CODE), artifacts={"weights": str(weights)},
                code_paths=[str(Path(penni.__file__).parent)], input_example=x,
                signature=infer_signature(x, y), pip_requirements=REQUIREMENTS,
                registered_model_name=register_as, await_registration_for=0,
                tags={"penni.run_name": cfg.name},
            )


def _fetch_weights(store, tmp: Path) -> Path | None:
    """The compressed weights as a local file (downloaded from a remote store), None when absent."""
    stage, name = WEIGHTS
    if store.read_manifest(stage) is None:
        return None
    return store.fetch_stage(stage, tmp / stage) / name


@contextlib.contextmanager
def _mlflow_settings(experiment_id: str) -> Iterator[None]:
    """The run's experiment for the logged model (MLflow takes it from the environment, not the run), and
    no INFO lines or progress bars from MLflow while it logs and validates the model."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    env = {"MLFLOW_EXPERIMENT_ID": str(experiment_id), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    saved = {k: os.environ.get(k) for k in env}
    logger.setLevel(logging.WARNING)
    os.environ.update(env)
    try:
        yield
    finally:
        logger.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
