"""The side-by-side part of ``reproduce.py``: Torch-Pruning from the same baseline, and one table of every model.

Torch-Pruning (DepGraph) is the tool users would otherwise reach for: its magnitude channel pruning
(``GroupMagnitudeImportance`` with its ``BasePruner``) removes whole channels from the same baseline
checkpoint, the pruning ratio found by bisection so the pruned model's dense-executable MACs are
within 2% of our compressed model's, then it is fine-tuned with the pipeline's own optimizer, LR
schedule and epoch loop (``pipeline.training.loop``: ``finetune`` section, same epochs) and the best epoch on
validation is kept, as the pipeline's fine-tuning does. Torch-Pruning is a benchmark extra
(``pip install 'penni[bench]'``), never a dependency of ``penni``.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import penni
from pipeline import console
from pipeline.data.loaders import build_datasets, example_batch, make_loader
from pipeline.stages.functions import measure_latency
from pipeline.training import loop as T

MACS_TOLERANCE = 0.02   # Torch-Pruning's dense MACs within 2% of ours
MODEL_FILE = "model.safetensors"


def _device(cfg) -> torch.device:
    return torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of each layer's channels removed by Torch-Pruning's magnitude rule."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    head = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1:]  # the classifier keeps its classes
    pruner = tp.pruner.BasePruner(pruned, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=head, round_to=round_to)
    pruner.step()
    return pruned


def prune_to_macs(model: nn.Module, x: torch.Tensor, target: float, round_to: int | None) -> tuple[nn.Module, dict]:
    """Torch-Pruning to ``target`` dense MACs (within ``MACS_TOLERANCE``) at ``round_to`` channel multiples; where
    the multiples are too coarse to land near the target (dense MACs jump with the ratio), halve ``round_to``."""
    steps = [round_to]
    while steps[-1] and steps[-1] > 1:
        steps.append(steps[-1] // 2)
    for step, finer in zip(steps, [*steps[1:], None]):
        try:
            pruned, info = _bisect_ratio(model, x, target, step)
            return pruned, {**info, "round_to_asked": round_to}
        except RuntimeError as err:
            if finer is None:
                raise
            console.report_line(f"[torch_pruning] {err}; trying round_to={finer}")
    raise AssertionError("unreachable: the last step returns or raises")


def _bisect_ratio(model: nn.Module, x: torch.Tensor, target: float, round_to: int | None) -> tuple[nn.Module, dict]:
    """Bisect the pruning ratio until the dense MACs are within ``MACS_TOLERANCE`` of ``target``."""
    lo, hi, best = 0.0, 0.99, None
    tries = []
    if penni.profile(model, x).dense_macs <= target * (1 + MACS_TOLERANCE):  # ours removed no dense MACs
        return copy.deepcopy(model), {"pruning_ratio": 0.0, "round_to": round_to, "target_dense_macs": target,
                                      "dense_macs_gap_pct": 100 * (penni.profile(model, x).dense_macs / target - 1),
                                      "bisection": []}
    for _ in range(24):
        ratio = (lo + hi) / 2
        pruned = tp_prune(model, x, ratio, round_to)
        macs = penni.profile(pruned, x).dense_macs
        tries.append({"ratio": ratio, "dense_macs": macs})
        gap = macs / target - 1.0
        if best is None or abs(gap) < abs(best[2]):
            best = (pruned, ratio, gap)
        if abs(gap) <= MACS_TOLERANCE / 2:
            break
        lo, hi = (ratio, hi) if gap > 0 else (lo, ratio)
    pruned, ratio, gap = best
    if abs(gap) > MACS_TOLERANCE:
        raise RuntimeError(f"Torch-Pruning could not reach {target:,.0f} dense MACs within 2% (closest: ratio "
                           f"{ratio:.3f}, {100 * gap:+.1f}%) at round_to={round_to}")
    return pruned, {"pruning_ratio": ratio, "round_to": round_to, "dense_macs_gap_pct": 100 * gap,
                    "target_dense_macs": target, "bisection": tries}


def _train_loader(cfg, splits, device: torch.device, epoch: int):
    """The same training batches the pipeline's loop would use (the on-device loader where configured)."""
    seed = cfg.seed * 1000 + epoch
    if getattr(cfg.data, "loader", "auto") == "device":
        from pipeline.data.device import device_loader

        return device_loader(splits.train, cfg, device, seed)
    return make_loader(splits.train, cfg.data.batch_size, shuffle=True, workers=cfg.data.loader_workers,
                       seed=seed, drop_last=True)


