"""Data-parallel training of one stage: on Ray Train workers, or in this process without Ray.

``training_loop(config)`` is the per-worker function. ``RayWorld`` adapts it to Ray Train V2
(``ray.train.report`` with a checkpoint every epoch, resumption through
``ray.train.get_checkpoint()``, DDP through ``prepare_model``); ``LocalWorld`` runs the same
loop in-process (GPU machines without Ray, debugging, unit tests), checkpointing to a local
directory so an interrupted stage resumes there too.

Every checkpoint directory carries ``checksums.json`` (the sha256 of each of its files, written
before the checkpoint is reported); resuming verifies it and discards a checkpoint that fails
(one warning line), falling back to an older checkpoint of the run or to the stage input. The run
directory is keyed by ``training_run_name``: the stage's fingerprint and the content hash of its
input model, so an upstream stage that produced different weights is never resumed into.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import penni
from penni.serialization import load, load_state, save

from . import console
from . import train as T
from .config import from_dict
from .data import build_datasets, make_loader
from .storage import fingerprint, sha256_file

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
CHECKSUMS_FILE = "checksums.json"
REQUIRED_FILES = (MODEL_FILE, STATE_FILE, HISTORY_FILE)


def training_run_name(stage: str, stage_fingerprint: str, input_model: str | os.PathLike | None) -> str:
    """``<stage>-<key>``: the key hashes the stage's fingerprint (its config and its inputs' configs) and
    the sha256 of the input model file, so a run directory is only ever resumed with the same inputs."""
    content = sha256_file(input_model) if input_model else None
    return f"{stage}-{fingerprint(stage_fingerprint, content)[:12]}"


def write_checksums(directory: Path) -> None:
    """Record the sha256 of every file of a checkpoint directory in ``checksums.json`` (written last)."""
    files = {p.name: sha256_file(p) for p in sorted(Path(directory).iterdir())
             if p.is_file() and p.name != CHECKSUMS_FILE}
    (Path(directory) / CHECKSUMS_FILE).write_text(json.dumps({"sha256": files}, indent=1, sort_keys=True))


def checkpoint_problem(directory: Path) -> str | None:
    """Why the checkpoint in ``directory`` must not be resumed from (None when every file matches)."""
    directory = Path(directory)
    try:
        listed = json.loads((directory / CHECKSUMS_FILE).read_text())["sha256"]
    except FileNotFoundError:
        return f"it has no {CHECKSUMS_FILE}"
    except (ValueError, KeyError, TypeError, OSError) as err:
        return f"its {CHECKSUMS_FILE} is unreadable ({type(err).__name__})"
    if not isinstance(listed, dict):
        return f"its {CHECKSUMS_FILE} is unreadable (not a mapping)"
    missing = [name for name in REQUIRED_FILES if name not in listed]
    if missing:
        return f"its {CHECKSUMS_FILE} does not list {', '.join(missing)}"
    for name, digest in sorted(listed.items()):
        path = directory / name
        if os.sep in name or name in ("", ".", "..") or not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its sha256"
    return None


def first_good_checkpoint(stage: str, candidates: list[tuple[str, Callable[[], Path]]], rank: int) -> Path | None:
    """The local directory of the first of ``candidates`` (``(where it is stored, open it)``, newest first)
    that passes ``checkpoint_problem``; rank 0 prints one warning line per checkpoint it discards."""
    discarded: list[tuple[str, str]] = []
    chosen = None
    for where, open_directory in candidates:
        directory = Path(open_directory())
        problem = checkpoint_problem(directory)
        if problem is None:
            chosen = (where, directory)
            break
        discarded.append((where, problem))
    if rank == 0:
        fallback = f"checkpoint {chosen[0]}" if chosen is not None else "the stage input"
        for where, problem in discarded:
            console.report_line(f"[{stage}] warning: discarding checkpoint {where}: {problem}; resuming from {fallback}")
    return chosen[1] if chosen is not None else None


class LocalWorld:
    """A world of one process; checkpoints go to ``checkpoint_dir`` (resumable)."""

    def __init__(self, checkpoint_dir: Path, use_gpu: bool, stage: str = "train") -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.stage = stage
        self.rank, self.world_size = 0, 1
        want_gpu = use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        """``latest``, else ``previous`` (the one before it), whichever first passes its checksums."""
        candidates = [self.checkpoint_dir / name for name in ("latest", "previous")]
        return first_good_checkpoint(self.stage, [(str(c), lambda c=c: c) for c in candidates if c.is_dir()],
                                     self.rank)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Commit ``checkpoint_dir`` as ``latest``, keeping the one before as ``previous``."""
        if checkpoint_dir is None:
            return
        target, previous = self.checkpoint_dir / "latest", self.checkpoint_dir / "previous"
        staging = self.checkpoint_dir / f"latest.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        if target.exists():
            shutil.rmtree(previous, ignore_errors=True)
            target.rename(previous)
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
        self.stage = "train"
        self._opened = contextlib.ExitStack()  # checkpoint directories stay open for this worker's life

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return self._torch.prepare_model(model)

    def latest_checkpoint(self) -> Path | None:
        """Ray Train's latest checkpoint, else the older ones kept in the run directory (newest first),
        whichever first passes its checksums; None (start from the stage input) if none does."""
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        candidates = [checkpoint, *self._older_checkpoints(checkpoint)]
        return first_good_checkpoint(
            self.stage, [(c.path, lambda c=c: self._opened.enter_context(c.as_directory())) for c in candidates],
            self.rank)

    def _older_checkpoints(self, latest) -> list:
        """The other ``checkpoint_*`` directories beside ``latest`` that are older (names are timestamps)."""
        import pyarrow.fs
        from ray.train import Checkpoint

        run_dir, name = posixpath.split(latest.path.rstrip("/"))
        entries = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True))
        older = sorted((e.base_name for e in entries if e.type == pyarrow.fs.FileType.Directory
                        and e.base_name.startswith("checkpoint_") and e.base_name < name), reverse=True)
        return [Checkpoint(posixpath.join(run_dir, n), filesystem=latest.filesystem) for n in older]

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

    world.stage = job.stage
    splits = build_datasets(cfg.data, seed=cfg.seed)
    T.check_trainable(cfg, splits, num_workers=world.world_size)
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
            console.report_line(f"[{job.stage}] resuming from epoch {start_epoch} (checkpoint {resume_dir})")

    retraining = job.stage == "retrain"
    schedule = penni.AlternatingSchedule(tcfg.alternate_every, tcfg.start_with) if retraining else None
    l1 = tcfg.l1 if retraining else 0.0
    group_l1 = getattr(tcfg, "group_l1", 0.0) if retraining else 0.0
    include_pointwise = bool(getattr(tcfg, "include_pointwise", False))

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
        try:
            train_m = T.train_one_epoch(model, loader, optimizer, hw, epoch=epoch, l1=l1, group_l1=group_l1,
                                        include_pointwise=include_pointwise, schedule=schedule,
                                        label_smoothing=tcfg.label_smoothing)
        except T.NonFiniteLossError as err:
            raise T.NonFiniteLossError(f"[{job.stage}] {err}: {T.non_finite_loss_advice(job.stage, tcfg)}") from None
        scheduler.step()
        n = train_m["train_samples"]
        train_counts = world.all_reduce(torch.tensor(
            [train_m["train_ce"] * n, train_m["train_top1"] * n, train_m["train_loss"] * n, n], dtype=torch.float64))
        if train_counts[3] == 0:
            raise T.TrainingError(f"[{job.stage}] epoch {epoch} saw no training batch ({len(splits.train)} images, "
                                  f"data.batch_size={cfg.data.batch_size}, {world.world_size} worker(s)): "
                                  "lower data.batch_size or raise data.train_subset")
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
                metrics["group_l1_penalty"] = float(penni.group_l1_penalty(unwrap(model), include_pointwise=include_pointwise))
        if metrics["val_top1"] > best["val_top1"]:
            best = {"epoch": epoch, "val_top1": metrics["val_top1"]}
            if world.rank == 0:
                save(unwrap(model), best_copy, verify=False)
        history.append({**metrics, "phase": phase})
        if world.rank == 0:
            console.report_epoch(job.stage, epoch, tcfg.epochs, {**metrics, "phase": phase})
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
            write_checksums(directory)  # before the report: a checkpoint is never visible without them
        world.report(metrics, directory)


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
        return _verified(world.checkpoint_dir / "latest", run_name), result
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
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks or [])),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        raise _training_error_inside(err) or err
    if result.error:
        raise _training_error_inside(result.error) or result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} reported no checkpoint")
    target = local_dir / run_name / "final"
    shutil.rmtree(target, ignore_errors=True)
    result.checkpoint.to_directory(str(target))
    return _verified(target, run_name), result.return_value or {}


def _verified(directory: Path, run_name: str) -> Path:
    """``directory`` if its checksums match; a checkpoint that changed after training is never published."""
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise RuntimeError(f"the final checkpoint of training run {run_name} ({directory}) failed verification: "
                           f"{problem}; re-run to train it again")
    return directory


def _training_error_inside(err: BaseException) -> T.TrainingError | None:
    """The ``TrainingError`` a Ray Train worker raised, unwrapped (so it reads as one line and is not retried)."""
    seen = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError wrapping the worker's exception
        if isinstance(e, T.TrainingError):
            return cause if isinstance(cause, T.TrainingError) else e
        todo += [cause, e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return None
