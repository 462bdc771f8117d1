"""Progressive channel pruning within an accuracy budget (``compress.max_top1_drop``), and BatchNorm that
follows every structural change (``precise_bn``).

Where it runs: inside the prune stage, which becomes a training stage in the runs that set the budget
(``Stage.trains_when`` in ``table.py``). The prune stage already decides which channels go and its model is the
one ``finetune`` fine-tunes at full length, so the chosen step simply becomes the prune stage's model: no new
stage, nothing downstream changes, and without a budget the prune stage is what it was (one-shot
``penni.prune_channels``, a plain function, the same fingerprint).

Step k reaches the cumulative target t_k of ``compress_steps`` (a dense-MAC reduction of the retrained model's
cost): ``penni.prune_channels`` of the previous step's model, ``penni.shrink`` (exact), BatchNorm re-estimated
(``precise_bn``), ``step_epochs(cfg)`` of fine-tuning at ``step_lr(cfg)`` through ``ctx.train`` (Ray Train or
in-process: the finetune section's optimizer, its distillation from the baseline where ``finetune.distill``), then
validation. The steps stop at the first one more than ``max_top1_drop`` points of validation top-1 below the
*reference*, the lower of the baseline and the retrained model the steps start from (``step_reference``): the
retraining's sparsity penalty can cost points that the full fine-tuning wins back (measured on the reduced VGG16:
the retrained model 1.2 pt below its baseline, the one-shot pruned and fine-tuned one 0.4 pt), so against the
baseline alone every step would look over budget. The last step within is chosen (none within: no channel is
pruned); the budget against the baseline itself is checked on the fine-tuned result (``keep_within_budget``). The prune stage then applies its
element rule (``prune.rule``'s std / sparsity part) to it.

Each finished step is committed to ``<work_dir>/compress-<key>/step_<k>/`` (``model.safetensors`` via
``penni.save``, ``step.json``, then ``checksums.json`` last, then a directory rename). A rerun (after a kill
between steps, or with another budget: the key hashes what the steps depend on, not the budget) verifies the
checksums (``checkpoint_problem``) and reuses the finished steps. Each step is one point of the
accuracy-vs-cost curve: logged to MLflow (the step index is the MLflow step) on the stage run and the
pipeline's parent run, and written to ``compress_steps.json`` and ``compression_curve.png``.

The steps' short fine-tuning only estimates what the full one recovers, so the budget is checked again on the
result: the prune stage also commits up to ``FALLBACKS`` less compressed candidates (the within-budget steps
before the chosen one, then the retrained model without channel pruning), prepared like its model
(``fallback_<i>.safetensors``, listed in ``fallbacks.json``). When the fine-tuned model ends more than the budget
below the baseline, ``finetune`` fine-tunes the next candidate at full length, until one is within the budget
(``keep_within_budget``); if none is, the least compressed one is kept and the run says so.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

import penni
from penni.serialization.format import load, save

from .. import console
from ..config.loading import to_dict
from ..data.loaders import build_datasets, example_batch, make_loader
from ..storage.canonical import canonical_sha256, write_json
from ..storage.fileio import sha256_file
from ..training import loop as T
from ..training.checkpoints import BEST_FILE, MODEL_FILE, checkpoint_problem, write_checksums
from ..training.distributed import BN_RECALIBRATION_BATCHES, StageTraining, TrainJob

__all__ = ["FALLBACKS", "compress_steps", "keep_within_budget", "precise_bn", "progressive_prune", "step_epochs",
           "step_lr", "step_reference", "val_top1", "write_fallbacks"]

FALLBACKS = 2                    # less compressed candidates the prune stage commits for finetune's budget check
FALLBACK_RECORD = "fallbacks.json"
STEP_RECORD = "step.json"
STEP_FILES = (MODEL_FILE, STEP_RECORD)


def _device(cfg: Any) -> torch.device:
    return torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")


def val_top1(model: nn.Module, cfg: Any, splits) -> float:
    """Validation top-1 of ``model`` (eval mode, in this process)."""
    loader = make_loader(splits.val, cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.loader_workers)
    hw = T.Hardware(_device(cfg))
    return T.evaluate(model.to(hw.device), loader, hw)["val_top1"]


def precise_bn(model: nn.Module, cfg: Any, splits=None) -> nn.Module:
    """BatchNorm statistics re-estimated after a structural change (channels pruned, a model shrunk): train mode,
    no grad, cumulative average over ``BN_RECALIBRATION_BATCHES`` seeded training batches, then eval mode."""
    splits = splits or build_datasets(cfg.data, seed=cfg.seed)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        batch_size = max(1, min(cfg.data.batch_size, len(splits.train)))
        seed = cfg.seed * 1000 + 999
        loader = make_loader(splits.train, batch_size, shuffle=True, workers=cfg.data.loader_workers, seed=seed,
                             drop_last=True)
        with torch.random.fork_rng(devices=[]):  # in-process augmentation draws from the global RNG: seed it too,
            torch.manual_seed(seed)              # so a resumed run re-estimates exactly what an uninterrupted one did
            T.recalibrate_batchnorm(model.to(_device(cfg)), loader, BN_RECALIBRATION_BATCHES, _device(cfg))
    return model.eval()


def compress_steps(cfg: Any) -> list[float]:
    """The cumulative dense-MAC reductions of the steps: ``compress.steps`` below the cost target
    (``prune.target_dense_macs_reduction``), then the target itself as the last step."""
    cap = cfg.prune.target_dense_macs_reduction
    return [s for s in cfg.compress.steps if cap is None or s < cap] + ([cap] if cap is not None else [])


def step_epochs(cfg: Any) -> int:
    """Fine-tuning epochs per step: ``compress.step_epochs``, else a quarter of ``finetune.epochs``, rounded (Python's
    round: 10 -> 2, 15 -> 4), at least 1."""
    return cfg.compress.step_epochs or max(1, round(cfg.finetune.epochs / 4))


def step_lr(cfg: Any) -> float:
    """Learning rate of a step's fine-tuning: ``compress.step_lr``, else ``finetune.lr / 4``."""
    return cfg.compress.step_lr or cfg.finetune.lr / 4


