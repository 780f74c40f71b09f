"""The house rules of issue 16, checked on the checkout itself: no source file over 500 lines and no merge conflict
marker in any text file (import layers and circles: tests/test_layering.py)."""

from __future__ import annotations

from pathlib import Path

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
