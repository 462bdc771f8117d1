"""The sweep: real Ray Tune trials on Ray Train (2 workers each), ASHA, real MLflow (SQLite), real
Fashion-MNIST at the tiny scale; the driver is SIGKILLed after the first finished trial and rerun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config.loading import load_config
from pipeline.stages.table import STAGES
from pipeline.sweep import SweepUsageError, draw_trials, main, pareto_front, parse_list, select_winner
from pipeline.sweep.pareto import read_csv
from pipeline.sweep.plan import build_plan, parse_args
from pipeline.sweep.tuning import concurrent_trials

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(1800)  # ~6 min on an idle 2-core machine; room for a loaded one
SWEEP = "sw"
TRIALS = [f"{SWEEP}-t{i:02d}" for i in range(4)]
FULL_FINETUNE_EPOCHS = 2   # the winner's; trials fine-tune for 1


def _args(storage: Path) -> list[str]:
    # 2 workers x 0.5 CPU + 1 CPU for the trial's own process: one trial at a time on 2 cores.
    # seed 1 draws λ = 3.1e-5, 0.609, 1.68e-5, 1.4: the large ones collapse (val top-1 ~10%), and ASHA stops
    # a collapsed trial whose first report comes after better ones.
    return ["--config", "tiny", "--storage", str(storage), "--sweep-name", SWEEP, "--l1", "1e-7,3", "--set", "seed=1",
            "--num-samples", "4", "--workers-per-trial", "2", "--set", "ray.cpus_per_worker=0.5",
            "--set", f"finetune.epochs={FULL_FINETUNE_EPOCHS}", "--trial-finetune-epochs", "1",
            "--scheduler", "asha", "--grace-period", "1", "--max-top1-drop", "100"]


def _driver(storage: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(REPO / "workflows" / "sweep.py"), *_args(storage)], cwd=REPO,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _finished(storage: Path) -> list[Path]:
    return sorted(storage.glob(f"{SWEEP}-t*/sweep_trial.json"))


def _created(run_dir: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["created"] for p in sorted(run_dir.glob("*/manifest.json"))}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Run the sweep, SIGKILL its driver once the first trial has finished, rerun the same command."""
    storage = tmp_path_factory.mktemp("sweep")
    first = _driver(storage, storage / "first.log")
    deadline = time.monotonic() + 600
    while not _finished(storage) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _finished(storage), (storage / "first.log").read_text()[-3000:]
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done = _finished(storage)[0].parent
    before = {"run": done.name, "created": _created(done), "result": (done / "sweep_trial.json").read_text()}
    time.sleep(2)  # Ray's processes of the killed driver follow it
    second = _driver(storage, storage / "second.log")
    assert second.wait(timeout=800) == 0, (storage / "second.log").read_text()[-5000:]
    return storage, before