def step_reference(baseline_top1: float, start_top1: float) -> float:
    """What a step's validation top-1 is held to: the lower of the baseline's and the steps' starting model's."""
    return min(baseline_top1, start_top1)


def _steps_dir(ctx: Any) -> Path:
    """``<work_dir>/compress-<key>``: the key hashes everything a step's result depends on (not the budget)."""
    cfg, d = ctx.cfg, to_dict(ctx.cfg)
    key = canonical_sha256({"steps": compress_steps(cfg), "step_epochs": step_epochs(cfg), "step_lr": step_lr(cfg),
                            "finetune": d["finetune"], "data": d["data"], "seed": cfg.seed,
                            "model": sha256_file(ctx.input_model("retrain")),
                            "teacher": sha256_file(ctx.input_model("baseline")) if cfg.finetune.distill else None})
    return Path(ctx.work_dir or ctx.out_dir.parent / "work") / f"compress-{key[:12]}"


def _reused_step(directory: Path) -> tuple[nn.Module, dict] | None:
    """A finished step's model and record, if its checkpoint passes its checksums (else it is discarded)."""
    if not directory.is_dir():
        return None
    problem = checkpoint_problem(directory, STEP_FILES)
    if problem is not None:
        console.report_line(f"[prune] warning: discarding step checkpoint {directory}: {problem}; redoing the step")
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return load(directory / MODEL_FILE), json.loads((directory / STEP_RECORD).read_text())


