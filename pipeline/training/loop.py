"""The training loop shared by baseline, retrain and finetune, in-process or on Ray Train workers.

Read like torchvision's ``references/classification/train.py``: build the optimizer and LR
schedule, then ``train_one_epoch`` / ``evaluate`` per epoch. What PENNI adds is small: an L1
term on the coefficients, the alternating basis/coefficient schedule, an optional distillation
teacher (``distillation_loss``), and held masks (which need nothing here: they are
parametrizations on the model). The per-epoch driver is ``pipeline.training.distributed.training_loop``.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import penni


class TrainingError(ValueError):
    """Training cannot make progress with this config (no batch, non-finite loss): the message says what
    to change. A ValueError so that stage retries, which would fail the same way, leave it alone."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The training loss became NaN or infinite."""


def batches_per_worker(train_size: int, batch_size: int, num_workers: int) -> int:
    """Training steps per epoch on each worker: the distributed sampler and the loader both drop the
    last incomplete batch, so a worker sees ``floor(floor(train_size / workers) / batch_size)``."""
    return (int(train_size) // max(int(num_workers), 1)) // int(batch_size)


def _train_size(splits_or_size: Any) -> int:
    if isinstance(splits_or_size, int):
        return splits_or_size
    if isinstance(splits_or_size, dict):
        return int(splits_or_size["train"])
    return len(splits_or_size.train)


def check_trainable(cfg: Any, splits_or_sizes: Any, stages: Sequence[str], num_workers: int | None = None) -> None:
    """Raise ``TrainingError`` when a training stage of ``cfg`` would see no batch in an epoch.

    ``splits_or_sizes``: the ``DataSplits``, the training split's size, or ``{"train": size}``.
    ``num_workers`` defaults to the config's (1 when the pipeline runs in-process)."""
    if not any(getattr(cfg, stage).epochs > 0 for stage in stages):
        return
    train_size = _train_size(splits_or_sizes)
    workers = num_workers or (1 if cfg.ray.in_process else cfg.ray.num_workers)
    batch = cfg.data.batch_size
    if batches_per_worker(train_size, batch, workers) > 0:
        return
    subset = cfg.data.train_subset
    source = (f"data.train_subset={subset}" if subset == train_size
              else f"a training split of {train_size} images")
    raise TrainingError(f"{source} gives 0 batches of {batch} per worker with {workers} worker"
                        f"{'s' if workers != 1 else ''}: lower data.batch_size"
                        f"{', use fewer ray.num_workers' if workers > 1 else ''} or raise data.train_subset")


def non_finite_loss_advice(stage: str, lr: float, penalties: dict[str, float]) -> str:
    """What to change when ``stage``'s loss diverges: its ``lr`` and the penalties it trains with
    (``{"l1": ..., "group_l1": ...}``, named as in the stage's config section)."""
    knobs = [f"{stage}.lr (now {lr:g})"]
    knobs += [f"{stage}.{name} (now {value:g})" for name, value in penalties.items() if value > 0]
    return "lower " + " or ".join(knobs)


def model_from_config(model_cfg: Any) -> nn.Module:
    """The untrained model ``cfg.model`` describes (architecture, classes, input channels, kwargs)."""
    from penni.models import build_model

    return build_model(model_cfg.arch, num_classes=model_cfg.num_classes, in_channels=model_cfg.in_channels,
                       **model_cfg.kwargs)


@dataclass
class Hardware:
    """Where and how a training process computes."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False


def resolve_hardware(tcfg: Any, device: torch.device) -> Hardware:
    """bf16 autocast and channels-last on GPUs (``"auto"``); plain float32 on CPU."""
    on_gpu = device.type == "cuda"
    if tcfg.amp == "bf16" or (tcfg.amp == "auto" and on_gpu and torch.cuda.is_bf16_supported()):
        amp_dtype = torch.bfloat16
    else:
        amp_dtype = None
    channels_last = on_gpu if tcfg.channels_last == "auto" else bool(tcfg.channels_last)
    return Hardware(device, amp_dtype, channels_last)


def build_optimizer(model: nn.Module, tcfg: Any) -> torch.optim.Optimizer:
    """SGD (Nesterov, as the paper) or AdamW over every parameter; no decay on BN and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 and "basis" not in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tcfg.lr)
    return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum, nesterov=tcfg.nesterov and tcfg.momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch LR schedule: cosine to zero, multi-step at fractions of the epochs, or constant."""
    epochs = max(tcfg.epochs, 1)
    if tcfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if tcfg.lr_schedule == "multistep":
        milestones = sorted({max(1, int(round(f * epochs))) for f in tcfg.milestones})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=tcfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _autocast(hw: Hardware):
    if hw.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=hw.device.type, dtype=hw.amp_dtype)


def _to_device(x: torch.Tensor, y: torch.Tensor, hw: Hardware) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(hw.device, non_blocking=True)
    if hw.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(hw.device, non_blocking=True)


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: Iterable[int]) -> list[int]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(y.unsqueeze(1))
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, weight: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(1-w) * CE(labels) + w * T^2 * KL(softmax(teacher/T) || softmax(student/T))`` (Hinton et al., 2015):
    the T^2 keeps the soft term's gradients on the scale of the label term's as T changes."""
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - weight) * ce + weight * temperature ** 2 * kl


