"""The pipeline stages: plain functions from input checkpoints + config to output files + metrics.

Each ``run_<stage>(ctx)`` reads the committed outputs of earlier stages from ``ctx.inputs``,
writes its own files into ``ctx.out_dir`` and returns its metrics. They run in-process (no
Ray needed: the GPU machine has none) or inside a Ray task; training stages hand their loop
to ``ctx.train`` (Ray Train or in-process).
"""
from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import penni
from penni.comparison import compare as profile_compare
from penni.decomposition import is_decomposable
from penni.models import load_weights
from penni.serialization.format import load, save
from penni.serialization.tensors import PenniFormatError

from .. import console
from ..config.loading import to_dict
from ..config.schema import PipelineConfig
from ..data.loaders import build_datasets, example_batch, make_loader
from ..storage.canonical import write_json
from ..training import loop as T
from ..training.checkpoints import BEST_FILE, HISTORY_FILE, MODEL_FILE
from ..training.distributed import Distillation, StageTraining, TrainJob
from .compress import keep_within_budget, precise_bn, progressive_prune, write_fallbacks


@dataclass
class StageContext:
    """Everything a stage function needs; built by the DAG (what a stage reads: ``pipeline.stages.table``)."""

    cfg: PipelineConfig
    stage: str
    inputs: dict[str, Path]
    out_dir: Path
    train: Callable[[TrainJob], tuple[Path, dict]] | None = None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    log: Callable[[str], None] = field(default=console.report_line)
    work_dir: Path | None = None  # this run's scratch folder: durable where the storage is local (step checkpoints)

    def input_model(self, stage: str) -> Path:
        return self.inputs[stage] / MODEL_FILE


def _device(cfg: PipelineConfig) -> torch.device:
    return torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")


def _val_accuracy(model: nn.Module, cfg: PipelineConfig, splits=None) -> float:
    splits = splits or build_datasets(cfg.data, seed=cfg.seed)
    loader = make_loader(splits.val, cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.loader_workers)
    hw = T.Hardware(_device(cfg))
    return T.evaluate(model.to(hw.device), loader, hw)["val_top1"]


def _run_training(ctx: StageContext, input_model: Path | None, select: str,
                  training: StageTraining | None = None) -> dict:
    """Train through ``ctx.train`` (with what this stage adds to the loop); copy the selected model
    (best on validation, or last) out."""
    job = TrainJob(stage=ctx.stage, config=to_dict(ctx.cfg), input_model=str(input_model) if input_model else None,
                   tracking_uri=ctx.tracking_uri, mlflow_run_id=ctx.mlflow_run_id,
                   training=training or StageTraining())
    checkpoint_dir, result = ctx.train(job)
    history = json.loads((checkpoint_dir / HISTORY_FILE).read_text())
    chosen = checkpoint_dir / (BEST_FILE if select == "best" and (checkpoint_dir / BEST_FILE).exists() else MODEL_FILE)
    shutil.copy2(chosen, ctx.out_dir / MODEL_FILE)
    write_json(ctx.out_dir / HISTORY_FILE, history)
    last = history[-1] if history else {}
    best = max(history, key=lambda h: h["val_top1"]) if history else {}
    picked = best if select == "best" else last
    # named apart from the per-epoch metrics (val_top1, sparsity) so MLflow curves stay clean
    return {"selected_val_top1": picked.get("val_top1", float("nan")), "epochs": len(history),
            "selected_epoch": picked.get("epoch", -1), "selected_sparsity": picked.get("sparsity", 0.0),
            "train_seconds": sum(h.get("epoch_seconds", 0.0) for h in history)}


