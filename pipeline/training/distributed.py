"""Data-parallel training of one stage: on Ray Train workers, or in this process without Ray.

``training_loop(job)`` is the per-worker function and reads top to bottom like torchvision's
``references/classification/train.py``: ``set_up`` (data, model, optimizer, resume), then ``run_epoch`` per epoch
(``train_epoch``, ``recalibrate_batchnorm``, ``evaluate_epoch``, ``check_replicas``, ``keep_best``, ``report_epoch``,
``save_checkpoint``). What a stage adds (L1 and group lasso, the alternating schedule, a distillation teacher)
comes in explicitly with the job (``StageTraining``); the loop never looks at the stage's name.
The run directory is keyed by ``training_run_name`` (the stage's fingerprint and its input model's hash), so an
upstream stage that produced different weights is never resumed into. Checkpoints: ``pipeline.training.checkpoints``;
where the loop runs: ``pipeline.training.worlds``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

import penni
from penni.serialization.format import load, load_state, save

from .. import console
from ..config.loading import from_dict
from ..data.device import device_loader, uses_device_loader
from ..data.loaders import build_datasets, make_loader, resolve_loader
from ..data.transforms import augmentation_note
from ..errors import find_cause
from ..storage.canonical import fingerprint
from ..storage.fileio import sha256_file
from . import loop as T
from .checkpoints import (
    BEST_FILE,
    MODEL_FILE,
    read_training_state,
    verified,
    write_checkpoint,
)
from .worlds import LocalWorld, RayWorld

__all__ = ["Distillation", "StageTraining", "TrainJob", "replica_digest", "run_training", "training_loop",
           "training_run_name"]


def training_run_name(stage: str, stage_fingerprint: str, input_model: str | os.PathLike | None) -> str:
    """``<stage>-<key>``: the key hashes the stage's fingerprint (its config and its inputs' configs) and
    the sha256 of the input model file, so a run directory is only ever resumed with the same inputs."""
    content = sha256_file(input_model) if input_model else None
    return f"{stage}-{fingerprint(stage_fingerprint, content)[:12]}"


@dataclass
class Distillation:
    """Learn also from a frozen teacher's temperature-softened outputs (``T.distillation_loss``)."""

    teacher_model: str      # penni checkpoint of the teacher
    temperature: float
    weight: float           # of the KL term; the label loss gets 1 - weight


@dataclass
class StageTraining:
    """What a training stage adds to the generic loop; filled by its stage function (``pipeline.stages``)."""

    l1: float = 0.0                       # L1 on the coefficients
    group_l1: float = 0.0                 # group lasso per output channel
    include_pointwise: bool = False       # 1x1 convs count in penalties and sparsity
    log_penalties: bool = False           # per-epoch train_objective, l1_penalty, group_l1_penalty
    alternate_every: int | None = None    # basis and coefficients learn in alternation (None: all every epoch)
    start_with: str = "coefficients"
    distillation: Distillation | None = None
    prune_preview: dict | None = None     # penni.prunable_fraction kwargs: per epoch, what pruning would remove
    recalibrate_bn_first: bool = False    # the input's structure just changed: precise BN before the first epoch

    @classmethod
    def from_dict(cls, d: dict) -> "StageTraining":
        teacher = d.get("distillation")
        return cls(**{**d, "distillation": Distillation(**teacher) if teacher else None})


@dataclass
class TrainJob:
    """What a training stage asks the loop to do (all plain data: it crosses process boundaries)."""

    stage: str                     # the config section with its optimizer, epochs, ... ("baseline", "finetune", ...)
    config: dict                   # the whole pipeline config as a dict
    input_model: str | None        # penni checkpoint to start from (None: build from the config)
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    training: StageTraining = field(default_factory=StageTraining)
    label: str = ""                # what the console calls it (default: ``stage``), e.g. "prune step 2"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainJob":
        return cls(**{**d, "training": StageTraining.from_dict(d.get("training") or {})})


@dataclass
class TrainingRun:
    """What one worker's loop holds from epoch to epoch."""

    job: TrainJob
    cfg: Any
    tcfg: Any                      # the stage's config section
    world: Any                     # LocalWorld or RayWorld
    hw: T.Hardware
    splits: Any
    model: nn.Module               # prepared: DDP-wrapped on Ray Train
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    best_copy: Path                # the best-on-validation model so far (rank 0)
    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"epoch": -1, "val_top1": -1.0})
    history: list = field(default_factory=list)
    schedule: penni.AlternatingSchedule | None = None
    teacher: T.Teacher | None = None
    val_batches: Iterable = ()
    logger: Any = None

    @property
    def plain_model(self) -> nn.Module:
        return penni.unwrap_model(self.model)