def finetune_plain(model: nn.Module, cfg, splits, stage: str = "torch_pruning") -> tuple[nn.Module, list[dict]]:
    """Fine-tune a plain model with the ``finetune`` section's optimizer, schedule and epochs; best on validation."""
    device, tcfg = _device(cfg), cfg.finetune
    hw = T.resolve_hardware(tcfg, device)
    model = model.to(device)
    if hw.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, history = T.build_optimizer(model, tcfg), []
    scheduler = T.build_scheduler(optimizer, tcfg)
    val_loader = make_loader(splits.val, cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.loader_workers)
    best_state, best_top1 = copy.deepcopy(model.state_dict()), -1.0
    for epoch in range(tcfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101)
        t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        train_m = T.train_one_epoch(model, _train_loader(cfg, splits, device, epoch), optimizer, hw, epoch=epoch,
                                    label_smoothing=tcfg.label_smoothing)
        scheduler.step()
        metrics = {"epoch": epoch, "lr": lr, "train_loss": train_m["train_ce"], "train_top1": train_m["train_top1"],
                   **T.evaluate(model, val_loader, hw), "epoch_seconds": time.perf_counter() - t0}
        history.append(metrics)
        console.report_epoch(stage, epoch, tcfg.epochs, metrics)
        if metrics["val_top1"] > best_top1:
            best_top1, best_state = metrics["val_top1"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.to(memory_format=torch.contiguous_format).cpu().eval(), history


def torch_pruning_branch(cfg, baseline_dir: Path, ours_dir: Path, out_dir: Path,
                         round_to: int | None) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning from the baseline checkpoint to our compressed model's dense MACs, then fine-tuned."""
    splits = build_datasets(cfg.data, seed=cfg.seed)
    x = example_batch(splits, batch_size=1)
    baseline = penni.load(baseline_dir / MODEL_FILE).eval()
    target = penni.profile(penni.load(ours_dir / MODEL_FILE).eval(), x).dense_macs
    t0 = time.perf_counter()
    pruned, info = prune_to_macs(baseline, x, target, round_to)
    device = _device(cfg)
    pruned_val = T.evaluate(pruned.to(device), make_loader(splits.val, cfg.data.eval_batch_size, shuffle=False),
                            T.Hardware(device))["val_top1"]
    console.report_line(f"[torch_pruning] ratio {info['pruning_ratio']:.3f}: dense MACs {info['dense_macs_gap_pct']:+.2f}% "
                        f"vs ours, val top-1 before fine-tuning {pruned_val:.2%}")
    tuned, history = finetune_plain(pruned, cfg, splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    info.update(val_top1_after_pruning=pruned_val, finetune_epochs=len(history), seconds=time.perf_counter() - t0,
                selected_val_top1=max(h["val_top1"] for h in history) if history else pruned_val,
                widths={n: m.out_channels for n, m in tuned.named_modules() if isinstance(m, nn.Conv2d)})
    return tuned, info


def _row(model: nn.Module, test_loader, hw, x1: torch.Tensor) -> dict[str, Any]:
    prof = penni.profile(model.cpu().eval(), x1)
    model.to(hw.device)
    return {**T.evaluate(model, test_loader, hw, prefix="test"), "params": prof.params,
            "nonzero_params": prof.nonzero_params, "sparse_macs": prof.sparse_macs, "dense_macs": prof.dense_macs}


def compare_models(cfg, baseline_dir: Path, branches: dict[str, Path], tp_model: nn.Module) -> dict[str, dict]:
    """Test top-1, parameters, sparse/dense MACs and latency (interleaved, same device) of every model."""
    device = _device(cfg)
    hw = T.Hardware(device)
    splits = build_datasets(cfg.data, seed=cfg.seed)
    test_loader = make_loader(splits.test, cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.loader_workers)
    x1 = example_batch(splits, batch_size=1)
    models = {"baseline": penni.load(baseline_dir / MODEL_FILE)}
    models.update({label: penni.load(path / MODEL_FILE) for label, path in branches.items()})
    models["torch_pruning"] = tp_model
    table = {label: _row(model, test_loader, hw, x1) for label, model in models.items()}
    for bs in cfg.evaluate.latency_batch_sizes:
        x = example_batch(splits, batch_size=bs).to(device)
        for label in branches:  # each PENNI model in its fastest form at this batch size
            penni.optimize_for_inference(models[label], x, repeats=cfg.evaluate.latency_repeats)
        times = measure_latency(list(models.values()), x, cfg.evaluate.latency_repeats)
        for label, ms in zip(models, times):
            table[label][f"latency_ms_bs{bs}"] = ms
    return table