def run_baseline(ctx: StageContext) -> dict:
    """Train the dense model, or load one (penni checkpoint, or a weights file such as torchvision's)."""
    cfg, bcfg = ctx.cfg, ctx.cfg.baseline
    start: Path | None = None
    if bcfg.checkpoint:
        try:
            model = load(bcfg.checkpoint)
        except PenniFormatError:
            model = load_weights(T.model_from_config(cfg.model), bcfg.checkpoint)
    elif cfg.model.weights:
        model = load_weights(T.model_from_config(cfg.model), cfg.model.weights)
    else:
        model = None
    if model is not None:
        save(model, ctx.out_dir / "initial.safetensors")
        start = ctx.out_dir / "initial.safetensors"
    if bcfg.epochs == 0:
        if start is None:
            raise ValueError("baseline.epochs is 0 but no baseline.checkpoint or model.weights is given: "
                             "set one of them, or train the baseline (baseline.epochs > 0)")
        start.rename(ctx.out_dir / MODEL_FILE)
        return {"val_top1": _val_accuracy(load(ctx.out_dir / MODEL_FILE), cfg), "epochs": 0}
    metrics = _run_training(ctx, start, select="best")
    if start is not None:
        start.unlink()
    return metrics


def run_decompose(ctx: StageContext) -> dict:
    """SVD-initialized PenniConv2d layers (d per layer), with the kernel approximation error."""
    model = load(ctx.input_model("baseline"))
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if is_decomposable(m)}
    penni.decompose(model, d=ctx.cfg.decompose.d, exclude=ctx.cfg.decompose.exclude)
    layers = penni.penni_layers(model)
    with torch.no_grad():
        errors = {name: float((m.reconstructed_weight() - dense[name]).norm() / dense[name].norm())
                  for name, m in layers.items()}
    save(model, ctx.out_dir / MODEL_FILE)
    write_json(ctx.out_dir / "approximation_error.json", errors)
    return {"layers_decomposed": len(layers), "mean_relative_kernel_error": statistics.fmean(errors.values()) if errors else 0.0,
            "val_top1": _val_accuracy(model, ctx.cfg)}


def retrain_training(rcfg: Any, pcfg: Any = None) -> StageTraining:
    """Retraining's additions to the loop: L1 and group lasso (logged per epoch), basis and coefficients
    in alternation, and (given the prune config) the fraction of coefficients its element rule would remove."""
    return StageTraining(l1=rcfg.l1, group_l1=rcfg.group_l1, include_pointwise=rcfg.include_pointwise,
                         log_penalties=True, alternate_every=rcfg.alternate_every, start_with=rcfg.start_with,
                         prune_preview=_prune_preview(pcfg))


def _prune_preview(pcfg: Any) -> dict | None:
    """``penni.prunable_fraction`` arguments for the element part of ``prune.rule`` (None: channels only)."""
    element_rule = pcfg.element_rule if pcfg is not None else None
    if element_rule is None or (element_rule == "sparsity" and pcfg.target is None):
        return None
    return {"rule": element_rule, "s": pcfg.s, "target": pcfg.target, "include_pointwise": pcfg.include_pointwise}


def run_retrain(ctx: StageContext) -> dict:
    """L1 on the coefficients, basis and coefficients trained in alternation; keeps the last epoch."""
    return _run_training(ctx, ctx.input_model("decompose"), select="last", training=retrain_training(ctx.cfg.retrain, ctx.cfg.prune))