def training_loop(job_dict: dict, world: Any = None) -> dict:
    """Train one stage; returns ``{"history": [...], "best": {...}, "start_epoch": i}`` (rank 0's view).
    Checkpoints every epoch (model with masks, optimizer, LR schedule, epoch, best-so-far), so a restarted worker
    group or a re-run of the same stage continues where it stopped."""
    run = set_up(TrainJob.from_dict(job_dict), world or RayWorld())
    try:
        for epoch in range(run.start_epoch, run.tcfg.epochs):
            run_epoch(run, epoch)
    finally:  # an error or a stop too: the temporary best copy is never left in /tmp
        shutil.rmtree(run.best_copy.parent, ignore_errors=True)
    return {"history": run.history, "best": run.best, "start_epoch": run.start_epoch}


def run_epoch(run: TrainingRun, epoch: int) -> None:
    """One epoch: train, BatchNorm, validate, keep the best, report, checkpoint."""
    _maybe_inject_failure(run.job.stage, epoch)
    started = time.perf_counter()
    phase, metrics, objective = train_epoch(run, epoch)
    recalibrate_batchnorm(run, epoch)
    metrics.update(evaluate_epoch(run))
    metrics["sparsity"] = penni.coefficient_sparsity(run.plain_model, run.job.training.include_pointwise)
    metrics["epoch_seconds"] = time.perf_counter() - started
    metrics.update(check_replicas(run, epoch))
    metrics.update(penalties(run, objective))
    keep_best(run, epoch, metrics)
    run.history.append({**metrics, "phase": phase})
    report_epoch(run, epoch, metrics, phase)
    save_checkpoint(run, epoch, metrics)


def set_up(job: TrainJob, world: Any) -> TrainingRun:
    """Data, model (from the stage input, or the latest good checkpoint), optimizer and LR schedule."""
    cfg = from_dict(job.config)
    tcfg = getattr(cfg, job.stage)
    world.stage = job.stage
    splits = build_datasets(cfg.data, seed=cfg.seed, in_channels=cfg.model.in_channels,
                            num_classes=cfg.model.num_classes)
    T.check_trainable(cfg, splits, (job.stage,), num_workers=world.world_size)
    if world.rank == 0:
        console.report_note(augmentation_note(cfg.data, splits.policy))
    model = _initial_model(job, cfg)
    hw = T.resolve_hardware(tcfg, world.device)
    resume_dir = world.latest_checkpoint()
    best_copy = Path(tempfile.mkdtemp(prefix="penni-best-")) / BEST_FILE
    if resume_dir is not None:
        load_state(model, resume_dir / MODEL_FILE)
        if (resume_dir / BEST_FILE).exists():
            shutil.copy2(resume_dir / BEST_FILE, best_copy)
    model = world.prepare_model(_placed(model, hw))  # DDP wraps the final structure; the optimizer is built after it
    optimizer = T.build_optimizer(model, tcfg)
    run = TrainingRun(job, cfg, tcfg, world, hw, splits, model, optimizer, T.build_scheduler(optimizer, tcfg),
                      best_copy)
    if resume_dir is not None:
        _resume(run, resume_dir)
    extras = job.training
    if extras.alternate_every:
        run.schedule = penni.AlternatingSchedule(extras.alternate_every, extras.start_with)
    if extras.distillation is not None:
        run.teacher = _teacher(extras.distillation, hw)
    run.val_batches = evaluation_batches(run)
    if world.rank == 0 and job.tracking_uri and job.mlflow_run_id:
        from ..tracking.runs import EpochLogger

        run.logger = EpochLogger(job.tracking_uri, job.mlflow_run_id)
    return run


def _initial_model(job: TrainJob, cfg: Any) -> nn.Module:
    if job.input_model:
        return load(job.input_model)
    torch.manual_seed(cfg.seed)
    return T.model_from_config(cfg.model)


def _placed(model: nn.Module, hw: T.Hardware) -> nn.Module:
    model = model.to(hw.device)
    return model.to(memory_format=torch.channels_last) if hw.channels_last else model


def _resume(run: TrainingRun, resume_dir: Path) -> None:
    """Optimizer, LR schedule, next epoch, best-so-far and history from a verified checkpoint."""
    state, run.history = read_training_state(resume_dir)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.start_epoch, run.best = state["epoch"] + 1, state["best"]
    if run.world.rank == 0:
        console.report_line(f"[{run.job.stage}] resuming from epoch {run.start_epoch} (checkpoint {resume_dir})")


