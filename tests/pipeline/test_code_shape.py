"""The code stays readable: no module over 500 lines and no function over 60 lines in penni/ and pipeline/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
SOURCES = sorted(p for package in ("penni", "pipeline") for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_functions_are_short(path: Path) -> None:
    source = path.read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concept"
    long = [f"{node.name} (line {node.lineno}, {node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_penni_imports_no_ray_or_mlflow() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "penni").rglob("*.py")
                 if any(isinstance(n, (ast.Import, ast.ImportFrom)) and _imports(n, ("ray", "mlflow"))
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert not offenders, f"penni/ must stay pure PyTorch; these import ray or mlflow: {offenders}"


def _imports(node: ast.AST, names: tuple[str, ...]) -> bool:
    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return any(m.split(".")[0] in names for m in modules)