def run_prune(ctx: StageContext) -> dict:
    """Zero whole channels (to a dense-MAC target; with ``compress.max_top1_drop``, in fine-tuned steps within that
    budget: ``pipeline/stages/compress.py``) and/or small coefficients (masks held from here on); BatchNorm
    re-estimated for the new channels."""
    from penni.pruning import layer_sparsity

    pcfg = ctx.cfg.prune
    model = load(ctx.input_model("retrain"))
    metrics = {}
    if ctx.cfg.compress.max_top1_drop is not None:  # an accuracy budget: channels in fine-tuned steps (compress.py)
        training = finetune_training(ctx.cfg.finetune, ctx.input_model("baseline"))
        model, metrics = progressive_prune(ctx, model, build_datasets(ctx.cfg.data, seed=ctx.cfg.seed), training)
    elif pcfg.channels:  # prune.rule: [channels], [channels, std] or [channels, sparsity] (parsed by the schema)
        x = example_batch(build_datasets(ctx.cfg.data, seed=ctx.cfg.seed), batch_size=8)
        if pcfg.target_speedup is not None:  # a measured speed-up: the latency table cached in the run's _work
            report = penni.prune_channels(model, penni.speedup_target(pcfg.target_speedup), x, cost="latency",
                                          latency=_latency_settings(ctx))
        else:
            report = penni.prune_channels(model, pcfg.target_dense_macs_reduction, x, cost="dense_macs")
        console.report_line(report.summary().splitlines()[0])  # per-layer widths: channels.json
        write_json(ctx.out_dir / "channels.json", {name: list(w) for name, w in report.widths.items()})
        reduction = "measured_latency_reduction" if report.latency else "predicted_dense_macs_reduction"
        metrics = {reduction: report.reduction, "channel_groups_removed": report.groups_removed}
        metrics.update({f"prune_speedup_bs{b}": v for b, v in report.latency.get("speedup", {}).items()})
    if pcfg.element_rule is not None:
        _element_rule(model, pcfg)
    per_layer = layer_sparsity(model, pcfg.include_pointwise)
    splits = build_datasets(ctx.cfg.data, seed=ctx.cfg.seed)
    metrics["val_top1_stale_bn"] = _val_accuracy(model, ctx.cfg, splits)  # before BatchNorm follows the new channels
    precise_bn(model, ctx.cfg, splits)
    save(model.cpu(), ctx.out_dir / MODEL_FILE)
    if "fallbacks" in metrics:  # the budget's less compressed candidates, prepared alike (finetune checks the budget)
        write_fallbacks(ctx.out_dir, metrics.pop("fallbacks"),
                        lambda m: precise_bn(_element_rule(m, pcfg), ctx.cfg, splits))
    write_json(ctx.out_dir / "sparsity.json", per_layer)
    return {**metrics, "sparsity": penni.coefficient_sparsity(model, pcfg.include_pointwise),
            "val_top1": _val_accuracy(model, ctx.cfg, splits)}


def _element_rule(model: nn.Module, pcfg: Any) -> nn.Module:
    """``prune.rule``'s element part (std or sparsity) applied to ``model``, if it has one."""
    if pcfg.element_rule is not None:
        penni.prune(model, rule=pcfg.element_rule, s=pcfg.s, target=pcfg.target, include_pointwise=pcfg.include_pointwise)
    return model


def _latency_settings(ctx: StageContext) -> penni.LatencySettings:
    """``prune.latency_*`` as penni's latency settings, timed on this stage's device, cached in the run's scratch."""
    pcfg, device = ctx.cfg.prune, _device(ctx.cfg)
    return penni.LatencySettings(runtime=pcfg.latency_runtime, batch_sizes=tuple(pcfg.latency_batch_sizes),
                                 device="cpu" if pcfg.latency_runtime == "onnxruntime" else str(device),
                                 cache_dir=None if ctx.work_dir is None else ctx.work_dir / "latency_tables")


def finetune_training(fcfg: Any, teacher_model: Path) -> StageTraining:
    """Fine-tuning's additions to the loop: BatchNorm re-estimated before the first epoch (pruning just changed
    the channels), a distillation teacher where ``finetune.distill`` is set (the masks need nothing here: they
    are parametrizations saved with the model)."""
    if not fcfg.distill:
        return StageTraining(recalibrate_bn_first=True)
    return StageTraining(distillation=Distillation(str(teacher_model), fcfg.distill_temperature, fcfg.distill_weight),
                         recalibrate_bn_first=True)