def _teacher(distillation: Distillation, hw: T.Hardware) -> T.Teacher:
    """The frozen teacher on this worker's device, in eval mode."""
    model = _placed(load(distillation.teacher_model).eval(), hw)
    model.requires_grad_(False)
    return T.Teacher(model, distillation.temperature, distillation.weight)


def _shard(dataset, rank: int, world_size: int):
    """Every ``world_size``-th sample from ``rank``: disjoint, exact shards for evaluation."""
    if world_size == 1:
        return dataset
    return torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world_size)))


def training_batches(run: TrainingRun, epoch: int) -> Iterable:
    """This worker's training batches of ``epoch`` (a shuffled, epoch-seeded shard of the training split)."""
    cfg, world = run.cfg, run.world
    if resolve_loader(cfg.data, in_process=isinstance(world, LocalWorld)) == "ray_data":
        import ray.train

        from ..data.ray_data import epoch_batches

        return epoch_batches(ray.train.get_dataset_shard("train"), cfg.data.batch_size, run.splits.policy,
                             world.device, cfg.seed, epoch, decode_on_device_=cfg.data.decode == "device")
    if world.world_size == 1 and uses_device_loader(cfg):  # data.loader=device: held and augmented on the device
        return device_loader(run.splits.train, cfg, world.device, seed=cfg.seed * 1000 + epoch)
    if world.world_size == 1:
        return make_loader(run.splits.train, cfg.data.batch_size, shuffle=True, workers=cfg.data.loader_workers,
                           seed=cfg.seed * 1000 + epoch, drop_last=True)
    sampler = torch.utils.data.distributed.DistributedSampler(
        run.splits.train, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(run.splits.train, batch_size=cfg.data.batch_size, sampler=sampler,
                                       num_workers=cfg.data.loader_workers, drop_last=True,
                                       pin_memory=world.device.type == "cuda")


def evaluation_batches(run: TrainingRun) -> Iterable:
    """This worker's exact shard of the validation split, in order."""
    cfg, world = run.cfg, run.world
    return make_loader(_shard(run.splits.val, world.rank, world.world_size), cfg.data.eval_batch_size,
                       shuffle=False, workers=cfg.data.loader_workers)


def train_epoch(run: TrainingRun, epoch: int) -> tuple[str, dict, float]:
    """One pass over this epoch's batches and an LR-schedule step: ``(phase, metrics, mean objective)``,
    the metrics summed over all ranks."""
    # augmentation draws from the global generator: seed it per (epoch, rank) so an epoch is the same
    # whether or not it follows a resume, or other work in this process
    torch.manual_seed(run.cfg.seed * 100_003 + epoch * 101 + run.world.rank)
    batches = training_batches(run, epoch)
    if epoch == 0 and run.job.training.recalibrate_bn_first:
        batches = recalibrated_first(run, batches)
    phase = run.schedule.start_epoch(run.model, run.optimizer, epoch) if run.schedule else "all"
    lr = run.optimizer.param_groups[0]["lr"]
    extras, stage = run.job.training, run.job.stage
    progress = _batch_progress(run, epoch) if run.world.rank == 0 else None
    try:
        m = T.train_one_epoch(run.model, batches, run.optimizer, run.hw, epoch=epoch, l1=extras.l1,
                              group_l1=extras.group_l1, include_pointwise=extras.include_pointwise,
                              schedule=run.schedule, label_smoothing=run.tcfg.label_smoothing, teacher=run.teacher,
                              progress=progress)
    except T.NonFiniteLossError as err:
        advice = T.non_finite_loss_advice(stage, run.tcfg.lr, {"l1": extras.l1, "group_l1": extras.group_l1})
        raise T.NonFiniteLossError(f"[{stage}] {err}: {advice}") from None
    run.scheduler.step()
    n = m["train_samples"]
    ce, top1, objective, count = run.world.all_reduce(torch.tensor(
        [m["train_ce"] * n, m["train_top1"] * n, m["train_loss"] * n, n], dtype=torch.float64)).tolist()
    if count == 0:
        raise T.TrainingError(f"[{stage}] epoch {epoch} saw no training batch ({len(run.splits.train)} images, "
                              f"data.batch_size={run.cfg.data.batch_size}, {run.world.world_size} worker(s)): "
                              "lower data.batch_size or raise data.train_subset")
    # train_loss is the cross-entropy, comparable with val_loss; the objective adds penalties / distillation
    return phase, {"epoch": epoch, "lr": lr, "train_loss": ce / count, "train_top1": top1 / count}, objective / count


def _batch_progress(run: TrainingRun, epoch: int):
    """Rank 0's progress inside an epoch, to the console (a progress display on the driver)."""
    def progress(done: int, total: int, images: int, seconds: float) -> None:
        console.report_batches(run.job.label or run.job.stage, epoch, run.tcfg.epochs, done, total, images, seconds)

    return progress


BN_RECALIBRATION_BATCHES = 16


def recalibrate_batchnorm(run: TrainingRun, epoch: int) -> None:
    """Every epoch of every stage: BatchNorm statistics recomputed on training batches with the epoch's final
    weights, so validation (and the saved model) never uses running averages that lag behind them.

    The running averages lag behind a strong L1 or group lasso (measured: val 10% after an epoch that trained
    at 80%) and behind channel pruning (a step fine-tuned on 2 Ray workers: val 80.05% with them, 85.0%
    re-estimated). ``torch.optim.swa_utils.update_bn`` on ``BN_RECALIBRATION_BATCHES`` batches (detectron2's
    "precise BN"), averaged over the ranks. Not with the Ray Data loader (its shards stream once per epoch).
    """
    if not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run.plain_model.modules()):
        return
    if resolve_loader(run.cfg.data, in_process=isinstance(run.world, LocalWorld)) == "ray_data":
        return
    T.recalibrate_batchnorm(run.plain_model, training_batches(run, epoch), BN_RECALIBRATION_BATCHES, run.world.device,
                            run.world.all_reduce, run.world.world_size)