def _commit_step(directory: Path, model: nn.Module, record: dict) -> None:
    """Model, record, checksums last, into a staging directory renamed to ``directory`` (never half visible)."""
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save(model.cpu(), staging / MODEL_FILE)
    write_json(staging / STEP_RECORD, record)
    write_checksums(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def _fine_tune(ctx: Any, model: nn.Module, k: int, root: Path, training: StageTraining) -> nn.Module:
    """``step_epochs(cfg)`` of fine-tuning (the finetune section's optimizer) through ``ctx.train``; the best epoch
    on validation."""
    path = root / f"step_{k}_input.safetensors"
    save(model.cpu(), path)
    config = to_dict(ctx.cfg)
    config["finetune"] = {**config["finetune"], "epochs": step_epochs(ctx.cfg), "lr": step_lr(ctx.cfg)}
    job = TrainJob(stage="finetune", config=config, input_model=str(path), training=training,
                   label=f"prune step {k + 1}")
    checkpoint_dir, _ = ctx.train(job)
    best = checkpoint_dir / BEST_FILE
    return load(best if best.exists() else checkpoint_dir / MODEL_FILE)


def _step(ctx: Any, k: int, target: float, previous: nn.Module, original_macs: int, splits, root: Path,
          training: StageTraining) -> tuple[nn.Module, dict]:
    """Step ``k``: prune to ``target`` of the original cost, shrink, BatchNorm, fine-tune, validate, commit."""
    cfg, n = ctx.cfg, len(compress_steps(ctx.cfg))
    found = _reused_step(root / f"step_{k}")
    if found is not None:
        ctx.log(f"[prune] step {k + 1}/{n}: reused (checkpoint {root / f'step_{k}'} verified)")
        return found
    x = example_batch(splits, batch_size=8)
    model = copy.deepcopy(previous).eval()
    relative = 1.0 - (1.0 - target) * original_macs / penni.profile(model, x).dense_macs
    if relative > 0:
        penni.prune_channels(model, relative, x, cost="dense_macs")
    model = precise_bn(penni.shrink(model, x).eval(), cfg, splits)
    untuned = val_top1(model, cfg, splits)
    ctx.log(f"[prune] step {k + 1}/{n}: channels to -{100 * target:.0f}% dense MACs, shrunk, BatchNorm "
            f"re-estimated (val {100 * untuned:.2f}%); fine-tuning {step_epochs(cfg)} epoch(s) at lr {step_lr(cfg):g}")
    tuned = _fine_tune(ctx, model, k, root, training).eval()
    top1 = val_top1(tuned, cfg, splits)
    model, top1 = (tuned, top1) if top1 >= untuned else (model.eval(), untuned)  # the better one validates
    prof = penni.profile(model.cpu(), x)
    record = {"step": k, "target_dense_macs_reduction": target, "dense_macs": prof.dense_macs,
              "sparse_macs": prof.sparse_macs, "dense_macs_reduction": 1.0 - prof.dense_macs / original_macs,
              "sparse_macs_reduction": 1.0 - prof.sparse_macs / original_macs, "val_top1": top1,
              "val_top1_before_fine_tuning": untuned,
              "fine_tuned": model is tuned}
    _commit_step(root / f"step_{k}", model, record)
    return model, record


def _log_point(ctx: Any, record: dict) -> None:
    """One point of the curve on the stage's MLflow run and the pipeline's parent run (step = step index)."""
    if not (ctx.tracking_uri and ctx.mlflow_run_id):
        return
    from ..tracking.runs import log_curve_point

    point = {f"compress/{k}": float(record[k]) for k in ("dense_macs", "sparse_macs", "val_top1",
                                                          "dense_macs_reduction", "top1_drop_points")}
    try:
        log_curve_point(ctx.tracking_uri, ctx.mlflow_run_id, point, step=int(record["step"]))
    except Exception as err:  # noqa: BLE001 - tracking is best effort, like the epoch logger's
        console.report_line(f"[prune] warning: could not log step {record['step']} to MLflow ({err})")


def progressive_prune(ctx: Any, model: nn.Module, splits, training: StageTraining) -> tuple[nn.Module, dict]:
    """The steps of ``compress_steps`` until one exceeds the budget: ``(chosen model, metrics)``; writes
    ``compress_steps.json`` and ``compression_curve.png`` into ``ctx.out_dir``."""
    cfg, budget = ctx.cfg, ctx.cfg.compress.max_top1_drop
    baseline_top1 = val_top1(load(ctx.input_model("baseline")), cfg, splits)
    start_top1 = val_top1(copy.deepcopy(model), cfg, splits)
    reference = step_reference(baseline_top1, start_top1)
    ctx.log(f"[prune] accuracy budget {budget:g} pt: baseline val {100 * baseline_top1:.2f}%, retrained "
            f"{100 * start_top1:.2f}%; each step is held to {100 * reference:.2f}%, the fine-tuned result to the "
            "baseline")
    original = penni.profile(model.eval(), example_batch(splits, batch_size=8)).dense_macs
    root = _steps_dir(ctx)
    root.mkdir(parents=True, exist_ok=True)
    records, chosen, chosen_model, current = [], -1, model, model
    for k, target in enumerate(compress_steps(cfg)):
        current, record = _step(ctx, k, target, current, original, splits, root, training)
        record = {**record, "top1_drop_points": 100.0 * (baseline_top1 - record["val_top1"]),
                  "top1_drop_vs_reference_points": 100.0 * (reference - record["val_top1"])}
        records.append(record)
        _log_point(ctx, record)
        within = record["top1_drop_vs_reference_points"] <= budget
        ctx.log(f"[prune] step {k + 1}: -{100 * record['dense_macs_reduction']:.1f}% dense MACs, val "
                f"{100 * record['val_top1']:.2f}% ({-record['top1_drop_points']:+.2f} pt vs baseline, "
                f"{-record['top1_drop_vs_reference_points']:+.2f} pt vs the reference, budget -{budget:g} pt): "
                f"{'within' if within else 'over the budget, stopping'}")
        if not within:
            break
        chosen, chosen_model = k, current
    if chosen < 0:
        ctx.log(f"[prune] warning: even the first step loses more than {budget:g} pt; no channel is pruned")
    write_json(ctx.out_dir / "compress_steps.json", {"baseline_val_top1": baseline_top1, "max_top1_drop": budget,
                                                     "start_val_top1": start_top1, "reference_val_top1": reference,
                                                     "chosen_step": chosen, "steps": records})
    from penni import visualize

    visualize.plot_accuracy_cost(records, ctx.out_dir / "compression_curve.png", reference_top1=baseline_top1,
                                 budget_points=budget, chosen=chosen if chosen >= 0 else None,
                                 title="accuracy budget: validation top-1 per pruning step")
    reduction = records[chosen]["dense_macs_reduction"] if chosen >= 0 else 0.0
    fallbacks = [(k, load(root / f"step_{k}" / MODEL_FILE), records[k]["dense_macs_reduction"])
                 for k in range(chosen - 1, -1, -1)] + ([(-1, model, 0.0)] if chosen >= 0 else [])
    return chosen_model, {"compress_chosen_step": chosen, "compress_steps_run": len(records),
                          "compress_baseline_val_top1": baseline_top1, "predicted_dense_macs_reduction": reduction,
                          "fallbacks": fallbacks[:FALLBACKS]}


def write_fallbacks(out_dir: Path, fallbacks: list[tuple[int, nn.Module, float]], prepare: Any) -> None:
    """The less compressed candidates, each ``prepare``-d like the stage's model (element rule, BatchNorm), as
    ``fallback_<i>.safetensors`` and ``fallbacks.json`` (most compressed first; step -1: no channel pruned)."""
    listed = []
    for i, (step, model, reduction) in enumerate(fallbacks, 1):
        save(prepare(copy.deepcopy(model)).cpu(), out_dir / f"fallback_{i}.safetensors")
        listed.append({"file": f"fallback_{i}.safetensors", "step": step, "dense_macs_reduction": reduction})
    write_json(out_dir / FALLBACK_RECORD, listed)


def keep_within_budget(ctx: Any, metrics: dict, fine_tune: Any) -> dict:
    """After finetune: while the fine-tuned model is more than the budget below the baseline (validation top-1),
    fine-tune the prune stage's next less compressed candidate at full length (``fine_tune(path) -> metrics``)."""
    prune_dir = Path(ctx.inputs["prune"])
    steps = json.loads((prune_dir / "compress_steps.json").read_text())
    listed = prune_dir / FALLBACK_RECORD
    fallbacks = json.loads(listed.read_text()) if listed.exists() else []
    baseline, budget, tried = steps["baseline_val_top1"], steps["max_top1_drop"], 0

    def drop(m: dict) -> float:
        return 100.0 * (baseline - m["selected_val_top1"])

    while drop(metrics) > budget and tried < len(fallbacks):
        candidate = fallbacks[tried]
        tried += 1
        what = (f"step {candidate['step'] + 1} (-{100 * candidate['dense_macs_reduction']:.1f}% dense MACs)"
                if candidate["step"] >= 0 else "the retrained model without channel pruning")
        ctx.log(f"[finetune] {drop(metrics):.2f} pt below the baseline, over the budget of {budget:g} pt: "
                f"fine-tuning {what} instead")
        metrics = fine_tune(prune_dir / candidate["file"])
    within = drop(metrics) <= budget
    if not within:
        ctx.log(f"[finetune] warning: {drop(metrics):.2f} pt below the baseline after {tried} fallback(s), over the "
                f"budget of {budget:g} pt; kept the least compressed candidate")
    return {**metrics, "compress_fallbacks": tried, "compress_final_top1_drop_points": drop(metrics),
            "compress_within_budget": float(within)}