def run_finetune(ctx: StageContext) -> dict:
    """Recover accuracy with the masks held (optionally distilled from the baseline); keeps the best epoch."""
    training = finetune_training(ctx.cfg.finetune, ctx.input_model("baseline"))
    metrics = _run_training(ctx, ctx.input_model("prune"), select="best", training=training)
    if ctx.cfg.compress.max_top1_drop is None:
        return metrics
    return keep_within_budget(ctx, metrics, lambda path: _run_training(ctx, path, select="best", training=training))


def run_shrink(ctx: StageContext) -> dict:
    """Drop dead channels and bases (exact in eval mode); writes the before/after structure table."""
    cfg = ctx.cfg
    model = load(ctx.input_model("finetune")).eval()
    splits = build_datasets(cfg.data, seed=cfg.seed)
    x = example_batch(splits, batch_size=8)
    before = penni.profile(model, x)
    if cfg.shrink.enabled:
        small = penni.shrink(model, x, round_to=cfg.shrink.round_to).eval()
    else:
        small = penni.bake_masks(model)
    with torch.no_grad():
        reference, got = model(x), small(x)
    max_error = float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
    after = penni.profile(small, x)
    small, bn = _recalibrated_if_better(small, cfg, splits)
    save(small.cpu(), ctx.out_dir / MODEL_FILE)
    (ctx.out_dir / "recipe.json").write_text(penni.recipe_json(small))  # also inside the safetensors metadata
    (ctx.out_dir / "structure.md").write_text(profile_compare(before, after))
    before.to_csv(ctx.out_dir / "structure_before.csv")
    after.to_csv(ctx.out_dir / "structure_after.csv")
    return {"max_relative_output_change": max_error, "params_before": before.params, "params_after": after.params,
            "dense_macs_before": before.dense_macs, "dense_macs_after": after.dense_macs,
            "sparse_macs_after": after.sparse_macs, **bn}


def _recalibrated_if_better(model: nn.Module, cfg: PipelineConfig, splits) -> tuple[nn.Module, dict]:
    """After shrink (a structural change): BatchNorm re-estimated (``precise_bn``), kept unless it validates worse
    than the statistics fine-tuning ended with (those were selected on validation, with their epoch)."""
    import copy

    kept = _val_accuracy(model, cfg, splits)
    recalibrated = precise_bn(copy.deepcopy(model), cfg, splits)
    fresh = _val_accuracy(recalibrated, cfg, splits)
    chosen = recalibrated if fresh >= kept else model
    return chosen.eval(), {"val_top1_finetune_bn": kept, "val_top1_recalibrated_bn": fresh,
                           "bn_recalibrated": float(chosen is recalibrated)}