class _Prefetched:
    """The first batches of an epoch, already drawn, then the rest of its iterator (one pass: Ray Data too)."""

    def __init__(self, head: list, rest: Iterator, length: int | None) -> None:
        self.head, self.rest, self.length = head, rest, length

    def __iter__(self) -> Iterator:
        return itertools.chain(self.head, self.rest)

    def __len__(self) -> int:
        return self.length or 0


def recalibrated_first(run: TrainingRun, batches: Iterable) -> Iterable:
    """Fresh starts after a structural change (``StageTraining.recalibrate_bn_first``, epoch 0): BatchNorm
    statistics re-estimated on the epoch's first ``BN_RECALIBRATION_BATCHES`` batches (train mode, no grad,
    cumulative average, averaged over the ranks) before any step, so neither the first validation nor the
    running averages start from the statistics of the channels pruning removed. The batches are drawn from the
    epoch's own iterator and then trained on, so every loader works, Ray Data's single-pass shards included."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run.plain_model.modules()):
        return batches
    length = len(batches) if hasattr(batches, "__len__") else None
    rest = iter(batches)
    head = list(itertools.islice(rest, BN_RECALIBRATION_BATCHES))
    T.recalibrate_batchnorm(run.plain_model, head, len(head), run.world.device, run.world.all_reduce,
                            run.world.world_size)
    if run.world.rank == 0:
        console.report_line(f"[{run.job.label or run.job.stage}] BatchNorm statistics re-estimated on {len(head)} training batches "
                            "(the input's channels changed)")
    return _Prefetched(head, rest, length)


def evaluate_epoch(run: TrainingRun) -> dict:
    """Validation loss, top-1 and top-5 over every rank's shard."""
    return T.counts_to_metrics(run.world.all_reduce(T.evaluate_counts(run.model, run.val_batches, run.hw)), "val")


def check_replicas(run: TrainingRun, epoch: int) -> dict:
    """Data-parallel only: every rank's ``replica_digest``; raises if DDP let the replicas drift apart."""
    if run.world.world_size == 1:
        return {}
    digests = gather_digests(run.world, run.model)
    if len(set(digests)) != 1:
        raise RuntimeError(f"[{run.job.stage}] data-parallel replicas diverged at epoch {epoch}: digests {digests}")
    return {"replicas_in_sync": 1.0, "replica_digests": digests}


def penalties(run: TrainingRun, objective: float) -> dict:
    """The objective (cross-entropy + penalties) and the penalties themselves, where the stage logs them."""
    extras = run.job.training
    if not extras.log_penalties:
        return {}
    with torch.no_grad():
        logged = {"train_objective": objective,
                  "l1_penalty": float(penni.l1_penalty(run.plain_model, extras.include_pointwise)),
                  "group_l1_penalty": float(penni.group_l1_penalty(run.plain_model,
                                                                   include_pointwise=extras.include_pointwise))}
    if extras.prune_preview:
        logged["prunable_fraction"] = penni.prunable_fraction(run.plain_model, **extras.prune_preview)
    return logged


