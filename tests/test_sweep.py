"""The d / λ sweep: real Ray Tune trials, real MLflow (SQLite), real Fashion-MNIST, tiny config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import STAGES
from pipeline.sweep import l1_tag, main, pareto_front, parse_list, SweepUsageError, trial_name

pytestmark = pytest.mark.timeout(900)

SWEEP = "sw"
RUNS = [f"{SWEEP}-base", f"{SWEEP}-d3-l1_0.001", f"{SWEEP}-d5-l1_0.001"]


def _sweep(storage: Path, *extra: str) -> int:
    return main(["--config", "tiny", "--storage", str(storage), "--sweep-name", SWEEP, "--d", "3,5", "--l1", "1e-3",
                 "--cpus-per-trial", "1", "--max-concurrent", "2", "--max-failures", "0", *extra])


def _created(storage: Path) -> dict[str, str]:
    """Every manifest's commit time (base run: baseline only; trials: every stage)."""
    return {str(p.relative_to(storage)): json.loads(p.read_text())["created"]
            for p in sorted(storage.glob("*/*/manifest.json"))}


def _table_rows(storage: Path) -> list[list[str]]:
    text = (storage / f"{SWEEP}-sweep.md").read_text()
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {SWEEP}-")]


@pytest.fixture(scope="module")
def sweep(local_ray, tmp_path_factory):
    storage = tmp_path_factory.mktemp("sweep")
    assert _sweep(storage) == 0
    return storage


def test_two_trials_in_the_table_with_a_pareto_marker(sweep):
    rows = _table_rows(sweep)
    assert [r[0] for r in rows] == RUNS[1:]
    assert sorted(int(r[1]) for r in rows) == [3, 5]
    assert all(0.0 < float(r[3]) <= 100.0 and 0.0 < float(r[4]) <= 100.0 for r in rows)  # val, test top-1 %
    assert any(r[-1] == "*" for r in rows)
    assert "Pareto-optimal" in (sweep / f"{SWEEP}-sweep.md").read_text()


def test_trials_start_from_the_shared_baseline_trained_once(sweep):
    base = json.loads((sweep / RUNS[0] / "baseline" / "manifest.json").read_text())
    assert base["metrics"]["epochs"] == 1  # tiny: one baseline epoch, trained in the base run
    assert not (sweep / RUNS[0] / "decompose").exists()  # the base run only runs its baseline
    for run in RUNS[1:]:
        manifests = {s: json.loads((sweep / run / s / "manifest.json").read_text()) for s in STAGES}
        assert manifests["baseline"]["metrics"]["epochs"] == 0  # loaded, not trained
        # the trial's baseline is the base run's model, weights unchanged
        assert manifests["baseline"]["metrics"]["val_top1"] == pytest.approx(base["metrics"]["selected_val_top1"])
        assert manifests["evaluate"]["metrics"]["baseline_test_top1"] > 0


def test_mlflow_parents_tagged_with_the_sweep(sweep):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import read_runs

    uri = f"sqlite:///{sweep / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("penni")
    parents = client.search_runs([exp.experiment_id], f"tags.`penni.sweep` = '{SWEEP}' and tags.`penni.role` = 'pipeline'")
    by_name = {r.info.run_name: r for r in parents}
    assert sorted(by_name) == sorted(RUNS)
    assert all(r.info.status == "FINISHED" for r in parents)
    checkpoint = str(sweep / RUNS[0] / "baseline" / "model.safetensors")
    for run in RUNS[1:]:
        r = by_name[run]
        assert r.data.tags["penni.sweep_role"] == "trial"
        assert r.data.params["baseline.checkpoint"] == checkpoint and r.data.params["baseline.epochs"] == "0"
        assert {"val/top1", "reduction/sparse_macs_pct", "test/top1"} <= set(r.data.metrics)
    base_children = read_runs(uri, "penni", by_name[RUNS[0]].info.run_id)
    assert [c["stage"] for c in base_children] == ["baseline"]


def test_rerun_of_the_same_sweep_runs_no_stage(sweep):
    before = _created(sweep)
    assert len(before) == 1 + 2 * len(STAGES)
    assert _sweep(sweep) == 0
    assert _created(sweep) == before
    assert [r[0] for r in _table_rows(sweep)] == RUNS[1:]


def test_invalid_d_exits_2_before_anything_starts(tmp_path, capsys):
    assert main(["--config", "tiny", "--storage", str(tmp_path / "runs"), "--d", "3,five", "--l1", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "--d" in err and "'five'" in err
    assert main(["--config", "tiny", "--storage", str(tmp_path / "runs"), "--d", "0", "--l1", "1e-3"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_names_lists_and_pareto_front():
    assert [l1_tag(v) for v in (1e-3, 3e-3, 1e-5, 0.0, 1e20)] == ["0.001", "0.003", "1e-5", "0.0", "1e20"]
    assert trial_name("s", 5, 1e-4) == "s-d5-l1_0.0001"
    assert parse_list("3, 5,3", "--d", int) == [3, 5]
    assert parse_list("1e-3,0", "--l1", float) == [1e-3, 0.0]
    for bad, kind in (("3,", int), ("2.5", int), ("nan", float), ("-1e-3", float)):
        with pytest.raises(SweepUsageError):
            parse_list(bad, "--x", kind)
    rows = [{"val_top1": 0.9, "sparse_macs_reduction_pct": 50.0}, {"val_top1": 0.8, "sparse_macs_reduction_pct": 70.0},
            {"val_top1": 0.8, "sparse_macs_reduction_pct": 40.0}, {"val_top1": 0.9, "sparse_macs_reduction_pct": 50.0}]
    assert pareto_front(rows) == [True, True, False, True]


def test_sweep_with_a_missing_weights_file_fails_before_anything_is_written(tmp_path, capsys):
    from pipeline.sweep import main as sweep_main

    storage = tmp_path / "sweep"
    assert sweep_main(["--config", "tiny", "--d", "3", "--l1", "1e-3", "--storage", str(storage),
                       "--set", "model.weights=/nonexistent/weights.pth"]) == 2
    assert "model.weights" in capsys.readouterr().err
    assert not storage.exists()