def _mlflow(storage: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    return client, client.get_experiment_by_name("penni").experiment_id


def test_rerun_after_sigkill_completes_without_rerunning_the_finished_trial(sweep):
    storage, before = sweep
    done = storage / before["run"]
    assert _created(done) == before["created"] and set(before["created"]) == set(STAGES) - {"report"}
    assert (done / "sweep_trial.json").read_text() == before["result"]
    second = (storage / "second.log").read_text()
    assert "== step 2: 4 of 4" not in second and "trial(s) to run on Ray Tune" in second
    assert f"Trial {before['run']} started" not in second
    client, exp = _mlflow(storage)
    run = client.search_runs([exp], f"tags.`penni.trial` = '{before['run']}' and tags.`penni.sweep_role` = 'trial'")
    assert len(run) == 1 and "penni.resumes" not in run[0].data.tags  # never re-attached


def test_children_under_one_sweep_parent_and_the_winner_tagged(sweep):
    storage, _ = sweep
    client, exp = _mlflow(storage)
    parents = client.search_runs([exp], f"tags.`penni.sweep` = '{SWEEP}' and tags.`penni.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    roles = sorted(c.data.tags["penni.sweep_role"] for c in children)
    assert roles == ["base", "trial", "trial", "trial", "trial", "winner"]
    trials = {c.data.tags["penni.trial"]: c for c in children if c.data.tags["penni.sweep_role"] == "trial"}
    assert sorted(trials) == TRIALS
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    winner = parent.data.tags["penni.winner"]
    assert trials[winner].data.tags.get("penni.winner") == "true"
    assert sum(c.data.tags.get("penni.winner") == "true" for c in trials.values()) == 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "pareto.png", "trials.csv", "sweep.md"} <= artifacts


def test_asha_stopped_a_trial_after_its_first_epochs(sweep):
    storage, _ = sweep
    state = json.loads((storage / f"{SWEEP}-sweep" / "state.json").read_text())
    stopped = state["stopped"]
    assert stopped, "ASHA stopped no trial"
    finished = {p.parent.name for p in _finished(storage)}
    assert set(stopped).isdisjoint(finished) and set(stopped) | finished == set(TRIALS)
    for name, row in stopped.items():
        assert 1 <= row["epochs"] < 3  # reports of a full trial: 1 retrain epoch, 1 fine-tune epoch, the final one
        assert not (storage / name / "evaluate" / "manifest.json").exists()
    client, exp = _mlflow(storage)
    runs = client.search_runs([exp], "tags.`penni.stopped_early` = 'true'")
    assert sorted(r.data.tags["penni.trial"] for r in runs) == sorted(stopped)
    assert "stopped early (ASHA)" in (storage / f"{SWEEP}-sweep" / "sweep.md").read_text()


def test_pareto_csv_is_the_non_dominated_trials_and_the_png_exists(sweep):
    storage, _ = sweep
    out = storage / f"{SWEEP}-sweep"
    trials = read_csv(out / "trials.csv")
    assert {r["run"] for r in trials} == {p.parent.name for p in _finished(storage)}

    def dominated(row):
        return any(o["val_top1"] >= row["val_top1"] and o["dense_macs"] <= row["dense_macs"]
                   and (o["val_top1"] > row["val_top1"] or o["dense_macs"] < row["dense_macs"]) for o in trials)

    assert read_csv(out / "pareto.csv") == [r for r in trials if not dominated(r)]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_winner_obeys_the_rule_and_its_full_length_stages_ran_from_its_checkpoint(sweep):
    storage, _ = sweep
    out = storage / f"{SWEEP}-sweep"
    trials = read_csv(out / "trials.csv")
    base = json.loads((storage / f"{SWEEP}-base" / "baseline" / "manifest.json").read_text())["metrics"]
    floor = base["selected_val_top1"] - 100 / 100.0  # --max-top1-drop 100 (points)
    eligible = [r for r in trials if r["val_top1"] >= floor]
    expected = min(eligible, key=lambda r: (r["dense_macs"], -r["val_top1"], r["run"]))
    client, exp = _mlflow(storage)
    parent = client.search_runs([exp], f"tags.`penni.sweep` = '{SWEEP}' and tags.`penni.role` = 'sweep'")[0]
    winner = parent.data.tags["penni.winner"]
    assert winner == expected["run"]
    full, trial = storage / f"{winner}-full", storage / winner
    manifests = {s: json.loads((full / s / "manifest.json").read_text()) for s in STAGES}
    for stage in ("baseline", "decompose", "retrain", "prune"):  # the trial's stages, taken over
        assert manifests[stage] == json.loads((trial / stage / "manifest.json").read_text())
    assert json.loads((trial / "finetune" / "manifest.json").read_text())["metrics"]["epochs"] == 1
    assert manifests["finetune"]["metrics"]["epochs"] == FULL_FINETUNE_EPOCHS
    assert manifests["finetune"]["created"] > manifests["prune"]["created"]
    assert (full / "report" / "evaluation.json").exists() or (full / "evaluate" / "evaluation.json").exists()


# ------------------------------------------------------------------------------------ no Ray needed


def test_trials_are_drawn_from_the_sweep_section_reproducibly():
    cfg = load_config("tiny", ["sweep.d=[3, 5, 7]", "sweep.l1=[1e-5, 1e-3]", "sweep.prune_s=[0.5, 1.0]",
                               "sweep.num_samples=6"])
    trials = draw_trials(cfg.sweep, "s", cfg.seed)
    assert [t.name for t in trials] == [f"s-t{i:02d}" for i in range(6)]
    assert all(t.params["d"] in (3, 5, 7) and 1e-5 <= t.params["l1"] <= 1e-3 and t.params["prune_s"] in (0.5, 1.0)
               and "channel_target" not in t.params for t in trials)
    assert draw_trials(cfg.sweep, "s", cfg.seed) == trials
    fewer = load_config("tiny", ["sweep.d=[3, 5, 7]", "sweep.l1=[1e-5, 1e-3]", "sweep.prune_s=[0.5, 1.0]",
                                 "sweep.num_samples=2"])
    assert draw_trials(fewer.sweep, "s", cfg.seed) == trials[:2]  # more samples keep the first ones
    assert "prune.s=0.5" in trials[0].overrides() or "prune.s=1.0" in trials[0].overrides()


def test_pareto_front_and_both_selection_rules():
    rows = [{"run": "a", "val_top1": 0.90, "dense_macs": 50.0}, {"run": "b", "val_top1": 0.80, "dense_macs": 30.0},
            {"run": "c", "val_top1": 0.80, "dense_macs": 60.0}, {"run": "d", "val_top1": 0.90, "dense_macs": 50.0}]
    assert pareto_front(rows, "dense_macs") == [True, True, False, True]
    cfg = load_config("tiny", ["sweep.max_top1_drop=5"])
    winner, rule = select_winner(rows, cfg.sweep, baseline_val_top1=0.92)  # floor 0.87: a or d, fewest MACs, by name
    assert winner["run"] == "a" and "87.00%" in rule
    winner, _ = select_winner(rows, load_config("tiny", ["sweep.max_top1_drop=20"]).sweep, 0.92)
    assert winner["run"] == "b"
    under = load_config("tiny", ["sweep.select=best_top1_under", "sweep.max_macs=55"]).sweep
    assert select_winner(rows, under, 0.92)[0]["run"] == "a"
    strict = load_config("tiny", ["sweep.select=best_top1_under", "sweep.max_macs=10"]).sweep
    assert select_winner(rows, strict, 0.92)[0] is None


def test_concurrency_never_starves_a_trials_own_workers(tmp_path):
    args = parse_args(["--config", "tiny", "--storage", str(tmp_path), "--workers-per-trial", "2",
                       "--set", "ray.cpus_per_worker=1"])
    plan = build_plan(args)
    assert concurrent_trials(plan, {"CPU": 8.0}) == 2        # 1 (the trial) + 2 x 1 (its workers) each
    assert concurrent_trials(plan, {"CPU": 3.0}) == 1
    with pytest.raises(SweepUsageError, match="one trial needs 3 CPU"):
        concurrent_trials(plan, {"CPU": 2.0})
    plan.base_cfg.sweep.max_concurrent_trials = 1
    assert concurrent_trials(plan, {"CPU": 8.0}) == 1


def test_invalid_flags_exit_2_before_anything_starts(tmp_path, capsys):
    assert main(["--config", "tiny", "--storage", str(tmp_path / "runs"), "--d", "3,five"]) == 2
    err = capsys.readouterr().err
    assert "--d" in err and "'five'" in err
    assert main(["--config", "tiny", "--storage", str(tmp_path / "runs"), "--l1", "1e-3,0"]) == 2
    assert "must be a finite number > 0" in capsys.readouterr().err
    assert main(["--config", "tiny", "--storage", str(tmp_path / "runs"), "--select", "best_top1_under"]) == 2
    assert "sweep.max_macs" in capsys.readouterr().err
    assert main(["--config", "tiny", "--storage", str(tmp_path / "runs"),
                 "--set", "model.weights=/nonexistent/weights.pth"]) == 2
    assert "model.weights" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert parse_list("3, 5,3", "--d", int) == [3, 5]
