"""Where the training loop runs: ``LocalWorld`` (this process) or ``RayWorld`` (one Ray Train worker).

Both give the loop the same few things: rank and world size, the device, ``prepare_model`` (DDP
under Ray), the latest trustworthy checkpoint, ``report`` (metrics plus a checkpoint directory)
and ``all_reduce``. ``LocalWorld`` checkpoints to a local directory (``latest``, ``previous``),
so an interrupted in-process stage resumes there too.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .checkpoints import first_good_checkpoint


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
