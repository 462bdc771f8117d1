"""Regenerate the generated parts of docs/DESIGN.md from the code, so the design doc cannot drift from it: the
layers with their modules (docs/layers.py and each module's docstring), the stage table (pipeline/stages/table.py)
and the walk of one config value from YAML to the tensor it changes (every step checked against the source).

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
BLOCKS = ("layers", "stages", "walk")
ENTRY_POINTS = ("workflows", "benchmarks")

#: ``retrain.l1`` from the YAML file to the gradient on the coefficients: (file, name it passes through, what happens).
CONFIG_WALK: tuple[tuple[str, str, str], ...] = (
    ("pipeline/config/presets/quickstart.yaml", "l1:", "the value is written in the `retrain:` section"),
    ("pipeline/config/loading.py", "load_config", "reads the YAML (strict booleans, no duplicate keys), applies "
     "`--set retrain.l1=...`"),
    ("pipeline/config/schema.py", "RetrainConfig", "validates it (`l1: NonNegFloat`): a negative or a string "
     "value is an error before any job starts"),
    ("pipeline/stages/table.py", "STAGE_TABLE", "the retrain stage's fingerprint hashes the `retrain` section, so "
     "a changed l1 re-runs retrain and every stage after it"),
    ("pipeline/stages/fingerprints.py", "stage_fingerprints", "computes those fingerprints"),
    ("pipeline/stages/functions.py", "retrain_training", "copies it into the stage's `StageTraining`, the one "
     "carrier of stage training settings"),
    ("pipeline/training/distributed.py", "TrainJob", "the job (plain data) crosses to the Ray Train workers or "
     "runs in-process"),
    ("pipeline/training/distributed.py", "train_epoch", "passes `StageTraining.l1` to the epoch"),
    ("pipeline/training/loop.py", "train_one_epoch", "adds the penalty to each batch's loss"),
    ("penni/regularization.py", "sparsity_penalty", "`l1 * l1_penalty(model)`: the sum of |coefficients| of "
     "every `PenniConv2d`"),
    ("penni/conv.py", "PenniConv2d", "holds `coefficients` (Cout x Cin x d): autograd adds `l1 * sign(coefficients)` "
     "to their gradient, and the optimizer step changes the tensor"),
)


def _layers():
    sys.path.insert(0, str(ROOT / "docs"))
    import layers

    return layers


def first_docstring_line(path: Path) -> str:
    """The first line of a module's docstring ('-' when it has none)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else "-"


def project_modules() -> dict[str, Path]:
    """Every module of penni/ and pipeline/ by dotted name (a package by its ``__init__``)."""
    out = {}
    for package in ("penni", "pipeline"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_map() -> str:
    """The layers bottom first, each with its modules and what each is for."""
    layers = _layers()
    by_layer: dict[int, list[tuple[str, Path]]] = {}
    for name, path in project_modules().items():
        by_layer.setdefault(layers.layer_of(name), []).append((name, path))
    lines = []
    for index, (title, does, _) in enumerate(layers.LAYERS):
        lines += [f"**{index}. {title}**: {does}", "", "```"]
        for _, path in sorted(by_layer.get(index, []), key=lambda item: str(item[1])):
            lines.append(f"  {str(path.relative_to(ROOT)):<38} {first_docstring_line(path)}")
        lines += ["```", ""]
    lines += ["**Entry points** (thin scripts on top of everything):", "", "```"]
    for folder in ENTRY_POINTS:
        for path in sorted((ROOT / folder).glob("*.py")):
            lines.append(f"  {str(path.relative_to(ROOT)):<38} {first_docstring_line(path)}")
    lines.append("```")
    return "\n".join(lines) + "\n"


def stage_table() -> str:
    """The stage table as Markdown (pipeline/stages/table.py is the one list of stages)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.stages.table import markdown_table

    return markdown_table()


def _names_in(path: Path) -> set[str]:
    """Top-level functions, classes and assigned names of a Python file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def config_walk() -> str:
    """The walk as a numbered list; raises when a step names something its file does not have."""
    lines = []
    for step, (file, name, what) in enumerate(CONFIG_WALK, 1):
        path = ROOT / file
        found = name in _names_in(path) if path.suffix == ".py" else name in path.read_text()
        if not found:
            raise LookupError(f"docs/generate_design.py CONFIG_WALK step {step}: {file} has no {name!r}")
        lines.append(f"{step}. `{file}` `{name.rstrip(':')}`: {what}.")
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """``text`` with every generated block replaced by its current content."""
    content = {"layers": layer_map(), "stages": stage_table(), "walk": config_walk()}
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
