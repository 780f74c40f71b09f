"""The house rules of issue 16, checked on the checkout itself: no source file over 500 lines, no merge conflict
marker in any text file, and no import circle among the project's modules (module-level imports; a registry that
imports its plug-ins inside a function is allowed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("erase", "eval", "classify", "prompts")
SOURCE_DIRS = PACKAGES + ("benchmarks", "tests", ".ci", "docs")
TEXT_SUFFIXES = {".py", ".md", ".json", ".toml", ".sh", ".txt", ".cfg", ".yaml", ".yml", ".csv", ""}
MAX_LINES = 500
SKIP_PARTS = {"__pycache__", ".git", ".pytest_cache"}


def _files(dirs, suffixes):
    files = [ROOT / name for name in ("README.md", "pyproject.toml", ".gitignore") if (ROOT / name).is_file()]
    for d in dirs:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in suffixes and not SKIP_PARTS & set(p.parts) \
                    and not any(part.endswith(".egg-info") for part in p.parts):
                files.append(p)
    return files


def test_no_source_file_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _files(SOURCE_DIRS, {".py"})
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines (split them by concern): {long}"


def test_no_merge_conflict_markers():
    marked = []
    for p in _files(SOURCE_DIRS, TEXT_SUFFIXES):
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        marked += [f"{p.relative_to(ROOT)}:{i}" for i, line in enumerate(lines, 1) if line.startswith(("<<<<<<< ", ">>>>>>> "))]
    assert not marked, f"merge conflict markers at {marked}"


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports at module level (inside ``if`` / ``try`` blocks too)."""
    mods = _modules()

    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, is_pkg) in mods.items():
        base = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for top in ast.parse(path.read_text(encoding="utf-8")).body:
            nodes = list(ast.walk(top)) if isinstance(top, (ast.If, ast.Try)) else [top]
            for n in nodes:
                if isinstance(n, ast.Import):
                    deps |= {resolve(a.name) for a in n.names if a.name.split(".")[0] in PACKAGES}
                elif isinstance(n, ast.ImportFrom):
                    full = n.module or ""
                    if n.level:
                        b = base
                        for _ in range(n.level - 1):
                            b = b.rpartition(".")[0]
                        full = b + ("." + n.module if n.module else "")
                    if full.split(".")[0] in PACKAGES:
                        deps |= {resolve(f"{full}.{a.name}") if f"{full}.{a.name}" in mods else resolve(full) for a in n.names}
        graph[name] = deps - {None, name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = import_graph()
    assert "erase.diffusion.run" in graph and "erase.core.engine" in graph["erase.diffusion.run"] | {
        d for m in graph["erase.diffusion.run"] for d in graph.get(m, ())}, "the import graph misses the run's engine import"
    assert cycles(graph) == []


@pytest.mark.parametrize("package", ["erase/core"])
def test_engine_never_imports_diffusers(package):
    """erase.core is the model-agnostic engine: torch and accelerate, never diffusers or transformers."""
    offenders = []
    for p in (ROOT / package).rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            offenders += [f"{p.relative_to(ROOT)}: {m}" for m in names if m.split(".")[0] in ("diffusers", "transformers")]
    assert not offenders, offenders