def measure_latency(models: list[nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median forward latency (ms) of each model on ``x``: inference mode, warm-up, the models
    timed in turn round by round, so machine noise hits all of them alike."""
    from penni.inference import time_forward

    for model in models:
        model.eval()
    return time_forward([lambda m=m: m(x) for m in models], repeats, x.device)


def _fastest_mode(model: nn.Module, x: torch.Tensor, repeats: int) -> penni.InferencePlan:
    """Set each PenniConv2d to its fastest form at this batch size (never slower than all-dense)."""
    return penni.optimize_for_inference(model, x, repeats=repeats)


def run_evaluate(ctx: StageContext) -> dict:
    """Test accuracy (top-1/top-5), parameters, MACs (sparse, dense-executable) and latency of
    the baseline and the compressed model (the test split is only reported here).

    Latency: per batch size, the compressed model's layers get their fastest forms
    (``penni.optimize_for_inference``), then baseline, compressed and compressed-all-dense are
    timed interleaved with the same repeats and threads. The compressed model (first batch size's
    choice) is saved as ``compressed.safetensors``; where onnx is installed, both models are
    exported (``baseline.onnx``, ``compressed.onnx``, via ``penni.to_torch``) and timed in ONNX
    Runtime's CPU provider with torch's thread count.
    """
    cfg = ctx.cfg
    device = _device(cfg)
    splits = build_datasets(cfg.data, seed=cfg.seed)
    models, results = _test_models(ctx, splits, device)
    plans = _time_latency(ctx, models, results, splits, device)
    save(models["compressed"].cpu(), ctx.out_dir / "compressed.safetensors")  # keeps the chosen forms
    models["compressed"].to(device)
    onnx_note = _onnx_latency(ctx, models, results, splits, cfg.evaluate.latency_repeats)
    summary = _evaluation_summary(results, device, cfg.evaluate, onnx_note)
    write_json(ctx.out_dir / "evaluation.json", {"models": results, "summary": summary, "inference_plans": plans})
    flat = {f"{label}.{k}": v for label, entry in results.items() for k, v in entry.items()}
    return {**summary, **flat}


def _test_models(ctx: StageContext, splits, device: torch.device) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """Baseline and compressed model on ``device`` in eval mode, with their test metrics, parameters and MACs."""
    cfg = ctx.cfg
    test_loader = make_loader(splits.test, cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.loader_workers)
    x1 = example_batch(splits, batch_size=1)
    results: dict[str, dict] = {}
    models: dict[str, nn.Module] = {}
    for label, path in (("baseline", ctx.input_model("baseline")), ("compressed", ctx.input_model("shrink"))):
        model = load(path).eval()
        prof = penni.profile(model, x1)
        model.to(device)
        results[label] = {**T.evaluate(model, test_loader, T.Hardware(device), prefix="test"), "params": prof.params,
                          "nonzero_params": prof.nonzero_params, "sparse_macs": prof.sparse_macs,
                          "dense_macs": prof.dense_macs}
        models[label] = model
    return models, results


def _time_latency(ctx: StageContext, models: dict[str, nn.Module], results: dict[str, dict], splits,
                  device: torch.device) -> dict:
    """Per batch size: the compressed model's fastest forms, then baseline / compressed / all-dense timed
    interleaved (into ``results``); leaves the compressed model in the first batch size's forms."""
    import copy

    b, c = results["baseline"], results["compressed"]
    repeats, plans, first_modes = ctx.cfg.evaluate.latency_repeats, {}, None
    penni.set_forward_mode(models["baseline"], "dense")
    for bs in ctx.cfg.evaluate.latency_batch_sizes:
        x = example_batch(splits, batch_size=bs).to(device)
        plan = _fastest_mode(models["compressed"], x, repeats)
        plans[f"bs{bs}"] = plan.to_dict()
        first_modes = first_modes or plan.modes
        dense = penni.set_forward_mode(copy.deepcopy(models["compressed"]), "dense")
        b[f"latency_ms_bs{bs}"], c[f"latency_ms_bs{bs}"], c[f"latency_ms_dense_bs{bs}"] = measure_latency(
            [models["baseline"], models["compressed"], dense], x, repeats)
        c[f"latency_mode_bs{bs}"] = plan.kept
        c[f"latency_factorized_layers_bs{bs}"] = sum(m != "dense" for m in plan.modes.values())
        (ctx.out_dir / f"inference_plan_bs{bs}.md").write_text(plan.to_markdown())
    for name, layer in penni.penni_layers(models["compressed"]).items():
        layer.set_forward_mode((first_modes or {}).get(name, "dense"))
    return plans


def _evaluation_summary(results: dict[str, dict], device: torch.device, ecfg: Any, onnx_note: str | None) -> dict:
    """Baseline against compressed: accuracy change, reductions, speed-ups, and where it was measured."""
    b, c = results["baseline"], results["compressed"]
    summary = {
        "baseline_test_top1": b["test_top1"], "compressed_test_top1": c["test_top1"],
        "top1_drop_points": 100.0 * (b["test_top1"] - c["test_top1"]),
        "baseline_test_top5": b["test_top5"], "compressed_test_top5": c["test_top5"],
        "params_reduction_pct": 100.0 * (1 - c["params"] / b["params"]),
        "nonzero_params_reduction_pct": 100.0 * (1 - c["nonzero_params"] / b["nonzero_params"]),
        "sparse_macs_reduction_pct": 100.0 * (1 - c["sparse_macs"] / b["dense_macs"]),
        "dense_macs_reduction_pct": 100.0 * (1 - c["dense_macs"] / b["dense_macs"]),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(), "latency_repeats": ecfg.latency_repeats,
    }
    if onnx_note:
        summary["onnx_note"] = onnx_note
    for bs in ecfg.latency_batch_sizes:
        summary[f"latency_speedup_bs{bs}"] = b[f"latency_ms_bs{bs}"] / c[f"latency_ms_bs{bs}"]
        if f"ort_latency_ms_bs{bs}" in c:
            summary[f"ort_latency_speedup_bs{bs}"] = b[f"ort_latency_ms_bs{bs}"] / c[f"ort_latency_ms_bs{bs}"]
    return summary


def _onnx_latency(ctx: StageContext, models: dict[str, nn.Module], results: dict[str, dict], splits,
                  repeats: int) -> str | None:
    """Export both models to ONNX (via penni.to_torch) and time them in ONNX Runtime (CPU, interleaved,
    torch's thread count); returns a note instead where onnx/onnxruntime is not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        note = f"ONNX export and ONNX Runtime latency skipped: {err.name} is not installed (pip install 'penni[export]')"
        ctx.log(note)
        return note
    from penni.inference import time_onnx_runtime

    x1 = example_batch(splits, batch_size=1)
    paths = [penni.export_onnx(models[label].cpu(), x1, ctx.out_dir / f"{label}.onnx")
             for label in ("baseline", "compressed")]
    for bs in ctx.cfg.evaluate.latency_batch_sizes:
        x = example_batch(splits, batch_size=bs)
        timings = time_onnx_runtime(paths, x, repeats)
        for label, ms in zip(("baseline", "compressed"), timings):
            results[label][f"ort_latency_ms_bs{bs}"] = ms
    return None


def _third_layer(model: nn.Module) -> str | None:
    """The layer the paper's appendix pictures: the third decomposed conv (or the last one)."""
    names = list(penni.penni_layers(model))
    return names[min(2, len(names) - 1)] if names else None


def run_report(ctx: StageContext) -> dict:
    """Structure tables, coefficient and reconstructed-kernel pictures, learning curves, summary."""
    from penni import visualize

    out = ctx.out_dir
    shutil.copy2(ctx.inputs["shrink"] / "structure.md", out / "structure.md")
    finetuned = load(ctx.input_model("finetune"))
    baseline = load(ctx.input_model("baseline"))
    layer_name = _third_layer(finetuned)
    pictures = []
    if layer_name:
        layer = finetuned.get_submodule(layer_name)
        original = baseline.get_submodule(layer_name).weight.detach()
        pictures.append(visualize.plot_coefficients(layer, out / "coefficients.png",
                                                    title=f"{layer_name}: coefficient matrix after fine-tuning"))
        pictures.append(visualize.plot_reconstructed(layer, out / "reconstructed_weights.png", original_weight=original,
                                                     title=f"{layer_name}: reconstructed vs original kernels"))
    curves = {stage: json.loads((ctx.inputs[stage] / HISTORY_FILE).read_text())
              for stage in ("baseline", "retrain", "finetune") if (ctx.inputs[stage] / HISTORY_FILE).exists()}
    if curves:
        pictures.append(visualize.plot_learning_curves(curves, out / "learning_curves.png",
                                                       title="PENNI: baseline, retraining and fine-tuning",
                                                       metrics=["loss", "top1", "sparsity", "l1_penalty", "lr"]))
    evaluation = json.loads((ctx.inputs["evaluate"] / "evaluation.json").read_text())
    summary = summary_markdown(evaluation["summary"], evaluation["models"])
    if (ctx.inputs["prune"] / "compress_steps.json").exists():  # an accuracy budget: its curve (compress.py)
        shutil.copy2(ctx.inputs["prune"] / "compression_curve.png", out / "compression_curve.png")
        pictures.append(out / "compression_curve.png")
        summary += steps_markdown(json.loads((ctx.inputs["prune"] / "compress_steps.json").read_text()))
    (out / "summary.md").write_text(summary)
    write_json(out / "evaluation.json", evaluation)
    return {"pictures": len(pictures)}


def steps_markdown(steps: dict) -> str:
    """The accuracy-budget steps (``compress_steps.json``) as a table, with the curve's picture."""
    lines = [f"\n## Accuracy budget: -{steps['max_top1_drop']:g} pt of validation top-1 "
             f"(baseline {100 * steps['baseline_val_top1']:.2f}%)\n", "![compression curve](compression_curve.png)\n",
             "| step | dense MACs | sparse MACs | dense MACs removed | val top-1 % | vs baseline | |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in steps["steps"]:
        mark = "chosen" if r["step"] == steps["chosen_step"] else ("over budget" if r["top1_drop_points"] >
                                                                    steps["max_top1_drop"] else "")
        lines.append(f"| {r['step'] + 1} | {r['dense_macs']:,} | {r['sparse_macs']:,} | "
                     f"{100 * r['dense_macs_reduction']:.1f}% | {100 * r['val_top1']:.2f} | "
                     f"{-r['top1_drop_points']:+.2f} pt | {mark} |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict, models: dict) -> str:
    """The final comparison table: baseline vs compressed."""
    b, c = models["baseline"], models["compressed"]
    rows = [("test top-1 %", f"{100 * b['test_top1']:.2f}", f"{100 * c['test_top1']:.2f}",
             f"{-summary['top1_drop_points']:+.2f} pt"),
            ("test top-5 %", f"{100 * b['test_top5']:.2f}", f"{100 * c['test_top5']:.2f}", ""),
            ("parameters", f"{b['params']:,}", f"{c['params']:,}", f"-{summary['params_reduction_pct']:.1f}%"),
            ("MACs, sparse (paper rule)", f"{b['sparse_macs']:,}", f"{c['sparse_macs']:,}",
             f"-{summary['sparse_macs_reduction_pct']:.1f}%"),
            ("MACs, dense-executable", f"{b['dense_macs']:,}", f"{c['dense_macs']:,}",
             f"-{summary['dense_macs_reduction_pct']:.1f}%")]
    for key in sorted((k for k in b if k.startswith("latency_ms_bs")), key=lambda k: int(k.removeprefix("latency_ms_bs"))):
        bs = key.removeprefix("latency_ms_bs")
        mode = c.get(f"latency_mode_bs{bs}", "")
        rows.append((f"PyTorch latency ms, batch {bs}", f"{b[key]:.2f}",
                     f"{c[key]:.2f} ({mode})" if mode else f"{c[key]:.2f}",
                     f"{summary[f'latency_speedup_bs{bs}']:.2f}x"))
        ort = f"ort_latency_ms_bs{bs}"
        if ort in b and ort in c:
            rows.append((f"ONNX Runtime latency ms, batch {bs}", f"{b[ort]:.2f}", f"{c[ort]:.2f}",
                         f"{summary[f'ort_latency_speedup_bs{bs}']:.2f}x"))
    lines = ["| metric | baseline | compressed | change |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b_} | {c_} | {d} |" for a, b_, c_, d in rows]
    threads = f", {summary['torch_threads']} threads" if "torch_threads" in summary else ""
    text = "\n".join(lines) + f"\n\nMeasured on: {summary.get('device', '?')}{threads}\n"
    return text + (f"\n{summary['onnx_note']}\n" if summary.get("onnx_note") else "")

