"""Attacks and judges, registered by name.

An **attack** is one module in ``eval/attack/`` that registers a run function with its config dataclass::

    @register_attack("relearn", RelearnConfig, help="fine-tune the attacked UNet on images of the concept")
    def run_relearn(config, accelerator=None) -> dict: ...

Every module of the package that is not infrastructure (``INFRASTRUCTURE``) is imported on first use, so a new
attack is one new file. The CLI (``python -m eval.attack``) is generated from the config dataclass.

A **judge** says, for a batch of generated images, which ones show the concept. One per concept::

    from eval.attack import register_judge

    register_judge("cat", flag=lambda images: my_cat_classifier(images) > 0.5,
                   settings={"name": "my-cat-classifier", "version": "1", "threshold": 0.5})

``flag`` gets a ``(N, H, W, 3)`` uint8 RGB array (the pixels a PNG of the generation would hold) and returns N
booleans, or ``(booleans, labels)`` where ``labels`` are per-image values (a predicted class, a list of detected
classes) that the attacks tally. For a judge that is slow to build, pass ``factory=`` (a zero-argument callable
returning a :class:`Judge`) instead of ``flag=``; it is called once, when an audit first needs the judge.
``settings`` is recorded in every ``summary.json`` (name, version, weights hash, threshold: whatever makes the
judge's verdicts reproducible). ``generation`` overrides the default audit generation settings
(``GENERATION_DEFAULTS``) for the concept, ``check_model(model)`` may reject a model the judge means nothing on.
Built-in judges (``eval/attack/judges.py``): the digits CNN for zero..nine, NudeNet for nudity.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from erase.utils.errors import UserError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Modules of eval/attack/ that hold machinery, not an attack.
INFRASTRUCTURE = ("registry", "context", "judges")

# Generation settings of an audit when neither the judge nor the user sets them: erase.diffusion.generate's protocol defaults.
GENERATION_DEFAULTS = {"num_images": 16, "steps": 50, "guidance": 7.5, "scheduler": "lms", "batch_size": 8}


# ----------------------------------------------------------------------------------------------- attacks
@dataclass(frozen=True)
class Attack:
    name: str
    config_cls: type
    run: Callable  # run(config, accelerator=None) -> summary dict (None on non-main processes)
    help: str = ""


_ATTACKS: dict[str, Attack] = {}


def register_attack(name: str, config_cls: type, help: str = ""):
    """Decorator registering ``run(config, accelerator=None)`` as attack ``name``; malformed or duplicate names fail."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"attack names are lower snake case, got {name!r}")
    if not dataclasses.is_dataclass(config_cls):
        raise ValueError(f"attack {name!r} needs a dataclass config, got {config_cls!r}")

    def wrap(run):
        if name in _ATTACKS and _ATTACKS[name].run is not run:
            raise ValueError(f"attack {name!r} is registered twice ({_ATTACKS[name].run.__module__} and {run.__module__})")
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


# ----------------------------------------------------------------------------------------------- judges
@dataclass
class Judge:
    """A built judge: ``judge(images) -> (flags, labels)``; ``settings`` is recorded with every result."""

    concept: str
    flag: Callable
    settings: dict = field(default_factory=dict)

    def __call__(self, images) -> tuple[list[bool], list | None]:
        out = self.flag(images)
        flags, labels = out if isinstance(out, tuple) else (out, None)
        flags = [bool(f) for f in flags]
        if len(flags) != len(images):
            raise ValueError(f"judge of {self.concept!r} returned {len(flags)} verdicts for {len(images)} images")
        if labels is not None:
            labels = [_plain(x) for x in labels]
        return flags, labels


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    return value


@dataclass
class JudgeEntry:
    concept: str
    factory: Callable[[], Judge]
    generation: dict = field(default_factory=dict)
    check_model: Callable[[str], None] | None = None
    aliases: tuple[str, ...] = ()
    builtin: bool = False


_JUDGES: dict[str, JudgeEntry] = {}
_ALIASES: dict[str, str] = {}
_BUILT: dict[str, Judge] = {}


def register_judge(concept: str | Iterable[str], flag: Callable | None = None, *, factory: Callable[[], Judge] | None = None,
                   settings: dict | None = None, generation: dict | None = None,
                   check_model: Callable[[str], None] | None = None, aliases: Iterable[str] = (),
                   replace: bool = False, builtin: bool = False) -> None:
    """Register the judge of one concept (or of each of several): ``flag`` (a callable on images) or ``factory``.

    A concept that already has a judge is an error unless ``replace=True``. ``generation`` keys: num_images,
    steps, guidance, scheduler, batch_size."""
    concepts = [concept] if isinstance(concept, str) else list(concept)
    if (flag is None) == (factory is None):
        raise ValueError("register_judge needs exactly one of flag= (images -> booleans) or factory= (() -> Judge)")
    unknown = set(generation or {}) - set(GENERATION_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown generation setting(s) {sorted(unknown)}; allowed: {', '.join(GENERATION_DEFAULTS)}")
    for name in concepts:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a judged concept needs a non-empty name, got {name!r}")
        key = name.strip()
        if (key in _JUDGES or key in _ALIASES) and not replace:
            raise ValueError(f"concept {key!r} already has a judge; pass replace=True to swap it")
        if flag is not None:
            build = (lambda key=key: Judge(key, flag, dict(settings or {"name": getattr(flag, "__name__", "custom")})))
        else:
            build = factory
        _JUDGES[key] = JudgeEntry(key, build, dict(generation or {}), check_model, tuple(aliases), builtin)
        _BUILT.pop(key, None)
        for alias in aliases:
            _ALIASES[alias] = key


def unregister_judge(concept: str) -> None:
    """Remove a concept's judge (and its aliases); unknown names are ignored."""
    entry = _JUDGES.pop(concept, None)
    _BUILT.pop(concept, None)
    for alias in entry.aliases if entry else ():
        _ALIASES.pop(alias, None)


def _load_builtin_judges() -> None:
    importlib.import_module("eval.attack.judges")


def judged_concepts() -> list[str]:
    _load_builtin_judges()
    return sorted(_JUDGES)


def judge_entry(concept: str) -> JudgeEntry:
    """The registry entry of a concept (or of an alias such as "3"); a concept with no judge is a ``UserError``."""
    names = judged_concepts()
    key = _ALIASES.get(str(concept).strip(), str(concept).strip())
    if key not in _JUDGES:
        raise UserError(f"no judge for concept {concept!r}; judged concepts: {', '.join(names)} "
                        "(register one with eval.attack.register_judge)")
    return _JUDGES[key]


def load_judge(concept: str) -> Judge:
    """The built judge of a concept, built once per process."""
    entry = judge_entry(concept)
    if entry.concept not in _BUILT:
        judge = entry.factory()
        if not isinstance(judge, Judge):
            raise TypeError(f"the judge factory of {entry.concept!r} returned {type(judge).__name__}, not a Judge")
        _BUILT[entry.concept] = judge
    return _BUILT[entry.concept]
