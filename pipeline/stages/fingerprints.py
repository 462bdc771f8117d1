"""Stage fingerprints: what makes a stage re-run.

A stage's fingerprint hashes the config values it depends on (the stage table's ``config`` column;
``sweep`` is in none, so a changed search space never re-runs a stage) and its inputs'
fingerprints, so equal inputs give equal fingerprints in any process.
"""
from __future__ import annotations

from typing import Any

from ..config.loading import to_dict
from ..config.schema import PipelineConfig
from ..storage.canonical import canonical_sha256, fingerprint
from .table import STAGE_DEPENDENCIES, STAGE_INPUTS, STAGES

__all__ = ["section_fingerprint", "stage_fingerprints"]


def _lookup(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def section_fingerprint(cfg: PipelineConfig, stage: str) -> str:
    """sha256 hex of the canonical JSON of the config values ``stage`` depends on."""
    if stage not in STAGE_DEPENDENCIES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    d = to_dict(cfg)
    return canonical_sha256({"stage": stage, "config": {key: _lookup(d, key) for key in STAGE_DEPENDENCIES[stage]}})


def stage_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """Fingerprint of each stage = hash(its config section, its inputs' fingerprints)."""
    prints: dict[str, str] = {}
    for stage in STAGES:
        prints[stage] = fingerprint(stage, section_fingerprint(cfg, stage), [prints[s] for s in STAGE_INPUTS[stage]])
    return prints
