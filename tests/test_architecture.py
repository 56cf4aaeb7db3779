"""The import structure of ``src/safemerge`` (issue 12): no circles, every layer imports only the layers below it
(the leaves only leaves), no private names or private modules across modules, no module loaded by a string outside
the lazy-attribute helper.

Imports inside functions count too: a circle through a function-level import is still a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# the core layers and what each may import (besides itself and the leaf modules below)
LEAVES = {"errors", "_lazy", "progress", "options", "cache"}
CORE = {"engine", "config", "methods", "io"}
ALLOWED = {
    "io": set(),
    "methods": {"io"},
    "config": {"io"},
    "engine": {"config", "methods", "io"},
    "safety": CORE,
}
# the layers above the core and what each may import: the merge API, LoRA extraction, the data, the harness,
# training, synthetic data and the optimizer, then the workflows that combine them (automatic τ/α, repair, the
# demo); "" is the package root (its version)
WORKFLOW_ALLOWED = {
    "api": CORE,
    "extract": CORE | {"safety"},
    "data": set(),
    "testing": set(),
    "evaluate": {"data", "io", ""},
    "train": {"data", "evaluate", "io"},
    "synth": {"evaluate", "io"},
    "optimize": CORE | {"api", "evaluate", "synth", "train"},
    "tuning": CORE | {"safety", "evaluate"},
    "repair": CORE | {"safety", "evaluate", "train", "extract", "tuning"},
    "demo": CORE | {"safety", "evaluate", "train", "extract", "tuning", "repair", "data", "testing"},
}
# the sideways imports issue 12 removed, named so that a regression says what it is
FORBIDDEN = {("train", "tuning"), ("train", "demo"), ("train", "repair"), ("repair", "demo"), ("tuning", "repair"),
             ("tuning", "demo"), ("evaluate", "tuning")}
# the one layer above everything: the command line (and ``python -m safemerge``), which may import any layer
TOP = {"cli", "__main__"}
# private names still imported across modules, each with the reason it stays
PRIVATE_EXCEPTIONS: dict[tuple[str, str], str] = {}
# private modules imported from another package, each with the reason it stays
PRIVATE_MODULE_EXCEPTIONS = {"safemerge._lazy": "the lazy-attribute helper of the package __init__s (a leaf)"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "safemerge").rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _is_private(module: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in module.split("."))


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, str]], list[str]]:
    """Module graph, cross-module private imports (names, and private modules imported from another package), and
    safemerge module names written as strings."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private, by_string = [], []
    for m, p in mods.items():
        pkg = _package(m, p)
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                if not base.startswith("safemerge"):
                    continue
                if base in mods and _is_private(base) and _package(base, mods[base]) != pkg:
                    private.append((m, base, "(private module)"))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                    if target in mods and target != m:
                        graph[m].add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and base != m:
                        private.append((m, base, alias.name))
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods and a.name != m}
                private += [(m, a.name, "(private module)") for a in node.names
                            if a.name in mods and _is_private(a.name) and _package(a.name, mods[a.name]) != pkg]
            elif isinstance(node, ast.Constant) and str(node.value).startswith("safemerge.") and node.value in mods \
                    and p.name != "__init__.py":
                by_string.append(f"{m}: {node.value}")  # a module named in a string (package __init__: lazy attrs)
    return graph, private, by_string


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def structure():
    return _imports(_modules())


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circles(structure):
    graph, _, _ = structure
    assert _cycles(graph) == []


def test_core_layers_import_downward(structure):
    graph, _, _ = structure
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if _area(m) in ALLOWED for t in targets
                    if _area(t) not in ALLOWED[_area(m)] | LEAVES | {_area(m), ""})
    assert upward == []


def test_leaves_import_only_leaves(structure):
    """``errors``, ``options``, ``progress``, ``cache`` and ``_lazy`` sit below every layer: they import no layer."""
    graph, _, _ = structure
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if _area(m) in LEAVES for t in targets
                    if _area(t) not in LEAVES)
    assert upward == []


def test_every_module_has_a_layer():
    """A new package or top-level module is placed in the tables above (and so checked) before it is imported."""
    placed = LEAVES | set(ALLOWED) | set(WORKFLOW_ALLOWED) | TOP | {""}
    assert sorted({_area(m) for m in _modules()} - placed) == []


def test_workflows_import_only_the_layers_below_them(structure):
    """train → evaluate, tuning → safety/evaluate, repair → tuning/train, demo → repair: never sideways or up
    (e.g. the safety LoRA's evaluation comes from ``evaluate.suites``, repair's cache keys from ``cache``)."""
    graph, _, _ = structure
    edges = {(m, t) for m, targets in graph.items() for t in targets}
    sideways = sorted(f"{m} -> {t}" for m, t in edges if (_area(m), _area(t)) in FORBIDDEN)
    assert sideways == []
    outside = sorted(f"{m} -> {t}" for m, t in edges if _area(m) in WORKFLOW_ALLOWED
                     and _area(t) not in WORKFLOW_ALLOWED[_area(m)] | LEAVES | {_area(m)})
    assert outside == []


def test_no_private_names_across_modules(structure):
    """No ``_name`` is imported from another module, and no ``_module`` from another package."""
    _, private, _ = structure
    assert [x for x in private if (x[0], x[2]) not in PRIVATE_EXCEPTIONS and x[1] not in PRIVATE_MODULE_EXCEPTIONS] \
        == []


def test_no_module_loaded_by_string(structure):
    _, _, by_string = structure
    assert by_string == []


def test_no_module_reassigns_its_class() -> None:
    """A package is a plain module: nothing swaps ``sys.modules[...].__class__`` to make it callable (issue 12)."""
    hits = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                hits += [name for t in targets if isinstance(t, ast.Attribute) and t.attr == "__class__"]
    assert not hits, hits
    import types

    import safemerge.evaluate
    from safemerge.evaluate.api import evaluate

    assert type(safemerge.evaluate) is types.ModuleType and safemerge.evaluate.evaluate is evaluate
