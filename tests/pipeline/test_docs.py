"""The design doc's generated parts match the code (layers and modules, the stage table, the config walk)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_design_doc_is_current() -> None:
    proc = subprocess.run([sys.executable, "docs/generate_design.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_design_doc_lists_every_stage_and_module() -> None:
    from pipeline.stages.table import STAGES

    text = (ROOT / "docs" / "DESIGN.md").read_text()
    assert all(f"| {stage} |" in text for stage in STAGES)
    for package in ("penni", "pipeline"):
        for path in (ROOT / package).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            assert f"  {rel} " in text, f"{rel} is missing from docs/DESIGN.md"


def test_the_config_walk_fails_on_a_step_that_names_nothing(monkeypatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_design", ROOT / "docs" / "generate_design.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert "retrain_training" in gen.config_walk()
    monkeypatch.setattr(gen, "CONFIG_WALK", (("pipeline/stages/functions.py", "no_such_function", "x"),))
    with pytest.raises(LookupError, match="no_such_function"):
        gen.config_walk()
