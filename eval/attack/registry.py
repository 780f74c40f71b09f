"""Attacks and judges, registered by name.

An **attack** is one module in ``eval/attack/`` that registers a run function with its config dataclass::

    @register_attack("relearn", RelearnConfig, help="fine-tune the attacked UNet on images of the concept")
    def run_relearn(config, accelerator=None) -> dict: ...

Every module of the package that is not infrastructure (``INFRASTRUCTURE``; the shared pieces live in the
``utils/`` subpackage) is imported on first use, so a new attack is one new file. The CLI (``python -m eval.attack``) is generated from the config dataclass.

A **judge** says, for a batch of generated images, which ones show the concept: one per concept, registered with
``register_judge`` (``eval/judges/``: the registry and one file per built-in judge; the names are re-exported here
so ``eval.attack.register_judge`` keeps working).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from erase.utils.errors import UserError
# The judge registry lives in eval/judges (one file per built-in judge); its names stay importable from here.
from eval.judges.registry import (  # noqa: F401
    GENERATION_DEFAULTS,
    Judge,
    JudgeEntry,
    judge_entry,
    judged_concepts,
    load_judge,
    register_judge,
    unregister_judge,
)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Modules of eval/attack/ that hold machinery, not an attack.
INFRASTRUCTURE = ("registry", "context", "replay", "utils")


# ----------------------------------------------------------------------------------------------- attacks
@dataclass(frozen=True)
class Attack:
    name: str
    config_cls: type
    fn: Callable  # fn(config, accelerator=None) -> summary dict (None on non-main processes)
    help: str = ""

    def run(self, config, accelerator=None):
        """The attack on ``config`` inside its output folder's rails (claimed, locked, released at the end)."""
        from eval.attack.utils.records import hold_attack_folder

        if not isinstance(config, self.config_cls):
            raise TypeError(f"attack {self.name} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        with hold_attack_folder(config, self.name):
            return self.fn(config, accelerator=accelerator)


_ATTACKS: dict[str, Attack] = {}


def register_attack(name: str, config_cls: type, help: str = ""):
    """Decorator registering ``run(config, accelerator=None)`` as attack ``name``; malformed or duplicate names fail."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"attack names are lower snake case, got {name!r}")
    if not dataclasses.is_dataclass(config_cls):
        raise ValueError(f"attack {name!r} needs a dataclass config, got {config_cls!r}")

    def wrap(run):
        if name in _ATTACKS and _ATTACKS[name].fn is not run:
            raise ValueError(f"attack {name!r} is registered twice ({_ATTACKS[name].fn.__module__} and {run.__module__})")
        _ATTACKS[name] = Attack(name, config_cls, run, help)
        return run

    return wrap


def _load_attacks() -> None:
    package = __name__.rpartition(".")[0]  # the modules beside this one, without importing the package back
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def available_attacks() -> list[str]:
    _load_attacks()
    return sorted(_ATTACKS)


def get_attack(name: str) -> Attack:
    names = available_attacks()
    if name not in names:
        raise UserError(f"unknown attack {name!r}; choose one of: {', '.join(names)}")
    return _ATTACKS[name]


def run_audit(name: str, model: str, concept: str, output_dir, accelerator=None, **options) -> dict | None:
    """Attack ``name`` in-process (what ``python -m eval.attack --attack NAME`` runs); ``options`` are its config's
    fields, an unknown one is one line naming the known ones."""
    attack = get_attack(name)
    known = {f.name for f in dataclasses.fields(attack.config_cls)} - {"model", "concept", "output_dir"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown {name} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = attack.config_cls(model=str(model), concept=concept, output_dir=str(output_dir), **options)
    return attack.run(cfg, accelerator=accelerator)
