"""The tiny pipeline tracked by a real MLflow server process whose artifacts go to S3.

``mlflow server`` (SQLite backend in a temporary directory, ``--artifacts-destination
s3://<bucket>/mlflow`` on moto's S3 server, both on 127.0.0.1) is started and stopped by the
fixture. The pipeline runs once, in-process, with ``--tracking-uri http://127.0.0.1:PORT``: the
parent run and one child run per stage exist on the server, and the stage files the children logged
are objects in the bucket, byte for byte equal to the committed stage outputs.
"""
from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.stages.table import STAGES
from tests.s3_server import mlflow_server, run_pipeline, s3_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """(S3 endpoint, tracking URI, pipeline process, run root) of one tracked pipeline run."""
    tmp = tmp_path_factory.mktemp("mlflow_server")
    with s3_server(tmp) as s3, mlflow_server(tmp, s3) as uri:
        storage = tmp / "runs"
        proc = run_pipeline(["--in-process", "--storage", str(storage), "--tracking-uri", uri], s3.env,
                            tmp / "pipeline.log")
        yield s3, uri, proc, storage / "tiny"


def test_parent_and_child_runs_are_on_the_server(tracked_run):
    from mlflow import MlflowClient

    _, uri, proc, root = tracked_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    state = json.loads((root / "pipeline.json").read_text())
    assert state["tracking_uri"] == uri
    client = MlflowClient(uri)
    parent = client.get_run(state["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.info.run_name for run in children) == sorted(STAGES)
    assert all(run.info.status == "FINISHED" for run in children)
    baseline = next(run for run in children if run.info.run_name == "baseline")
    assert any(name.endswith("top1") for name in baseline.data.metrics), baseline.data.metrics


def test_artifacts_are_in_the_bucket(tracked_run):
    from mlflow import MlflowClient

    s3, uri, proc, root = tracked_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    client = MlflowClient(uri)
    parent_id = json.loads((root / "pipeline.json").read_text())["mlflow_parent_run_id"]
    experiment = client.get_run(parent_id).info.experiment_id
    keys = s3.keys("mlflow/")
    for run in client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"):
        if run.info.run_name not in ("baseline", "finetune"):
            continue
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "model.safetensors" in logged, (run.info.run_name, logged)
        key = f"mlflow/{experiment}/{run.info.run_id}/artifacts/model.safetensors"
        assert key in keys, (key, keys[:20])
        local = (root / run.info.run_name / "model.safetensors").read_bytes()
        assert hashlib.sha256(s3.read(key)).hexdigest() == hashlib.sha256(local).hexdigest()
