"""The layering of the toolkit, read from the source with ``ast`` (nothing is imported):

    prompts/  ->  erase/core/  ->  erase/ (adapters, io, generation, export)  ->  eval/, classify/, benchmarks/

A lower layer never imports a higher one, and no module imports itself back through others (an import circle),
counting every import statement: module level, inside functions and under ``TYPE_CHECKING`` alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prompts", "erase", "eval", "classify", "benchmarks")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (``from a.b import c`` is ``a.b.c`` when that is a
    module, else ``a.b``)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import erase.core.engine.x` style: the longest module prefix
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_graph_is_read():
    # guards against a test that passes because it found nothing
    assert len(MODULES) > 40 and "erase.core.engine" in GRAPH["erase.core"] | GRAPH["erase.core.engine"] | {"erase.core.engine"}
    assert "erase.core.method" in GRAPH["erase.core.engine"]
    assert "erase.utils.errors" in GRAPH["eval.i2p"]


@pytest.mark.parametrize("lower, higher", [
    ("erase", ("eval", "classify", "benchmarks")),
    ("erase.core", ("erase", "eval", "classify", "benchmarks", "prompts")),
    ("prompts", ("erase", "eval", "classify", "benchmarks")),
    ("eval", ("classify", "benchmarks")),
    ("classify", ("eval", "benchmarks")),
])
def test_lower_layers_never_import_higher_ones(lower, higher):
    bad = []
    for name, deps in GRAPH.items():
        if name != lower and not name.startswith(lower + "."):
            continue
        for dep in deps:
            top = dep.split(".")[0]
            if lower == "erase.core" and dep.startswith("erase.core"):
                continue
            if top in higher or (lower == "erase.core" and dep.startswith("erase.") and not dep.startswith("erase.core")):
                bad.append(f"{name} imports {dep}")
    assert not bad, "\n".join(bad)


def test_engine_never_imports_diffusers():
    for name, path in MODULES.items():
        if name.startswith("erase.core"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not any(m.split(".")[0] in ("diffusers", "transformers") for m in names), name


def _cycles() -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "erase.core.method", GRAPH["erase.core.method"] | {"erase.core.engine"})
    assert ["erase.core.engine", "erase.core.method"] in _cycles()
