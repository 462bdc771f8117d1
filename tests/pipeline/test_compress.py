"""The accuracy budget (compress.max_top1_drop): progressive channel pruning in fine-tuned steps, the last step
within the budget chosen, finished steps reused after a SIGKILL (in-process, no Ray: the prune stage as the DAG
runs it, its training through ``run_training(use_ray=False)``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import penni
from penni.models import build_model
from pipeline.config.loading import load_config
from pipeline.data.loaders import build_datasets, example_batch, make_loader
from pipeline.stages.compress import compress_steps
from pipeline.stages.functions import StageContext, run_prune
from pipeline.training import loop as T
from pipeline.training.distributed import run_training, training_run_name

HERE = Path(__file__).resolve()
OVERRIDES = ["data.train_subset=512", "data.val_subset=256", "prune.rule=channels",
             "prune.target_dense_macs_reduction=0.8", "compress.steps=[0.4, 0.6]", "compress.step_epochs=1",
             "finetune.lr=0.002", "ray.in_process=true"]
STEPS = [0.4, 0.6, 0.8]


def make_inputs(root: Path) -> Path:
    """A narrow fashion_cnn baseline (a few short epochs) and its exact decomposition (d=9 for 3x3 kernels) as the
    retrain stage's output, so every step's loss is the pruning's."""
    cfg = load_config("tiny", OVERRIDES)
    splits = build_datasets(cfg.data, seed=0)
    torch.manual_seed(0)
    model = build_model("fashion_cnn", in_channels=1, widths=(8, 16, 16))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for epoch in range(4):
        T.train_one_epoch(model, make_loader(splits.train, 32, shuffle=True, seed=epoch, drop_last=True), opt,
                          T.Hardware(torch.device("cpu")))
    for stage in ("baseline", "retrain"):
        (root / stage).mkdir(parents=True)
    penni.save(model, root / "baseline" / "model.safetensors")
    penni.save(penni.decompose(model, d=9), root / "retrain" / "model.safetensors")
    return root


def run_prune_stage(inputs: Path, work: Path, out: Path, budget: float) -> dict:
    """The prune stage as ``pipeline.stages.dag`` runs it in-process (its fine-tuning on ``run_training``)."""
    cfg = load_config("tiny", [*OVERRIDES, f"compress.max_top1_drop={budget}"])
    out.mkdir(parents=True, exist_ok=True)

    def train(job):
        return run_training(job, use_ray=False, run_name=training_run_name("prune", "test", job.input_model),
                            storage=(str(work), None), num_workers=1, use_gpu=False, cpus_per_worker=1.0,
                            max_failures=0, local_dir=work)

    ctx = StageContext(cfg=cfg, stage="prune", inputs={"retrain": inputs / "retrain", "baseline": inputs / "baseline"},
                       out_dir=out, train=train, work_dir=work)
    return run_prune(ctx)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def _steps(out: Path) -> dict:
    return json.loads((out / "compress_steps.json").read_text())


