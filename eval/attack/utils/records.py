"""The records of an attack: the start of a run (``begin``: the model resolved, the judge's check, the prompts,
this process's place), its output folder held for the run, resumable cell files, the learned artefacts beside their
pinned settings (``artefacts.json``, what ``python -m eval.attack --replay`` reads), and library versions."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from erase.utils.errors import UserError
from erase.utils.files import atomic_write_json

logger = logging.getLogger(__name__)

ARTEFACTS = "artefacts.json"
ARTEFACTS_FORMAT = "scissorhands-erase attack artefacts"


@dataclass
class AttackSetup:
    """What every attack starts from: the resolved model, its prompts, this process's place, the output folder."""

    info: object  # models.ModelInfo
    prompts: object  # prompts.ConceptPrompts
    rank: int
    world: int
    is_main: bool
    device: object
    out: Path
    start: float
    cpu_start: float


def begin(cfg, accelerator=None) -> AttackSetup:
    """The checks and settings every attack opens with (cheap: no model is loaded): the judge may refuse the model,
    the prompts are resolved, and the process's rank, device and output folder are fixed."""
    import torch

    from eval.attack.utils.models import resolve_model
    from eval.attack.utils.prompts import concept_prompts

    start, cpu_start = time.perf_counter(), time.process_time()
    entry = cfg.judge_entry
    info = resolve_model(cfg.model)
    if entry.check_model is not None:
        entry.check_model(cfg.model)
    prompts = concept_prompts(cfg.concept, cfg.forget_prompts, cfg.prompts_csv, cfg.limit)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator is not None:
        accelerator.wait_for_everyone()  # no process writes into the folder before the main one holds it
    return AttackSetup(info, prompts, rank, world, rank == 0, device, Path(cfg.output_dir), start, cpu_start)


@contextlib.contextmanager
def hold_attack_folder(cfg, attack: str):
    """The output folder rails of every command (erase.utils.folders), for one attack run: a new, empty or our own
    folder (``--overwrite`` for a foreign one), never the attacked model's or its base's folder, locked for the run
    (a second run on it is refused), one line for a path that cannot be created. Held by the main process only."""
    from erase.utils.folders import hold_output_dir
    from eval.attack.utils.models import check_family, check_unet_file, resolve_model
    from eval.judges.registry import judge_entry

    info = resolve_model(cfg.model)  # inputs before outputs: a bad one leaves nothing behind
    check_unet_file(info)
    if getattr(cfg, "scheduler", None):
        check_family(info, cfg.scheduler)  # a sampler that cannot draw the family (lms on Flux) is one line
    entry = judge_entry(cfg.concept)
    if entry.check_model is not None:
        entry.check_model(cfg.model)
    if hasattr(cfg, "forget_prompts"):
        from eval.attack.utils.prompts import concept_prompts

        prompts = concept_prompts(cfg.concept, cfg.forget_prompts, cfg.prompts_csv, cfg.limit)
        if getattr(cfg, "target_images", None):
            from erase.diffusion.data import folder_split

            folder_split("target", cfg.target_images, prompts.forget[0])  # a folder with no image is refused here
    if Path(info.model).is_dir() and info.model != info.base:  # not in the attacked export either
        folder, model = Path(cfg.output_dir).expanduser().resolve(), Path(info.model).resolve()
        if folder == model or model in folder.parents or folder in model.parents:
            raise UserError(f"--output_dir {cfg.output_dir} {'is' if folder == model else 'lies inside' if model in folder.parents else 'holds'} "
                            f"the attacked model's folder {model}; choose a folder outside it")
    with hold_output_dir(cfg.output_dir, base=info.base, overwrite=cfg.overwrite, by=f"eval.attack {attack}") as claim:
        if claim is not None:  # an earlier run's summary goes until this one writes its own: a killed run leaves none
            (claim.path / "summary.json").unlink(missing_ok=True)
        yield claim


def prepare_cells(folder: Path, is_main: bool) -> None:
    """Create a cell folder (main process) and remove what a process killed mid-write left in it."""
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def read_cell(path: Path, key: str) -> dict | None:
    """A finished cell written with the same settings key, else None (a cell from other settings is redone)."""
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(cell, dict) or cell.get("key") != key:
        logger.warning("%s was computed with other settings; recomputing it", path)
        return None
    return cell


def write_artefacts(out: Path, manifest: dict) -> None:
    """``out/artefacts.json``: what the attack learned (files relative to ``out``) and the settings it was learned
    and checked with, so the artefacts can be applied to another model (``python -m eval.attack --replay``)."""
    atomic_write_json(out / ARTEFACTS, {"format": ARTEFACTS_FORMAT, "version": 1, **manifest})


def read_artefacts(folder) -> dict:
    """The artefact manifest of an attack output folder; anything else is one line."""
    path = Path(folder) / ARTEFACTS
    if not Path(folder).is_dir():
        raise UserError(f"--replay {folder}: no such folder")
    if not path.is_file():
        raise UserError(f"--replay {folder} is not an attack output (no {ARTEFACTS}; relearn keeps no artefacts, "
                        "inversion and unlearndiffatk write one)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--replay {folder}: {ARTEFACTS} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTEFACTS_FORMAT:
        raise UserError(f"--replay {folder}: {ARTEFACTS} is not an attack artefact manifest of this tool")
    return manifest


def versions() -> dict:
    import numpy
    import tqdm
    import transformers

    from erase.export.folder import versions as library_versions

    return {**library_versions(), "numpy": numpy.__version__, "tqdm": tqdm.__version__,
            "transformers": transformers.__version__}  # the tokenizer and text encoder come from it
