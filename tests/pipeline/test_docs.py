"""The design doc's generated parts match the code (module map from docstrings, stage table from stage_table.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
        for path in (ROOT / package).glob("*.py"):
            if path.name != "__init__.py" or package == "penni":
                assert f"  {path.name} " in text, f"{package}/{path.name} is missing from docs/DESIGN.md"
