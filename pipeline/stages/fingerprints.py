"""Stage fingerprints: what makes a stage re-run.

A stage's fingerprint hashes the config values it depends on (the stage table's ``config`` column;
``sweep`` is in none, so a changed search space never re-runs a stage) and its inputs'
fingerprints, so equal inputs give equal fingerprints in any process. A value written ``auto`` that the
config alone resolves is hashed as what it resolves to (``data.hflip``: ``pipeline.data.transforms.resolve_hflip``),
so ``hflip: auto`` on Fashion-MNIST and the older ``hflip: true`` are the same run and share fingerprints.
"""
from __future__ import annotations

from typing import Any

from ..config.loading import to_dict
from ..config.schema import PipelineConfig
from ..data.transforms import resolve_hflip
from ..storage.canonical import canonical_sha256, fingerprint
from .table import STAGE_INPUTS, STAGES
from .table import stage as stage_entry

__all__ = ["section_fingerprint", "stage_fingerprints"]


def _lookup(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def section_fingerprint(cfg: PipelineConfig, stage: str) -> str:
    """sha256 hex of the canonical JSON of the config values ``stage`` depends on."""
    keys = stage_entry(stage).config_for(cfg)  # a stage that trains only in some runs hashes more in those
    d = to_dict(cfg)
    d["data"]["hflip"] = resolve_hflip(cfg.data)[0]
    return canonical_sha256({"stage": stage, "config": {key: _lookup(d, key) for key in keys}})


def stage_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """Fingerprint of each stage = hash(its config section, its inputs' fingerprints)."""
    prints: dict[str, str] = {}
    for stage in STAGES:
        prints[stage] = fingerprint(stage, section_fingerprint(cfg, stage), [prints[s] for s in STAGE_INPUTS[stage]])
    return prints
