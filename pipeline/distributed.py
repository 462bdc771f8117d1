"""Data-parallel training of one stage: on Ray Train workers, or in this process without Ray.

``training_loop(config)`` is the per-worker function. ``RayWorld`` adapts it to Ray Train V2
(``ray.train.report`` with a checkpoint every epoch, resumption through
``ray.train.get_checkpoint()``, DDP through ``prepare_model``); ``LocalWorld`` runs the same
loop in-process (GPU machines without Ray, debugging, unit tests), checkpointing to a local
directory so an interrupted stage resumes there too.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import penni
from penni.serialization import load, load_state, save

from . import train as T
from .config import from_dict
from .data import build_datasets, make_loader

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


class LocalWorld:
    """A world of one process; checkpoints go to ``checkpoint_dir`` (resumable)."""

    def __init__(self, checkpoint_dir: Path, use_gpu: bool) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.rank, self.world_size = 0, 1
        want_gpu = use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        latest = self.checkpoint_dir / "latest"
        return latest if (latest / STATE_FILE).exists() else None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            return
        target = self.checkpoint_dir / "latest"
        staging = self.checkpoint_dir / f"latest.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        if target.exists():
            old = self.checkpoint_dir / f"latest.old-{os.getpid()}"
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t


class RayWorld:
    """One Ray Train worker of a data-parallel group (gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self._torch = ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._checkpoint_context = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return self._torch.prepare_model(model)

    def latest_checkpoint(self) -> Path | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        self._checkpoint_context = checkpoint.as_directory()
        return Path(self._checkpoint_context.__enter__())

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        self._train.report(metrics, checkpoint=checkpoint)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            on_device = t.to(self.device)
            dist.all_reduce(on_device)
            return on_device.cpu()
        return t


def replica_digest(model: nn.Module) -> int:
    """A 63-bit digest of every parameter and buffer's bytes (basis included): equal on all
    replicas iff DDP kept them bit-identical."""
    h = hashlib.sha256()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "big") >> 1


def gather_digests(world, model: nn.Module) -> list[int]:
    """Every rank's ``replica_digest`` (a collective: all ranks must call it)."""
    mine = torch.zeros(world.world_size, dtype=torch.int64)
    mine[world.rank] = replica_digest(model)
    return [int(v) for v in world.all_reduce(mine)]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


@dataclass
class TrainJob:
    """What a training stage asks the loop to do (all plain data: it crosses process boundaries)."""

    stage: str                     # "baseline" | "retrain" | "finetune"
    config: dict                   # the whole pipeline config as a dict
    input_model: str | None        # penni checkpoint to start from (None: build from the config)
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _stage_section(cfg: Any, stage: str) -> Any:
    return getattr(cfg, stage)


def _initial_model(job: TrainJob, cfg: Any) -> nn.Module:
    if job.input_model:
        return load(job.input_model)
    from penni.models import build_model

    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.arch, num_classes=cfg.model.num_classes, in_channels=cfg.model.in_channels,
                       **cfg.model.kwargs)


def _shard(dataset, rank: int, world_size: int):
    """Every ``world_size``-th sample from ``rank``: disjoint, exact shards for evaluation."""
    if world_size == 1:
        return dataset
    return torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world_size)))


def _train_loader(dataset, cfg, world, epoch_seed: int):
    sampler = None
    if world.world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    if sampler is None:
        return make_loader(dataset, cfg.data.batch_size, shuffle=True, workers=cfg.data.loader_workers,
                           seed=epoch_seed, drop_last=True), None
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler,
                                         num_workers=cfg.data.loader_workers, drop_last=True,
                                         pin_memory=world.device.type == "cuda")
    return loader, sampler


