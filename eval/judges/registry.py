"""The judge registry: one judge per concept, registered by name, built once per process on first use.

``flag`` gets a ``(N, H, W, 3)`` uint8 RGB array (the pixels a PNG of the generation would hold) and returns N
booleans, or ``(booleans, labels)`` where ``labels`` are per-image values (a predicted class, a list of detected
classes) that the attacks tally. For a judge that is slow to build, pass ``factory=`` (a zero-argument callable
returning a :class:`Judge`) instead of ``flag=``; it is called once, when an audit first needs the judge.
``settings`` is recorded in every ``summary.json`` (name, version, weights hash, threshold: whatever makes the
judge's verdicts reproducible). ``generation`` overrides the default audit generation settings
(``GENERATION_DEFAULTS``) for the concept, ``check_model(model)`` may reject a model the judge means nothing on, and
``words`` lists the words that name the concept in a prompt (the attacks strip them for their controls and replace
them by a learned token; default: the concept's name and its preset's one-word forget prompts).

The built-in judges are the other modules of this package, imported (and so registered) at the first lookup.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from erase.utils.errors import UserError

# Generation settings of an audit when neither the judge nor the user sets them: erase.diffusion.generate's protocol defaults.
GENERATION_DEFAULTS = {"num_images": 16, "steps": 50, "guidance": 7.5, "scheduler": "lms", "batch_size": 8}


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
    words: tuple[str, ...] | None = None  # words naming the concept in prompts (None: derived from its preset)


_JUDGES: dict[str, JudgeEntry] = {}
_ALIASES: dict[str, str] = {}
_BUILT: dict[str, Judge] = {}


def register_judge(concept: str | Iterable[str], flag: Callable | None = None, *, factory: Callable[[], Judge] | None = None,
                   settings: dict | None = None, generation: dict | None = None,
                   check_model: Callable[[str], None] | None = None, aliases: Iterable[str] = (),
                   words: Iterable[str] | None = None, replace: bool = False, builtin: bool = False) -> None:
    """Register the judge of one concept (or of each of several): ``flag`` (a callable on images) or ``factory``.

    A concept that already has a judge is an error unless ``replace=True``. ``generation`` keys: num_images,
    steps, guidance, scheduler, batch_size."""
    concepts = [concept] if isinstance(concept, str) else list(concept)
    if (flag is None) == (factory is None):
        raise ValueError("register_judge needs exactly one of flag= (images -> booleans) or factory= (() -> Judge)")
    unknown = set(generation or {}) - set(GENERATION_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown generation setting(s) {sorted(unknown)}; allowed: {', '.join(GENERATION_DEFAULTS)}")
    word_list = None if words is None else tuple(dict.fromkeys(str(w).strip().lower() for w in words if str(w).strip()))
    if word_list is not None and not word_list:
        raise ValueError("words= needs at least one non-empty word")
    for name in concepts:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a judged concept needs a non-empty name, got {name!r}")
        key = name.strip()
        if builtin and (key in _JUDGES or key in _ALIASES):
            continue  # a judge the user registered before the built-ins were loaded wins
        if (key in _JUDGES or key in _ALIASES) and not replace:
            raise ValueError(f"concept {key!r} already has a judge; pass replace=True to swap it")
        if flag is not None:
            build = (lambda key=key: Judge(key, flag, dict(settings or {"name": getattr(flag, "__name__", "custom")})))
        else:
            build = factory
        _JUDGES[key] = JudgeEntry(key, build, dict(generation or {}), check_model, tuple(aliases), builtin, word_list)
        _BUILT.pop(key, None)
        for alias in aliases:
            _ALIASES[alias] = key


def unregister_judge(concept: str) -> None:
    """Remove a concept's judge (and its aliases); unknown names are ignored."""
    entry = _JUDGES.pop(concept, None)
    _BUILT.pop(concept, None)
    for alias in entry.aliases if entry else ():
        _ALIASES.pop(alias, None)


_LOADED = False


def _load_builtin_judges() -> None:
    """Import every module of this package but the registry: each built-in judge registers itself."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"eval.judges.{info.name}")


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
