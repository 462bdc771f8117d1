"""The architecture holds: no import cycle in penni/ or pipeline/, no import up the layers of docs/layers.py (the
table docs/DESIGN.md shows), at most 8 modules at pipeline/'s top level, and one home per symbol.

Imports are read from the source (module level, inside functions and under ``TYPE_CHECKING`` alike), so the check
sees lazy imports too. Importing ``a.b.c`` from outside package ``a.b`` also runs ``a/b/__init__.py``: that is an
edge to the package as well.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("penni", "pipeline")


def _load_layers():
    spec = importlib.util.spec_from_file_location("penni_docs_layers", ROOT / "docs" / "layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LAYERS = _load_layers()


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _targets(module: str, node: ast.AST) -> set[str]:
    """The project modules an import statement in ``module`` runs."""
    if isinstance(node, ast.Import):
        named = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = _package_of(module).split(".")
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([node.module] if node.module else []))
        named = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = set()
    for name in named:
        if name.split(".")[0] not in PACKAGES:
            continue
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages on the way run their __init__
            prefix = ".".join(parts[:i])
            if prefix in MODULES and not (module == prefix or module.startswith(prefix + ".")):
                out.add(prefix)
        out.add(name)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= _targets(module, node)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles (break each at its cause): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_goes_up_the_layers():
    up = []
    for module, targets in import_graph().items():
        mine = LAYERS.layer_of(module)
        for target in sorted(targets):
            theirs = LAYERS.layer_of(target)
            if theirs > mine:
                up.append(f"{module} ({LAYERS.LAYERS[mine][0]}) imports {target} ({LAYERS.LAYERS[theirs][0]})")
    assert not up, "imports that go up the layers of docs/layers.py:\n" + "\n".join(up)


def test_pipeline_top_level_is_small():
    top = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert len(top) <= 8, f"pipeline/ has {len(top)} top-level modules ({', '.join(top)}): put them in a subpackage"


def _top_level_names(tree: ast.Module) -> tuple[set[str], dict[str, int], list[str]]:
    """(names defined, names imported from project modules with their line, names in __all__)."""
    defined, imported, exported = set(), {}, []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            defined |= names
            if "__all__" in names and isinstance(node.value, (ast.List, ast.Tuple)):
                exported += [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
            for a in node.names:
                imported[a.asname or a.name] = node.lineno
    return defined, imported, exported


def test_one_home_per_symbol():
    """Only a package ``__init__`` re-exports: elsewhere ``__all__`` names only what the module defines, and every
    name a module imports from the project is used there (an unused one would be a re-export shim)."""
    problems = []
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        defined, imported, exported = _top_level_names(tree)
        problems += [f"{module}: __all__ lists {name}, which it does not define" for name in exported
                     if name not in defined]
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        text = path.read_text()
        problems += [f"{module}:{line}: imports {name} without using it (a re-export?)"
                     for name, line in imported.items() if name not in used and f'"{name}"' not in text]
    assert not problems, "\n".join(problems)


def test_every_module_is_in_a_layer():
    missing = []
    for module in MODULES:
        try:
            LAYERS.layer_of(module)
        except LookupError as err:
            missing.append(str(err))
    assert not missing, "\n".join(missing)


def test_no_package_name_shadows_a_module():
    """``penni.prune`` is the function, and there is no module ``penni.prune`` it would hide."""
    shadows = []
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        defined, imported, exported = _top_level_names(ast.parse(path.read_text()))
        names = defined | set(imported) | set(exported)
        shadows += [f"{module}.{name}" for name in sorted(names)
                    if f"{module}.{name}" in MODULES and not _is_module_import(path, name)]
    assert not shadows, "package names that hide a submodule of the same name: " + ", ".join(shadows)


def _is_module_import(init: Path, name: str) -> bool:
    """``from . import name`` binds the submodule itself: no shadowing."""
    return any(isinstance(n, ast.ImportFrom) and n.level == 1 and not n.module and any(a.name == name for a in n.names)
               for n in ast.walk(ast.parse(init.read_text())))
