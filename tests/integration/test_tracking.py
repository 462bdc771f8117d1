"""pipeline.tracking against a real MLflow (SQLite backend in tmp_path)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.tracking.runs import EpochLogger, Tracker, read_runs
from pipeline.tracking.uri import TrackingError, resolve_tracking_uri

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- no mlflow needed


def test_import_does_not_pull_mlflow():
    code = "import sys, pipeline.tracking, pipeline.storage; " \
           "bad = [m for m in ('mlflow', 'ray', 'pyarrow') if m in sys.modules]; " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "runs" / "r1"
    uri = resolve_tracking_uri(None, None, root)
    assert uri == f"sqlite:///{root.resolve()}/mlflow.db"
    assert uri.startswith("sqlite:////")  # absolute path
    assert root.is_dir()  # parent dirs created
    assert resolve_tracking_uri(None, "http://cfg:5000", root) == "http://cfg:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, "http://cfg:5000", root) == "http://env:5000"
    assert resolve_tracking_uri("http://cli:5000", "http://cfg:5000", root) == "http://cli:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # remote run root: the DB goes into the cwd
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, None, None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    # relative sqlite paths are made absolute (Ray workers chdir)
    assert resolve_tracking_uri("sqlite:///rel/x.db", None, None) == (
        f"sqlite:///{tmp_path.resolve()}/rel/x.db"
    )
    assert (tmp_path / "rel").is_dir()


@pytest.mark.parametrize("bad", ["file:///tmp/mlruns", "./mlruns", "/abs/mlruns", "file:mlruns"])
def test_resolve_rejects_file_store(tmp_path, monkeypatch, bad):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="sqlite"):
        resolve_tracking_uri(bad, None, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", bad)
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None, None, tmp_path)


def test_epoch_logger_pickles_without_client():
    lg = EpochLogger("sqlite:////x/mlflow.db", "abc")
    lg._client = object()  # must not be pickled
    lg2 = pickle.loads(pickle.dumps(lg))
    assert (lg2.tracking_uri, lg2.run_id, lg2._client) == ("sqlite:////x/mlflow.db", "abc", None)


# ----------------------------------------------------------------------------- real MLflow

import mlflow  # noqa: E402


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """One SQLite DB for the module (creating one runs migrations: several seconds)."""
    d = tmp_path_factory.mktemp("store")
    u = resolve_tracking_uri(f"sqlite:///{d}/mlflow.db", None, None)
    _client(u).search_experiments()  # run the migrations once
    return d


@pytest.fixture
def uri(store_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # run from an unrelated cwd: nothing may land there (Ray workers chdir)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return resolve_tracking_uri(None, None, store_dir)


@pytest.fixture
def exp(request):
    """A fresh experiment name per test (the DB is shared)."""
    return "exp-" + request.node.name.replace("[", "-").replace("]", "")


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_parent_and_stage_runs(uri, store_dir, tmp_path):
    tr = Tracker(uri, "penni-test", "quick")
    pid = tr.start_parent(
        None,
        {"model": {"arch": "resnet8", "kwargs": {}}, "retrain": {"lr": 0.1}, "long": "x" * 7000},
        tags={"penni.config_hash": "h1"},
    )
    assert tr.parent_run_id == pid
    c = _client(uri)
    exp = c.get_experiment_by_name("penni-test")
    assert exp.artifact_location == (store_dir / "mlartifacts" / "penni-test").resolve().as_uri()

    with tr.stage_run("baseline", params={"epochs": 2}) as sr:
        for epoch in range(3):
            sr.log_metrics({"train": {"loss": 1.0 / (epoch + 1)}, "val_top1": 0.1 * epoch}, step=epoch)
        with pytest.warns(RuntimeWarning, match="'bad' \\(not finite\\)"):
            sr.log_metrics({"bad": float("nan"), "text": "hello", "ok": 1, "epochs": 3})
        sr.set_tags({"penni.note": "hi"})
        art = tmp_path / "metrics.json"
        art.write_text("{}")
        sr.log_artifact(art)
        d = tmp_path / "pics"
        d.mkdir()
        (d / "a.txt").write_text("a")
        (d / "b.txt").write_text("b")
        sr.log_artifacts(d, artifact_path="pictures")
        baseline_id = sr.run_id
    with tr.stage_run("decompose") as sr2:
        sr2.log_metrics({"params": 1234})
    tr.end_parent()

    parent = c.get_run(pid)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.arch"] == "resnet8"
    assert parent.data.params["retrain.lr"] == "0.1"
    assert parent.data.params["model.kwargs"] == "{}"
    assert len(parent.data.params["long"]) <= 6000
    assert parent.data.tags["penni.config_hash"] == "h1"

    runs = read_runs(uri, "penni-test", pid)
    assert [r["name"] for r in runs] == ["baseline", "decompose"]
    assert all(r["status"] == "FINISHED" for r in runs)
    assert runs[0]["stage"] == "baseline" and runs[0]["params"] == {"epochs": "2"}
    assert runs[0]["metrics"]["val/top1"] == pytest.approx(0.2)
    assert runs[0]["metrics"]["ok"] == 1.0
    assert "bad" not in runs[0]["metrics"] and "text" not in runs[0]["metrics"]
    assert runs[0]["tags"]["penni.note"] == "hi"
    # text and counters are tags, not metrics
    assert runs[0]["tags"]["penni.text"] == "hello" and runs[0]["tags"]["penni.epochs"] == "3"
    assert "epochs" not in runs[0]["metrics"]
    assert runs[1]["metrics"] == {"params": 1234.0}

    hist = c.get_metric_history(baseline_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(0, 1.0), (1, 0.5), (2, 0.33333)]  # rounded
    child = c.get_run(baseline_id)
    assert child.data.tags["mlflow.parentRunId"] == pid
    assert child.data.tags["penni.stage"] == "baseline"

    top = {f.path for f in c.list_artifacts(baseline_id)}
    assert top == {"metrics.json", "pictures"}
    assert {f.path for f in c.list_artifacts(baseline_id, "pictures")} == {
        "pictures/a.txt",
        "pictures/b.txt",
    }
    # artifacts live beside the DB, never in the cwd
    assert list(Path.cwd().iterdir()) == []
    assert list((store_dir / "mlartifacts" / "penni-test").rglob("a.txt"))


def test_reattach_same_parent_and_orphan_failed(uri, exp):
    tr = Tracker(uri, exp, "r")
    pid = tr.start_parent(None, {"a": 1, "b": {"c": "x"}})
    # simulate a crash inside a stage: the child run is never ended
    cm = tr.stage_run("retrain")
    orphan = cm.__enter__()
    orphan.log_metrics({"loss": 1.0}, step=0)
    c = _client(uri)
    assert c.get_run(orphan.run_id).info.status == "RUNNING"

    # resume in a "new process": a fresh Tracker, same parent id, one param changed
    tr2 = Tracker(uri, exp, "r")
    pid2 = tr2.start_parent(pid, {"a": 1, "b": {"c": "y"}, "new": 3})
    assert pid2 == pid
    exp_id = c.get_experiment_by_name(exp).experiment_id
    parents = c.search_runs([exp_id], filter_string="tags.`penni.role` = 'pipeline'")
    assert [r.info.run_id for r in parents] == [pid]  # no second parent
    assert c.get_run(orphan.run_id).info.status == "FAILED"
    assert c.get_run(orphan.run_id).data.tags["penni.crashed"] == "true"
    p = c.get_run(pid)
    assert p.info.status == "RUNNING"
    assert p.data.params["a"] == "1" and p.data.params["b.c"] == "x" and p.data.params["new"] == "3"
    assert p.data.tags["penni.param_changed.b.c"] == "y"
    assert p.data.tags["penni.resumes"] == "1"

    # skipped stage: a parent tag, no child run
    tr2.log_skipped("baseline", {"fingerprint": "abc"})
    with tr2.stage_run("retrain"):
        pass
    tr2.end_parent()
    p = c.get_run(pid)
    assert p.data.tags["penni.skipped.baseline"] == "true"
    runs = read_runs(uri, exp, pid)
    assert [(r["name"], r["status"]) for r in runs] == [("retrain", "FAILED"), ("retrain", "FINISHED")]
    assert c.get_run(pid).info.status == "FINISHED"

    # an unknown parent id (e.g. DB deleted) creates a new parent instead of failing
    tr3 = Tracker(uri, exp, "r")
    pid3 = tr3.start_parent("0" * 32, {"a": 1})
    assert pid3 != pid
    # a parent from another experiment is not re-used
    tr4 = Tracker(uri, exp + "-other", "r")
    assert tr4.start_parent(pid, {}) != pid


def test_exception_in_stage_marks_failed(uri, exp):
    tr = Tracker(uri, exp, "r")
    pid = tr.start_parent(None, {})
    with pytest.raises(ValueError, match="boom"):
        with tr.stage_run("prune") as sr:
            sr.log_metrics({"x": 1}, step=0)
            raise ValueError("boom")
    run = _client(uri).get_run(sr.run_id)
    assert run.info.status == "FAILED"
    assert "ValueError: boom" in run.data.tags["penni.error"]
    assert read_runs(uri, exp, pid)[0]["status"] == "FAILED"


def test_stage_run_requires_parent(uri, exp):
    tr = Tracker(uri, exp, "r")
    with pytest.raises(TrackingError, match="start_parent"):
        with tr.stage_run("x"):
            pass


def test_epoch_logger_from_subprocess(uri, exp, tmp_path):
    tr = Tracker(uri, exp, "r")
    tr.start_parent(None, {})
    with tr.stage_run("finetune") as sr:
        lg = sr.epoch_logger()
        blob = tmp_path / "logger.pkl"
        blob.write_bytes(pickle.dumps(lg))
        script = textwrap.dedent(
            f"""
            import os, pickle, sys
            os.chdir({str(tmp_path / 'cwd')!r})  # like a Ray worker's session dir
            lg = pickle.loads(open({str(blob)!r}, 'rb').read())
            for epoch in range(3):
                lg.log({{"val": {{"top1": 0.5 + 0.1 * epoch}}, "lr": 0.1}}, step=epoch)
            lg.strict = True
            lg.log({{"done": 1}}, step=3)
            """
        )
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=env)
        sr.log_metrics({"final": 1.0})
    c = _client(uri)
    hist = c.get_metric_history(sr.run_id, "val/top1")
    assert [(m.step, round(m.value, 6)) for m in sorted(hist, key=lambda m: m.step)] == [
        (0, 0.5),
        (1, 0.6),
        (2, 0.7),
    ]
    assert [m.step for m in c.get_metric_history(sr.run_id, "train/lr")] == [0, 1, 2]
    assert c.get_run(sr.run_id).data.metrics["done"] == 1.0
    assert c.get_run(sr.run_id).info.status == "FINISHED"


def test_epoch_logger_failure_warns(uri):
    lg = EpochLogger(uri, "no-such-run")
    with pytest.warns(RuntimeWarning, match="could not log epoch 0"):
        lg.log({"x": 1.0}, step=0)
    lg.strict = True
    with pytest.raises(Exception):
        lg.log({"x": 1.0}, step=1)


class _State:
    """The two calls of RunStore that parent_run uses, on a dict."""

    def __init__(self):
        self.files = {}

    def read_json(self, rel):
        return self.files.get(rel)

    def write_json_atomic(self, rel, obj):
        self.files[rel] = obj


def test_parent_run_context_manager(uri, exp):
    state = _State()
    tr = Tracker(uri, exp, "r")
    with tr.parent_run({"a": 1}, {"penni.config": "tiny"}, store=state) as t:
        pid = t.parent_run_id
        assert _client(uri).get_run(pid).info.status == "RUNNING"
    assert state.files["pipeline.json"] == {"mlflow_parent_run_id": pid, "tracking_uri": uri}
    run = _client(uri).get_run(pid)
    assert run.info.status == "FINISHED" and run.data.tags["penni.config"] == "tiny"
    # a second run re-attaches through pipeline.json; an error marks it FAILED, Ctrl-C KILLED
    for error, status in ((ValueError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        with pytest.raises(type(error)):
            with Tracker(uri, exp, "r").parent_run({"a": 1}, store=state) as t:
                assert t.parent_run_id == pid
                raise error
        assert _client(uri).get_run(pid).info.status == status


def test_metric_names_group_round_and_move_counters_to_tags():
    from pipeline.tracking.metric_names import split_for_mlflow

    epoch = {"epoch": 2, "epochs": 5, "lr": 0.1, "train_loss": 1.234567891, "val_top1": 0.13075782680736026,
             "sparsity": 0.5, "epoch_seconds": 13.075782680736026, "replicas_in_sync": 1.0}
    metrics, tags, dropped = split_for_mlflow(epoch, step=2)
    assert metrics == {"train/lr": 0.1, "train/loss": 1.2346, "val/top1": 0.13076,
                       "sparsity/coefficients": 0.5, "time/epoch_seconds": 13.076}
    assert tags == {"penni.epochs": "5", "penni.replicas_in_sync": "1"} and dropped == []
    evaluation = {"compressed_test_top1": 0.4, "compressed": {"test_top1": 0.4, "dense_macs": 7338880,
                                                              "latency_mode_bs1": "all-dense"},
                  "baseline": {"dense_macs": 9e6}, "dense_macs_reduction_pct": 18.46,
                  "device": "cpu", "torch_threads": 2, "nan": float("nan")}
    metrics, tags, dropped = split_for_mlflow(evaluation)
    assert metrics == {"test/top1": 0.4, "cost/dense_macs": 7338880.0, "baseline/dense_macs": 9e6,
                       "reduction/dense_macs_pct": 18.46}
    assert tags == {"penni.compressed.latency_mode_bs1": "all-dense", "penni.device": "cpu",
                    "penni.torch_threads": "2"}
    assert dropped == ["nan"]


def test_experiment_opens_in_the_runs_view_with_penni_columns(uri, exp):
    import json

    tr = Tracker(uri, exp, "r")
    tags = _client(uri).get_experiment(tr.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.penni-runs"])
    assert "metrics.`val/top1`" in view["selectedColumns"] and "tags.`penni.config`" in view["selectedColumns"]
    url = tr.ui_url()
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{tr.experiment_id}/runs?")
    assert "workflowType=machine_learning" in url and "viewStateShareKey=penni-runs" in url
    assert "compareRunsMode=CHART" in tr.ui_url(charts=True)
    assert tr.ui_lines()[0].startswith(f"MLflow: mlflow ui --backend-store-uri {uri}")
    # an experiment made without the tags (older penni, by hand) gets them on the next run
    _client(uri).delete_experiment_tag(tr.experiment_id, "mlflow.experimentKind")
    Tracker(uri, exp, "r")
    assert _client(uri).get_experiment(tr.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_compressed_model_is_an_mlflow_model_that_can_be_registered(uri, exp, tmp_path):
    """A pyfunc under the parent run's logged models, registered, loaded back: same logits as penni.load."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    import penni
    from penni.models import build_model
    from pipeline.tracking.logged_model import log_compressed_model

    weights = tmp_path / "evaluate" / "compressed.safetensors"
    weights.parent.mkdir()
    torch.manual_seed(0)
    penni.save(penni.decompose(build_model("fashion_cnn", num_classes=10, in_channels=1), d=3), weights)
    store = SimpleNamespace(read_manifest=lambda stage: {"files": {}}, fetch_stage=lambda stage, dest: weights.parent)
    cfg = SimpleNamespace(name="r", data=SimpleNamespace(image_size=28), model=SimpleNamespace(in_channels=1))
    tr = Tracker(uri, exp, "r")
    with tr.parent_run({}):
        info = log_compressed_model(tr, store, cfg, register_as=f"{exp}-model")
    c = _client(uri)
    assert [m.model_id for m in c.search_logged_models([tr.experiment_id])] == [info.model_id]
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 28, 28)
    assert c.get_model_version(f"{exp}-model", "1").run_id == tr.parent_run_id
    mlflow.set_tracking_uri(uri)
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    got = mlflow.pyfunc.load_model(f"models:/{exp}-model/1").predict(x)
    with torch.inference_mode():
        want = penni.load(weights).eval()(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # no compressed model (evaluate did not run): nothing is logged
    assert log_compressed_model(tr, SimpleNamespace(read_manifest=lambda stage: None), cfg) is None
