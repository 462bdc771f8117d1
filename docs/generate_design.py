"""Regenerate the generated parts of docs/DESIGN.md: the module map (from each module's docstring) and the
stage table (from pipeline/stages/table.py), so the design doc cannot drift from the code.

    python docs/generate_design.py           # rewrite docs/DESIGN.md in place
    python docs/generate_design.py --check   # exit 1 when docs/DESIGN.md is out of date (tests/pipeline/test_docs.py)
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"
PACKAGES = ("penni", "penni/models", "pipeline", "pipeline/sweep", "workflows", "benchmarks")
BLOCKS = ("modules", "stages")


def first_docstring_line(path: Path) -> str:
    """The first sentence line of a module's docstring ('-' when it has none)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else "-"


def module_map() -> str:
    """One line per module: its path and what it is for."""
    lines = ["```"]
    for package in PACKAGES:
        lines.append(f"{package}/")
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name != "__init__.py" or package in ("penni", "pipeline/sweep"):
                lines.append(f"  {path.name:<22} {first_docstring_line(path)}")
    lines.append("```")
    return "\n".join(lines) + "\n"


def stage_table() -> str:
    """The stage table as Markdown (pipeline/stages/table.py is the one list of stages)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.stages.table import markdown_table

    return markdown_table()


def render(text: str) -> str:
    """``text`` with every generated block replaced by its current content."""
    content = {"modules": module_map(), "stages": stage_table()}
    for name in BLOCKS:
        start, end = f"<!-- generated:{name} -->\n", f"<!-- end:{name} -->"
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + start + content[name] + end + tail
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/DESIGN.md is current")
    args = parser.parse_args(argv)
    current = DESIGN.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("docs/DESIGN.md is out of date: run python docs/generate_design.py", file=sys.stderr)
            return 1
        return 0
    DESIGN.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
