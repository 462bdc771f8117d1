"""Training checkpoints: what one holds, its checksums, and which one a resume may trust.

A checkpoint directory holds the model (masks inside), the optimizer and LR-schedule state with the
epoch and the best-so-far, the per-epoch history, the best-on-validation model, and
``checksums.json`` (the sha256 of each file, written last, before the checkpoint is reported).
Resuming verifies it and discards a checkpoint that fails (one warning line), falling back to an
older checkpoint or to the stage input.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from penni.serialization.format import save

from .. import console
from ..storage.canonical import write_json
from ..storage.fileio import sha256_file

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
CHECKSUMS_FILE = "checksums.json"
REQUIRED_FILES = (MODEL_FILE, STATE_FILE, HISTORY_FILE)


def write_checksums(directory: Path) -> None:
    """Record the sha256 of every file of a checkpoint directory in ``checksums.json`` (written last)."""
    files = {p.name: sha256_file(p) for p in sorted(Path(directory).iterdir())
             if p.is_file() and p.name != CHECKSUMS_FILE}
    write_json(Path(directory) / CHECKSUMS_FILE, {"sha256": files})


def checkpoint_problem(directory: Path, required: tuple[str, ...] = REQUIRED_FILES) -> str | None:
    """Why the checkpoint in ``directory`` must not be resumed from (None when every file matches; ``required``:
    the files it must list, a training checkpoint's by default)."""
    directory = Path(directory)
    try:
        listed = json.loads((directory / CHECKSUMS_FILE).read_text())["sha256"]
    except FileNotFoundError:
        return f"it has no {CHECKSUMS_FILE}"
    except (ValueError, KeyError, TypeError, OSError) as err:
        return f"its {CHECKSUMS_FILE} is unreadable ({type(err).__name__})"
    if not isinstance(listed, dict):
        return f"its {CHECKSUMS_FILE} is unreadable (not a mapping)"
    missing = [name for name in required if name not in listed]
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
    that passes ``checkpoint_problem``; rank 0 reports one warning line per checkpoint it discards."""
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


def write_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, best: dict, history: list[dict],
                     best_copy: Path) -> None:
    """Fill ``directory`` with one epoch's checkpoint, checksums last (never visible without them)."""
    directory = Path(directory)
    save(model, directory / MODEL_FILE, verify=False)
    if best_copy.exists():
        shutil.copy2(best_copy, directory / BEST_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "best": best}, directory / STATE_FILE)
    write_json(directory / HISTORY_FILE, history)
    write_checksums(directory)


def read_training_state(directory: Path) -> tuple[dict, list[dict]]:
    """The optimizer/scheduler/epoch/best state and the history of a verified checkpoint (no pickle)."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    return state, json.loads((Path(directory) / HISTORY_FILE).read_text())


def verified(directory: Path, run_name: str) -> Path:
    """``directory`` if its checksums match; a checkpoint that changed after training is never published."""
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise RuntimeError(f"the final checkpoint of training run {run_name} ({directory}) failed verification: "
                           f"{problem}; re-run to train it again")
    return directory