def test_the_chosen_step_is_the_last_within_the_budget(inputs, tmp_path):
    cfg = load_config("tiny", OVERRIDES)
    assert compress_steps(cfg) == STEPS  # capped at (and ending with) the cost target
    work = tmp_path / "work"
    free = run_prune_stage(inputs, work, tmp_path / "free", budget=100.0)  # every step within
    every = _steps(tmp_path / "free")
    drops = [r["top1_drop_points"] for r in every["steps"]]
    assert len(drops) == 3 and every["chosen_step"] == free["compress_chosen_step"] == 2
    assert [r["dense_macs_reduction"] for r in every["steps"]] == pytest.approx(STEPS, abs=0.03)
    assert (tmp_path / "free" / "compression_curve.png").stat().st_size > 0
    # a budget between the steps' drops: the first step over it stops the run, the one before it is chosen
    j = next((i for i in range(1, 3) if drops[i] > max(drops[:i])), 0)
    assert drops[j] > 0, drops  # the problem is informative: some step loses accuracy
    budget = max(0.0, (max(drops[:j]) + drops[j]) / 2 if j else drops[0] / 2)
    metrics = run_prune_stage(inputs, work, tmp_path / "budget", budget=budget)  # the same steps, reused
    got = _steps(tmp_path / "budget")
    assert len(got["steps"]) == j + 1, (drops, budget)  # nothing after the first step over the budget ran
    assert got["chosen_step"] == metrics["compress_chosen_step"] == j - 1, (drops, budget)
    assert got["steps"][-1]["top1_drop_points"] > budget >= max([r["top1_drop_points"] for r in got["steps"][:-1]]
                                                                 or [-1.0])
    model = penni.load(tmp_path / "budget" / "model.safetensors")
    x = example_batch(build_datasets(cfg.data, seed=0), batch_size=8)
    expected = every["steps"][j - 1]["dense_macs"] if j else penni.profile(
        penni.load(inputs / "retrain" / "model.safetensors"), x).dense_macs
    assert penni.profile(model, x).dense_macs == expected


def test_finetune_falls_back_to_less_compressed_candidates_while_over_the_budget(inputs, tmp_path):
    """The prune stage commits the less compressed candidates (prepared like its model); finetune's budget check
    fine-tunes them in order, most compressed first, until one is within the budget, else keeps the last."""
    from types import SimpleNamespace

    from pipeline.stages.compress import FALLBACKS, keep_within_budget

    out = tmp_path / "out"
    run_prune_stage(inputs, tmp_path / "work", out, budget=100.0)  # every step within: step 3 chosen
    listed = json.loads((out / "fallbacks.json").read_text())
    assert [c["step"] for c in listed] == [1, 0][:FALLBACKS]
    cfg = load_config("tiny", OVERRIDES)
    x = example_batch(build_datasets(cfg.data, seed=0), batch_size=8)
    chosen = penni.profile(penni.load(out / "model.safetensors"), x).dense_macs
    costs = [penni.profile(penni.load(out / c["file"]), x).dense_macs for c in listed]
    assert chosen < costs[0] < costs[1], (chosen, costs)  # each candidate less compressed than the one before
    steps = json.loads((out / "compress_steps.json").read_text())
    steps["max_top1_drop"] = 1.0
    (out / "compress_steps.json").write_text(json.dumps(steps))
    baseline = steps["baseline_val_top1"]
    lines, calls = [], []

    def fine_tune(results):
        def run(path):
            calls.append(path.name)
            return {"selected_val_top1": results[len(calls) - 1]}
        return run

    ctx = SimpleNamespace(inputs={"prune": out}, log=lines.append)
    got = keep_within_budget(ctx, {"selected_val_top1": baseline - 0.03}, fine_tune([baseline - 0.02, baseline]))
    assert calls == ["fallback_1.safetensors", "fallback_2.safetensors"] and got["compress_fallbacks"] == 2
    assert got["compress_within_budget"] == 1.0 and got["compress_final_top1_drop_points"] == pytest.approx(0.0)
    calls.clear()
    got = keep_within_budget(ctx, {"selected_val_top1": baseline - 0.005}, fine_tune([]))  # within: nothing more
    assert calls == [] and got["compress_fallbacks"] == 0 and got["compress_within_budget"] == 1.0
    got = keep_within_budget(ctx, {"selected_val_top1": baseline - 0.05}, fine_tune([baseline - 0.04] * 2))
    assert got["compress_within_budget"] == 0.0 and got["compress_fallbacks"] == 2
    assert "kept the least compressed candidate" in lines[-1]


