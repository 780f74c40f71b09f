"""``checkpoint-{step}`` folders: which are this engine's, which are intact, and whether a run may resume from one.

A checkpoint is the engine's when it holds ``erase_state.json`` (written before the folder is renamed into place);
rotation (``checkpoints_total_limit``) deletes only those. ``erase_state.json`` records what decides the result:
the method and its config, the engine settings, the global batch and the caller's own settings (data, prompts,
base model). A resume compares them with the run's and refuses any difference in one line naming the settings;
``latest`` skips a checkpoint that is not intact (with a warning) and takes the newest intact one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate.logging import get_logger

logger = get_logger(__name__)

STATE_NAME = "erase_state.json"
#: Engine settings that do not change the result (where files go, how often to log or save).
NOT_COMPARED = ("output_dir", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
                "resume_from_checkpoint", "log_every", "progress", "train_batch_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: corrupt, foreign, or made with other settings (one line)."""


def list_checkpoints(output_dir) -> list[Path]:
    """Every ``checkpoint-N`` folder of ``output_dir``, by step."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


#: what a sharded run (FSDP) writes instead of accelerate's model and optimizer files: the targeted tensors and the
#: optimizer state, whole (the untrained weights are the base's)
TARGETS_FILE, OPTIMIZER_FILE = "targets.safetensors", "optimizer.safetensors"
SHARDED_FILES = (TARGETS_FILE, OPTIMIZER_FILE)


def is_ours(path: Path) -> bool:
    return path.is_dir() and (path / STATE_NAME).is_file()


def read_state(path: Path) -> dict:
    """The recorded state of an intact checkpoint; :class:`CheckpointError` saying what is wrong otherwise."""
    path = Path(path)
    if not is_ours(path):
        raise CheckpointError(f"{path} is not a checkpoint of this tool (no {STATE_NAME})")
    try:
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt ({STATE_NAME} unreadable: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("streams"), dict):
        raise CheckpointError(f"{path} is corrupt ({STATE_NAME} lacks its step or stream positions)")
    if f"checkpoint-{state['step']}" != path.name:
        raise CheckpointError(f"{path} is corrupt (its {STATE_NAME} says step {state['step']})")
    models = sorted(path.glob("model*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    sharded = all((path / name).is_file() for name in SHARDED_FILES)  # a sharded run's: the targets and optimizer state
    if not sharded and (not models or not (path / "optimizer.bin").is_file()):
        raise CheckpointError(f"{path} is incomplete (no model weights or optimizer.bin)")
    from safetensors import safe_open

    for f in path.glob("*.safetensors"):
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except Exception as e:  # safetensors raises its own error types for a cut or garbled file
            raise CheckpointError(f"{path} is corrupt ({f.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return state


def resolve_checkpoint(spec: str | None, output_dir) -> Path | None:
    """``latest`` -> the newest intact checkpoint of ``output_dir`` (None when there is none); a path -> that
    checkpoint, which must be intact."""
    if not spec:
        return None
    if spec == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            try:
                read_state(path)
                return path
            except CheckpointError as e:
                logger.warning(f"skipping {e}", main_process_only=True)
        return None
    path = Path(spec)
    if not path.is_dir() or not re.fullmatch(r"checkpoint-\d+", path.name):
        raise CheckpointError(f"checkpoint {spec!r} is not a checkpoint-<step> folder (use 'latest' or a path)")
    read_state(path)
    return path


def record(method, config, world: int, settings: dict | None) -> dict:
    """What a checkpoint records to be compared on resume (JSON-normalised)."""
    from dataclasses import asdict

    engine = {k: v for k, v in asdict(config).items() if k not in NOT_COMPARED}
    data = {"method": method.name, "method_config": asdict(method.config), "engine": engine,
            "global_batch_size": config.train_batch_size * world, "max_train_steps": config.max_train_steps,
            "settings": settings or {}}
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def method_defaults(method) -> dict:
    """The JSON-normalised default of every field of ``method``'s config: what a checkpoint written before a field
    existed ran with (:func:`check_resume`)."""
    from dataclasses import MISSING, fields

    out = {f.name: f.default for f in fields(method.config) if f.default is not MISSING}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def check_resume(state: dict, current: dict, path: Path, max_train_steps: int, defaults: dict | None = None) -> None:
    """Refuse to resume from ``path`` when its recorded settings differ from the run's in anything that
    changes the result (one line naming every such setting), or when the run would end before its step. A method
    option the checkpoint does not record (added since it was written) matches when the run keeps its default
    (``defaults``: :func:`method_defaults`): the older version ran as that default does."""
    step = int(state["step"])
    if max_train_steps < step:
        raise CheckpointError(f"max_train_steps {max_train_steps} is below the step {step} of {path}; "
                              f"give at least {step} or resume from an earlier checkpoint")
    saved = state.get("record")
    if not isinstance(saved, dict):
        logger.warning(f"{path} was written by an older version and does not record its settings; they are not "
                       "checked", main_process_only=True)
        if state.get("method") not in (None, current["method"]):
            raise CheckpointError(f"{path} was made by method {state['method']!r}, this run uses {current['method']!r}")
        return
    diffs = []
    if saved.get("method") != current["method"]:
        diffs.append(f"method {_short(saved.get('method'))} -> {_short(current['method'])}")
    for section in ("engine", "method_config", "settings"):
        a, b = saved.get(section) or {}, current.get(section) or {}
        if section == "method_config" and saved.get("method") != current["method"]:
            continue
        for key in sorted(set(a) | set(b)):
            if section == "method_config" and key not in a and defaults and key in defaults and b.get(key) == defaults[key]:
                continue
            if a.get(key) != b.get(key):
                was, now = (_short(d[key]) if key in d else "(not recorded)" for d in (a, b))
                diffs.append(f"{key} {was} -> {now}")
    if saved.get("global_batch_size") != current["global_batch_size"]:
        diffs.append(f"global batch (train_batch_size x processes) {saved.get('global_batch_size')} -> {current['global_batch_size']}")
    if saved.get("sharding") != current.get("sharding"):  # the checkpoints hold different files
        layout = {None: "data parallel", "fsdp": "FSDP"}
        diffs.append(f"launch {layout.get(saved.get('sharding'))} -> {layout.get(current.get('sharding'))}")
    schedule = current["engine"].get("lr_schedule")
    if schedule != "constant" and saved.get("max_train_steps") != current["max_train_steps"]:
        diffs.append(f"max_train_steps {saved.get('max_train_steps')} -> {current['max_train_steps']} (the {schedule} "
                     "schedule depends on it)")
    if diffs:
        raise CheckpointError(f"{path} was made with other settings (checkpoint -> this run): {'; '.join(diffs)}. "
                              "Resume with the checkpoint's settings, or start in a new output folder")


def rotate(output_dir, limit: int | None) -> list[Path]:
    """Delete the oldest of this engine's checkpoints beyond ``limit``; folders it did not write are never touched."""
    if not limit:
        return []
    ours = [p for p in list_checkpoints(output_dir) if is_ours(p)]
    removed = ours[:-limit]
    for old in removed:
        shutil.rmtree(old)
    return removed
