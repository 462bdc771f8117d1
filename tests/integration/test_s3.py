"""The tiny pipeline on a real S3 endpoint (moto's server on 127.0.0.1): ``--storage s3://bucket/runs``.

One pipeline run and one re-run are shared by the tests. The first run's baseline trains 3 epochs on
2 Ray Train workers and fails once at the start of epoch 2 (``PENNI_FAIL_ONCE``); the stage retry
starts a new trainer that must resume from the checkpoint in the bucket. (Not at epoch 1: the rank
that does not upload would fail while rank 0 still uploads epoch 0's checkpoint, which Ray Train
then never records, so there would be nothing to resume from.) Every stage commits to the bucket (manifest last); the re-run skips them all.
The endpoint reaches pyarrow, Ray Train and the workers only through ``AWS_ENDPOINT_URL(_S3)``.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager

import pytest

from pipeline.stages.table import STAGES, TRAINING_STAGES
from pipeline.storage.run_store import RunStore
from tests.s3_server import run_pipeline, s3_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
RUNS = "runs"


@contextmanager
def _environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _manifests(s3) -> dict[str, bytes]:
    return {key: s3.read(key) for key in s3.keys(f"{RUNS}/tiny/") if key.endswith("/manifest.json")}


@pytest.fixture(scope="module")
def s3_runs(tmp_path_factory):
    """(endpoint, first run, manifests after it, re-run, marker file of the injected failure)."""
    tmp = tmp_path_factory.mktemp("s3")
    marker = tmp / "baseline-failed-once"
    with s3_server(tmp) as s3:
        env = {**s3.env, "PENNI_FAIL_ONCE": f"baseline:2:{marker}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        args = ["--storage", f"s3://{s3.bucket}/{RUNS}", "--set", "baseline.epochs=3"]
        first = run_pipeline(args, env, tmp / "first.log")
        after_first = _manifests(s3)
        second = run_pipeline(args, env, tmp / "second.log")
        yield s3, first, after_first, second, marker


def test_every_stage_commits_to_the_bucket(s3_runs):
    s3, first, after_first, _, _ = s3_runs
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert sorted(after_first) == sorted(f"{RUNS}/tiny/{stage}/manifest.json" for stage in STAGES)
    keys = s3.keys(f"{RUNS}/tiny/")
    assert not [k for k in keys if ".tmp-" in k or k.endswith("/.lock")]  # no leftovers, lock released
    with _environment(s3.env):  # a fresh reader verifies every file's size and sha256 in the bucket
        store = RunStore(f"s3://{s3.bucket}/{RUNS}", "tiny")
        assert not store.is_local
        assert {stage: store.verify(stage) for stage in STAGES} == {stage: None for stage in STAGES}
    model = json.loads(after_first[f"{RUNS}/tiny/baseline/manifest.json"])["files"]["model.safetensors"]
    assert model["size"] == len(s3.read(f"{RUNS}/tiny/baseline/model.safetensors"))


def test_interrupted_training_stage_resumes_from_its_checkpoint_in_s3(s3_runs):
    s3, first, after_first, _, marker = s3_runs
    out = first.stdout + first.stderr
    assert marker.exists(), out[-4000:]  # the failure was injected
    assert "injected failure at baseline epoch 2" in out
    resumed = re.findall(r"\[baseline\] resuming from epoch (\d+) \(checkpoint (\S+)\)", out)
    assert resumed and int(resumed[0][0]) in (1, 2), out[-4000:]  # not trained again from epoch 0
    checkpoints = [k for k in s3.keys(f"{RUNS}/tiny/_train/") if k.startswith(f"{RUNS}/tiny/_train/baseline-")]
    assert any("/checkpoint_" in k and k.endswith("/model.safetensors") for k in checkpoints), checkpoints
    for stage in TRAINING_STAGES:  # every training stage checkpointed into the bucket
        assert any(k.startswith(f"{RUNS}/tiny/_train/{stage}-") for k in s3.keys(f"{RUNS}/tiny/_train/")), stage


def test_rerun_skips_every_stage(s3_runs):
    s3, _, after_first, second, _ = s3_runs
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert _manifests(s3) == after_first  # no stage was committed again
    assert "resuming from epoch" not in second.stdout + second.stderr


def test_parquet_shards_are_read_from_the_bucket(tmp_path):
    """The torch-Dataset path of ``data.dataset=parquet`` over ``s3://``: the same splits and pixels as from disk.
    (The full pipeline on S3 shards with Ray Data is not run here.)"""
    import numpy as np
    import torch
    from PIL import Image

    import pipeline.data as D
    from pipeline.config.schema import DataConfig

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 4)):
        for c in range(3):
            folder = tmp_path / "tree" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8) // (c + 1), "RGB").save(folder / f"{i}.png")
    D.write_parquet_shards(tmp_path / "tree", tmp_path / "shards", rows_per_shard=10)

    def cfg(root):
        return DataConfig(dataset="parquet", root=str(root), train_subset=None, val_subset=None, test_subset=None,
                          val_fraction=0.25, image_size=32)

    with s3_server(tmp_path) as s3, _environment(s3.env):
        for shard in sorted((tmp_path / "shards").rglob("*.parquet")):
            s3.client().upload_file(str(shard), s3.bucket, f"shards/{shard.relative_to(tmp_path / 'shards').as_posix()}")
        remote = D.build_datasets(cfg(f"s3://{s3.bucket}/shards"), seed=0)
        local = D.build_datasets(cfg(tmp_path / "shards"), seed=0)
        assert len(remote.train) == len(local.train) == 27 and len(remote.test) == len(local.test) == 12
        assert np.array_equal(remote.train.indices, local.train.indices)
        assert all(torch.equal(remote.test[i][0], local.test[i][0]) for i in range(len(local.test)))