@dataclass
class Teacher:
    """A frozen model whose temperature-softened outputs the student also learns from."""

    model: nn.Module
    temperature: float
    weight: float

    def loss(self, x: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
             label_smoothing: float) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.model(x).float()
        return distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.weight,
                                 label_smoothing)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    hw: Hardware,
    *,
    epoch: int = 0,
    l1: float = 0.0,
    group_l1: float = 0.0,
    include_pointwise: bool = False,
    schedule: penni.AlternatingSchedule | None = None,
    label_smoothing: float = 0.0,
    teacher: Teacher | None = None,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss (the objective), mean cross-entropy and top-1 (this
    process's shard). The objective adds the L1 / group-lasso penalty and, with a ``teacher``, mixes
    the label loss with distillation. ``progress(done, total, images, seconds)`` is called after every batch
    (``total`` is 0 where the loader has no length)."""
    model.train()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, ce sum, correct, count
    total = len(loader) if hasattr(loader, "__len__") else 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        x, y = _to_device(x, y, hw)
        with _autocast(hw):
            logits = model(x)
            ce = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            loss = ce if teacher is None else teacher.loss(x, logits.float(), y, label_smoothing)
        penalized = l1 > 0 or group_l1 > 0  # element-wise L1 and channel group lasso (penni.sparsity_penalty)
        loss = loss + penni.sparsity_penalty(model, l1, group_l1, include_pointwise).to(loss) if penalized else loss
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()} at epoch {epoch} step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if schedule is not None:
            schedule.drop_frozen_gradients(model, epoch)
        optimizer.step()
        n = y.shape[0]
        totals += torch.tensor([loss.item() * n, ce.item() * n, _topk_correct(logits, y, (1,))[0], n], dtype=torch.float64)
        if progress is not None:
            progress(step + 1, total, int(totals[3]), time.perf_counter() - start)
    count = max(float(totals[3]), 1.0)
    return {"train_loss": float(totals[0]) / count, "train_ce": float(totals[1]) / count,
            "train_top1": float(totals[2]) / count, "train_seconds": time.perf_counter() - start,
            "train_samples": float(totals[3])}


@torch.no_grad()
def evaluate_counts(model: nn.Module, loader: Iterable, hw: Hardware) -> torch.Tensor:
    """``[loss sum, top-1 correct, top-5 correct, count]`` over ``loader`` (sum-reducible across ranks)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    for x, y in loader:
        x, y = _to_device(x, y, hw)
        with _autocast(hw):
            logits = model(x).float()
        top1, top5 = _topk_correct(logits, y, (1, 5))
        totals += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(), top1, top5, y.shape[0]],
                               dtype=torch.float64)
    return totals


def counts_to_metrics(totals: torch.Tensor, prefix: str) -> dict[str, float]:
    """Turn summed evaluation counts into ``<prefix>_loss``, ``_top1``, ``_top5``."""
    count = max(float(totals[3]), 1.0)
    return {f"{prefix}_loss": float(totals[0]) / count, f"{prefix}_top1": float(totals[1]) / count,
            f"{prefix}_top5": float(totals[2]) / count}


def recalibrate_batchnorm(model: nn.Module, batches: Iterable, num_batches: int, device: torch.device | None = None,
                          all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, world_size: int = 1) -> None:
    """BatchNorm running statistics recomputed from ``num_batches`` of ``batches`` (``torch.optim.swa_utils.update_bn``,
    cumulative average), then averaged over ``world_size`` data-parallel replicas with ``all_reduce`` (a sum)."""
    from torch.optim.swa_utils import update_bn

    update_bn(itertools.islice(iter(batches), num_batches), model, device)
    if world_size > 1 and all_reduce is not None:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        stats = [t for m in norms for t in (m.running_mean, m.running_var)]
        mean = all_reduce(torch.cat([t.detach().reshape(-1).double().cpu() for t in stats])) / world_size
        for t, part in zip(stats, mean.split([t.numel() for t in stats])):
            t.copy_(part.view_as(t).to(t))


def evaluate(model: nn.Module, loader: Iterable, hw: Hardware, prefix: str = "val") -> dict[str, float]:
    """Loss, top-1 and top-5 of ``model`` over ``loader`` in one process."""
    return counts_to_metrics(evaluate_counts(model, loader, hw), prefix)