def keep_best(run: TrainingRun, epoch: int, metrics: dict) -> None:
    """Remember the best epoch on validation (rank 0 keeps a copy of its model)."""
    if metrics["val_top1"] > run.best["val_top1"]:
        run.best = {"epoch": epoch, "val_top1": metrics["val_top1"]}
        if run.world.rank == 0:
            save(run.plain_model, run.best_copy, verify=False)


def report_epoch(run: TrainingRun, epoch: int, metrics: dict, phase: str) -> None:
    """Rank 0: one console line, and the metrics to the stage's MLflow run."""
    if run.world.rank != 0:
        return
    console.report_epoch(run.job.label or run.job.stage, epoch, run.tcfg.epochs, {**metrics, "phase": phase})
    if run.logger is not None:
        run.logger.log({k: v for k, v in metrics.items() if k != "replica_digests"}, step=epoch)


def save_checkpoint(run: TrainingRun, epoch: int, metrics: dict) -> None:
    """Every rank reports (a barrier in Ray Train); rank 0 attaches the checkpoint directory."""
    with tempfile.TemporaryDirectory(prefix="penni-ckpt-") as tmp:
        directory = None
        if run.world.rank == 0:
            directory = Path(tmp)
            write_checkpoint(directory, run.plain_model, run.optimizer, run.scheduler, epoch, run.best, run.history,
                             run.best_copy)
        run.world.report(metrics, directory)


def replica_digest(model: nn.Module) -> int:
    """A 63-bit digest of every parameter and buffer's bytes (basis included): equal on all
    replicas iff DDP kept them bit-identical."""
    h = hashlib.sha256()
    for name, tensor in sorted(penni.unwrap_model(model).state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "big") >> 1


def gather_digests(world, model: nn.Module) -> list[int]:
    """Every rank's ``replica_digest`` (a collective: all ranks must call it)."""
    mine = torch.zeros(world.world_size, dtype=torch.int64)
    mine[world.rank] = replica_digest(model)
    return [int(v) for v in world.all_reduce(mine)]


def _maybe_inject_failure(stage: str, epoch: int) -> None:
    """Fault injection for resume tests: ``PENNI_FAIL_ONCE=<stage>:<epoch>:<marker file>`` makes the
    first attempt to start that epoch fail (the marker file records that it did)."""
    spec = os.environ.get("PENNI_FAIL_ONCE")
    if not spec:
        return
    want_stage, want_epoch, marker = spec.split(":", 2)
    if (stage, str(epoch)) == (want_stage, want_epoch) and not os.path.exists(marker):
        Path(marker).write_text("failed once")
        raise RuntimeError(f"injected failure at {stage} epoch {epoch} (PENNI_FAIL_ONCE)")
def run_training(job: TrainJob, *, use_ray: bool, run_name: str, storage: tuple[str, Any],
                 num_workers: int, use_gpu: bool, cpus_per_worker: float, max_failures: int,
                 local_dir: Path, callbacks: list | None = None) -> tuple[Path, dict]:
    """Run ``job`` and return ``(final checkpoint directory, result)``.

    With Ray: a ``TorchTrainer`` whose ``RunConfig(name=run_name, storage_path=...)`` is stable
    for the same inputs, so re-running an interrupted stage resumes from its last checkpoint.
    Without Ray: the same loop in this process, checkpointing under ``local_dir``.
    ``callbacks``: extra Ray Train callbacks for ``RunConfig(callbacks=...)`` (ignored without Ray).
    """
    if not use_ray:
        world = LocalWorld(local_dir / run_name, use_gpu, job.stage)
        result = training_loop(job.to_dict(), world)
        return verified(world.checkpoint_dir / "latest", run_name), result
    import ray.train
    from ray.train.torch import TorchTrainer

    from ..data.ray_data import plan_input

    storage_path, filesystem = storage
    job_dict = job.to_dict()
    job_dict["config"], datasets = plan_input(job_dict["config"], num_workers, cpus_per_worker)
    trainer = TorchTrainer(
        training_loop,
        train_loop_config=job_dict,
        datasets=datasets or None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks or [])),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - re-raised as the training error inside it, if any
        raise _training_error_inside(err) or err
    if result.error:
        raise _training_error_inside(result.error) or result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} reported no checkpoint")
    target = local_dir / run_name / "final"
    shutil.rmtree(target, ignore_errors=True)
    result.checkpoint.to_directory(str(target))
    return verified(target, run_name), result.return_value or {}


def _training_error_inside(err: BaseException) -> T.TrainingError | None:
    """The ``TrainingError`` a Ray Train worker raised, unwrapped (so it reads as one line and is not retried)."""
    found = find_cause(err, T.TrainingError)
    return found if isinstance(found, T.TrainingError) else None
