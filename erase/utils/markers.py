"""Who wrote a folder: this tool's marker (``scissorhands-erase.json``, with the command that wrote it) and the
signs of its older outputs (an ``erase_config.json`` of ours, engine checkpoints). :mod:`erase.utils.folders` decides
with these where a run may write."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

TOOL = "scissorhands-erase"
MARKER_NAME = f"{TOOL}.json"  # visible: a user listing the folder sees who manages it
LOCK_NAME = f".{TOOL}.lock"


def is_ours(folder: Path) -> bool:
    """Whether this tool wrote ``folder``: its marker, an ``erase_config.json`` of ours, or only things of ours."""
    if (folder / MARKER_NAME).is_file():
        return True
    config = folder / "erase_config.json"
    if config.is_file():
        try:
            c = json.loads(config.read_text(encoding="utf-8"))
            if isinstance(c, dict) and "pretrained_model_name_or_path" in c and "method" in c:
                return True
        except (OSError, ValueError):
            pass
    entries = [p for p in folder.iterdir()]
    # what a claim in progress shows another process of the same launch (its preflight): the lock, then the marker
    # being written under its temporary name
    claiming = re.compile(rf"{re.escape(LOCK_NAME)}|\.{re.escape(MARKER_NAME)}\.\d+\.tmp")
    return bool(entries) and all(claiming.fullmatch(p.name) or is_our_checkpoint(p) for p in entries)


# commands that add to another command's folder by design: ``erase.export`` adds formats to an ``erase/sd.py`` export
ADDS_TO = {"erase.export": ("erase/sd.py",)}


def written_by(folder: Path) -> str | None:
    """The command whose marker ``folder`` holds (``written_by``), or None (no marker, or one of an older version)."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    by = marker.get("written_by") if isinstance(marker, dict) else None
    return by if isinstance(by, str) and by else None


def other_command(folder: Path, by: str | None) -> str | None:
    """The other command that wrote ``folder``, where ``by`` may not write into it: its runs would replace that
    command's results (``summary.json``, ``results.json``) with its own. None where ``by`` may."""
    if by in (None, TOOL):  # a claim that names no command: the older rule (any folder of ours)
        return None
    owner = written_by(folder)
    if owner is None and not (folder / MARKER_NAME).is_file() and (folder / "erase_config.json").is_file():
        owner = "erase/sd.py"  # an erased model of an older version: its record, no marker
    if owner in (None, TOOL, by) or owner in ADDS_TO.get(by, ()):  # TOOL: a claim that named no command
        return None
    return owner


def is_our_checkpoint(path: Path) -> bool:
    """A ``checkpoint-N`` folder written by the engine (it holds ``erase_state.json``)."""
    return path.is_dir() and re.fullmatch(r"checkpoint-\d+", path.name) is not None and (path / "erase_state.json").is_file()


def mark_ours(folder: Path, by: str = TOOL) -> None:
    """Write this tool's marker into ``folder`` (which it created or may write into)."""
    if not (folder / MARKER_NAME).exists():
        _write_json(folder / MARKER_NAME, {"tool": TOOL, "written_by": by, "note": "this folder was written by "
                                           "scissorhands-erase; its runs replace only what they wrote here"})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