def test_a_sigkill_between_steps_resumes_without_redoing_finished_steps(inputs, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[2])}
    child = subprocess.Popen([sys.executable, str(HERE), str(inputs), str(work), str(out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not list(work.glob("compress-*/step_0")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)  # step 0 committed, step 1 under way
    first_output = child.communicate(timeout=60)[0]
    assert child.returncode == -signal.SIGKILL, first_output[-3000:]
    finished = sorted(p.name for p in work.glob("compress-*/step_*") if p.is_dir() and "." not in p.name)
    assert "step_0" in finished and "step_2" not in finished, (finished, first_output[-3000:])
    stamps = {name: next(work.glob(f"compress-*/{name}/model.safetensors")).stat().st_mtime_ns for name in finished}
    second = subprocess.run([sys.executable, str(HERE), str(inputs), str(work), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    for name in finished:  # reused, verified, not written again
        assert f"step {int(name.split('_')[1]) + 1}/3: reused" in second.stdout, second.stdout[-3000:]
        assert next(work.glob(f"compress-*/{name}/model.safetensors")).stat().st_mtime_ns == stamps[name]
    assert second.stdout.count("fine-tuning 1 epoch(s)") == 3 - len(finished), second.stdout[-3000:]
    assert _steps(out)["chosen_step"] == 2 and len(_steps(out)["steps"]) == 3


def test_the_compress_section_is_strict_and_off_by_default_enters_no_fingerprint():
    from pipeline.config.loading import ConfigError
    from pipeline.stages.fingerprints import stage_fingerprints
    from pipeline.stages.table import TRAINING_STAGES, stage

    base = load_config(None)
    assert base.compress.max_top1_drop is None and compress_steps(base) == [0.3, 0.5, 0.6, 0.7]
    off = load_config(None, ["compress.steps=[0.2, 0.4]", "compress.step_epochs=5"])
    assert stage_fingerprints(off) == stage_fingerprints(base)  # without a budget, today's run
    on = load_config(None, ["compress.max_top1_drop=1.0"])
    before, after = stage_fingerprints(base), stage_fingerprints(on)
    assert [s for s in before if before[s] != after[s]] == ["prune", "finetune", "shrink", "evaluate", "report"]
    assert stage("prune").trains_for(on) and not stage("prune").trains_for(base)
    assert TRAINING_STAGES == ("baseline", "retrain", "finetune")
    for bad in ("compress.max_top1_drop=-1", "compress.steps=[0.5, 0.3]", "compress.steps=[1.0]",
                "compress.step_epochs=0", "compress.budget=1"):
        with pytest.raises(ConfigError, match="compress"):
            load_config(None, [bad])


def test_a_note_is_shown_once_per_display():
    import io

    from pipeline import console

    out = io.StringIO()
    display = console.Display(stages=(), tty=False, stream=out)
    for _ in range(3):
        display.handle("note", ("augmentation: none (data.augment=none)",))
    assert out.getvalue().count("augmentation: none") == 1


if __name__ == "__main__":  # the process the SIGKILL test kills: the prune stage with every step within budget
    run_prune_stage(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), budget=100.0)


def test_steps_are_held_to_the_lower_of_baseline_and_start_and_scale_with_fine_tuning():
    """The retraining's penalty can cost points the full fine-tuning wins back: a step is held to the lower of the
    baseline and the model the steps start from; the step length and rate follow the finetune section."""
    from pipeline.stages.compress import step_epochs, step_lr, step_reference

    assert step_reference(0.89, 0.878) == 0.878 and step_reference(0.85, 0.86) == 0.85
    quick = load_config(None)
    assert (step_epochs(quick), step_lr(quick)) == (2, pytest.approx(0.005))  # the quickstart's measured values
    longer = load_config(None, ["finetune.epochs=15", "finetune.lr=0.04"])
    assert (step_epochs(longer), step_lr(longer)) == (4, pytest.approx(0.01))
    assert step_epochs(load_config(None, ["finetune.epochs=1"])) == 1
    fixed = load_config(None, ["compress.step_epochs=3", "compress.step_lr=0.001"])
    assert (step_epochs(fixed), step_lr(fixed)) == (3, 0.001)