def training_loop(job_dict: dict, world: Any = None) -> dict:
    """Train one stage; returns ``{"history": [...], "best_epoch": i}`` (rank 0's view).

    Checkpoints every epoch (model with masks, optimizer, LR schedule, epoch, best-so-far),
    so a restarted worker group or a re-run of the same stage continues where it stopped.
    """
    job = TrainJob(**job_dict)
    cfg = from_dict(job.config)
    world = world or RayWorld()
    tcfg = _stage_section(cfg, job.stage)

    model = _initial_model(job, cfg)
    hw = T.resolve_hardware(tcfg, world.device)
    history: list[dict] = []
    start_epoch, best = 0, {"epoch": -1, "val_top1": -1.0}
    resume_dir = world.latest_checkpoint()
    best_copy = Path(tempfile.mkdtemp(prefix="penni-best-")) / BEST_FILE  # best-on-validation model so far
    if resume_dir is not None:
        load_state(model, resume_dir / MODEL_FILE)
        if (resume_dir / BEST_FILE).exists():
            shutil.copy2(resume_dir / BEST_FILE, best_copy)
    model = model.to(world.device)
    if hw.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = world.prepare_model(model)  # DDP wraps the final structure; the optimizer is built after it
    optimizer = T.build_optimizer(model, tcfg)
    scheduler = T.build_scheduler(optimizer, tcfg)
    if resume_dir is not None:
        state = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        history = json.loads((resume_dir / HISTORY_FILE).read_text())
        if world.rank == 0:
            print(f"[{job.stage}] resuming from epoch {start_epoch} (checkpoint {resume_dir})", flush=True)

    retraining = job.stage == "retrain"
    schedule = penni.AlternatingSchedule(tcfg.alternate_every, tcfg.start_with) if retraining else None
    l1 = tcfg.l1 if retraining else 0.0
    include_pointwise = bool(getattr(tcfg, "include_pointwise", False))

    splits = build_datasets(cfg.data, seed=cfg.seed)
    val_loader = make_loader(_shard(splits.val, world.rank, world.world_size), cfg.data.eval_batch_size,
                             shuffle=False, workers=cfg.data.loader_workers)
    logger = None
    if world.rank == 0 and job.tracking_uri and job.mlflow_run_id:
        from .tracking import EpochLogger

        logger = EpochLogger(job.tracking_uri, job.mlflow_run_id)

    for epoch in range(start_epoch, tcfg.epochs):
        _maybe_inject_failure(job.stage, epoch)
        # augmentation draws from the global generator: seed it per (epoch, rank) so an epoch is
        # the same whether or not it follows a resume, or other work in this process
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + world.rank)
        t0 = time.perf_counter()
        loader, sampler = _train_loader(splits.train, cfg, world, cfg.seed * 1000 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        phase = schedule.start_epoch(model, optimizer, epoch) if schedule else "all"
        lr = optimizer.param_groups[0]["lr"]
        train_m = T.train_one_epoch(model, loader, optimizer, hw, epoch=epoch, l1=l1,
                                    include_pointwise=include_pointwise, schedule=schedule,
                                    label_smoothing=tcfg.label_smoothing)
        scheduler.step()
        n = train_m["train_samples"]
        train_counts = world.all_reduce(torch.tensor(
            [train_m["train_ce"] * n, train_m["train_top1"] * n, train_m["train_loss"] * n, n], dtype=torch.float64))
        val_m = T.counts_to_metrics(world.all_reduce(T.evaluate_counts(model, val_loader, hw)), "val")
        metrics = {
            "epoch": epoch, "lr": lr,
            "train_loss": float(train_counts[0] / train_counts[3]),  # cross-entropy: comparable with val_loss
            "train_top1": float(train_counts[1] / train_counts[3]),
            **val_m,
            "sparsity": penni.coefficient_sparsity(unwrap(model), include_pointwise),
            "epoch_seconds": time.perf_counter() - t0,
        }
        if world.world_size > 1:
            digests = gather_digests(world, model)
            metrics["replicas_in_sync"] = float(len(set(digests)) == 1)
            metrics["replica_digests"] = digests
            if len(set(digests)) != 1:
                raise RuntimeError(f"[{job.stage}] data-parallel replicas diverged at epoch {epoch}: digests {digests}")
        if job.stage == "retrain":
            metrics["train_objective"] = float(train_counts[2] / train_counts[3])  # cross-entropy + l1 * |coefficients|
            with torch.no_grad():
                metrics["l1_penalty"] = float(penni.l1_penalty(unwrap(model), include_pointwise))
        if metrics["val_top1"] > best["val_top1"]:
            best = {"epoch": epoch, "val_top1": metrics["val_top1"]}
            if world.rank == 0:
                save(unwrap(model), best_copy, verify=False)
        history.append({**metrics, "phase": phase})
        if world.rank == 0:
            print(T.format_epoch(job.stage, epoch, tcfg.epochs, {**metrics, "phase": phase}), flush=True)
            if logger is not None:
                logger.log({k: v for k, v in metrics.items() if k != "replica_digests"}, step=epoch)
        _checkpoint(world, unwrap(model), optimizer, scheduler, epoch, best, history, metrics, best_copy)
    shutil.rmtree(best_copy.parent, ignore_errors=True)
    return {"history": history, "best": best, "start_epoch": start_epoch}


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


def _checkpoint(world, model, optimizer, scheduler, epoch, best, history, metrics, best_copy: Path) -> None:
    """Every rank reports (a barrier in Ray Train); rank 0 attaches the checkpoint directory."""
    with tempfile.TemporaryDirectory(prefix="penni-ckpt-") as tmp:
        directory = None
        if world.rank == 0:
            directory = Path(tmp)
            save(model, directory / MODEL_FILE, verify=False)
            if best_copy.exists():
                shutil.copy2(best_copy, directory / BEST_FILE)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "epoch": epoch, "best": best}, directory / STATE_FILE)
            (directory / HISTORY_FILE).write_text(json.dumps(history, indent=1))
        world.report(metrics, directory)


def run_training(job: TrainJob, *, use_ray: bool, run_name: str, storage: tuple[str, Any],
                 num_workers: int, use_gpu: bool, cpus_per_worker: float, max_failures: int,
                 local_dir: Path) -> tuple[Path, dict]:
    """Run ``job`` and return ``(final checkpoint directory, result)``.

    With Ray: a ``TorchTrainer`` whose ``RunConfig(name=run_name, storage_path=...)`` is stable
    for the same inputs, so re-running an interrupted stage resumes from its last checkpoint.
    Without Ray: the same loop in this process, checkpointing under ``local_dir``.
    """
    if not use_ray:
        world = LocalWorld(local_dir / run_name, use_gpu)
        result = training_loop(job.to_dict(), world)
        latest = world.latest_checkpoint()
        return latest, result
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = storage
    trainer = TorchTrainer(
        training_loop,
        train_loop_config=job.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} reported no checkpoint")
    target = local_dir / run_name / "final"
    shutil.rmtree(target, ignore_errors=True)
    result.checkpoint.to_directory(str(target))
    return target, result.return_value or {}
