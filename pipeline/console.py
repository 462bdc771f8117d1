"""What the user sees while a run works: one line per epoch and stage, progress, warnings.

Training code (in-process or inside a Ray Train worker, rank 0 only) calls ``report_epoch``,
``report_batches`` and ``report_line``; the driver decides how they are shown.
"""
from __future__ import annotations

from typing import Any


def report_epoch(stage: str, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
    """One finished epoch (``epoch`` counts from 0) of ``stage``: shown as one line on the driver."""
    from .train import format_epoch

    print(format_epoch(stage, epoch, epochs, metrics), flush=True)


def report_batches(stage: str, epoch: int, epochs: int, done: int, total: int, images: int, seconds: float) -> None:
    """Progress inside an epoch: ``done`` of ``total`` batches, ``images`` seen in ``seconds``."""


def report_line(text: str) -> None:
    """A warning or note from training code (e.g. a discarded checkpoint), shown once on the driver."""
    print(text, flush=True)
