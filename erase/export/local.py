"""What an export shares and what stays on this machine: no absolute local path in a file meant to be shared.

A user shares an export folder (a LoRA on a model hub, the single file in a UI's folder, the whole folder). Its
``erase_config.json``, its model card and every safetensors file's metadata therefore name the base model by its hub id
or its folder name, and every other path by its last component (``forget_prompts: "forget.txt"``,
``output_dir: "nudity-erased"``). The full paths go to ``erase_local.json`` beside them, the local record: loaders on
this machine read it (:func:`read_record`) to find a local base again; a copy of the folder elsewhere loads a hub
base without it, and leaving it out when sharing leaks nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from erase.utils.errors import UserError

CONFIG_NAME = "erase_config.json"
LOCAL_NAME = "erase_local.json"
LOCAL_NOTE = ("paths on the machine that wrote this export (the base model, the inputs, the output folder); loaders "
              "here read them back. Nothing else needs this file: leave it out when you share the folder")


def _local_path(value: str) -> bool:
    """An absolute path that exists on this machine (not a hub id, a name, or a prompt that starts with "/")."""
    if "\n" in value or not os.path.isabs(value) or Path(value) == Path(Path(value).anchor):
        return False
    try:
        return Path(value).exists()
    except (OSError, ValueError):
        return False


def split_paths(config: dict) -> tuple[dict, dict[str, str]]:
    """(the config to share, {dotted key: absolute path}): every string that is an absolute local path becomes its last
    component in the shared copy."""
    paths: dict[str, str] = {}

    def walk(value, key: str):
        if isinstance(value, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and _local_path(value):
            paths[key] = value
            return Path(value).name or value
        return value

    return walk(config, ""), paths


def shared(config: dict) -> dict:
    """``config`` without local paths (for the model card and the safetensors metadata)."""
    return split_paths(config)[0]


def write_record(folder: Path, config: dict, write_json) -> None:
    """``erase_config.json`` (shared) and, when the config holds local paths, ``erase_local.json`` (the local record)."""
    public, paths = split_paths(config)
    if paths:
        write_json(folder / LOCAL_NAME, {"note": LOCAL_NOTE, "paths": paths})
    write_json(folder / CONFIG_NAME, public)


def _put(config: dict, key: str, value: str) -> None:
    """Set the dotted ``key`` (``a.b[2].c``) of ``config`` to ``value`` where it exists; unknown keys are ignored."""
    node, parts = config, key.replace("[", ".[").split(".")
    for i, part in enumerate(parts):
        index = int(part[1:-1]) if part.startswith("[") and part.endswith("]") and part[1:-1].isdigit() else None
        last = i == len(parts) - 1
        if index is not None and isinstance(node, list) and index < len(node):
            if last:
                node[index] = value
            node = node[index]
        elif index is None and isinstance(node, dict) and part in node:
            if last:
                node[part] = value
            node = node[part]
        else:
            return


def check_export_folder(folder) -> Path:
    """The export folder as a path, or one line saying what ``folder`` is instead (empty, missing, a file, a folder
    without the record)."""
    if not str(folder).strip():
        raise UserError("the export folder path is empty (''); give a folder written by erase/sd.py or erase_concept (it holds erase_config.json)")
    out = Path(folder).expanduser()
    if not out.exists():
        raise UserError(f"export folder {str(folder)!r} does not exist; give a folder written by erase/sd.py or erase_concept")
    if not out.is_dir():
        raise UserError(f"export folder {str(folder)!r} is a file, not a folder; give a folder written by erase/sd.py or erase_concept")
    if not (out / CONFIG_NAME).is_file():
        raise UserError(f"{str(folder)!r} has no {CONFIG_NAME}: not a folder written by erase/sd.py or erase_concept")
    return out


def read_record(folder) -> dict:
    """``erase_config.json`` of an export with the local record's paths put back (where the record is present and
    readable); one :class:`UserError` line when the config is missing or not JSON."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"erase config not found: {path}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"erase config is not valid JSON: {path} ({str(e).splitlines()[0]})") from None
    try:
        local = json.loads((folder / LOCAL_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return config
    paths = local.get("paths") if isinstance(local, dict) else None
    if isinstance(config, dict) and isinstance(paths, dict):
        for key, value in paths.items():
            if isinstance(key, str) and isinstance(value, str):
                _put(config, key, value)
    return config
