"""Concept presets: the prompts that name a concept, generate it, anchor it, and what to retain.

A preset is one JSON file in ``prompts/presets/<name>.json``::

    {"name": "nudity", "description": "...", "category": "nsfw|style|object|place|digit",
     "forget_prompts": [...],      # text conditions the concept is erased from (c_forget)
     "generation_prompts": [...],  # prompts the base model draws the forget images from
     "anchor_prompt": "...",       # what a forget prompt is redirected to
     "retain_prompts": [...]}      # prompts whose generations must stay as they were

``generation_prompts`` defaults to ``forget_prompts`` when absent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class Concept:
    name: str
    forget_prompts: list[str]
    anchor_prompt: str = ""
    retain_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    description: str = ""
    category: str = "custom"

    def __post_init__(self):
        self.forget_prompts = _clean(self.forget_prompts)
        self.retain_prompts = _clean(self.retain_prompts)
        self.generation_prompts = _clean(self.generation_prompts) or list(self.forget_prompts)
        if not self.forget_prompts:
            raise ValueError(f"concept {self.name!r} has no forget prompts")

    def to_dict(self) -> dict:
        return asdict(self)


def _clean(prompts) -> list[str]:
    return [p.strip() for p in (prompts or []) if isinstance(p, str) and p.strip()]


def list_concepts() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_concept(name: str) -> Concept:
    """Load a shipped preset by name; an unknown name raises ``KeyError`` listing the presets."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown concept {name!r}; presets: {', '.join(list_concepts())}")
    data = json.loads(path.read_text())
    data.setdefault("name", name)
    return Concept(**data)


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line of UTF-8 text (blank lines and ``#`` comments skipped); an empty or non-UTF-8 file
    raises ``ValueError``. Prompts longer than the text encoder's window (77 tokens for SD) are cut by its tokenizer."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"prompt file {str(path)!r} is a folder; give a text file with one prompt per line")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start}); "
                         "save it as UTF-8") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts (one per line expected)")
    return prompts


def is_concept_file(name: str) -> bool:
    """Whether a ``--concept`` entry names a concept file (``*.json``) rather than a preset or a free-form name."""
    return name.strip().lower().endswith(".json")


def check_concept_name(name) -> str:
    """A concept name from a file: it names data folders (``data/concept-<j>-<name>``), so it must be a plain name."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"concept name {name!r} must be a non-empty string")
    name = name.strip()
    bad = next((ch for ch in name if ch in '/\\:*?"<>|,' or ord(ch) < 32), None)
    if bad is not None or name.startswith(".") or len(name) > 100:
        why = f"it holds {bad!r}" if bad is not None else "it starts with '.'" if name.startswith(".") else "it is over 100 characters"
        raise ValueError(f"concept name {name!r} is not allowed ({why}); use letters, digits, spaces, '-', '_' or '.', "
                         "at most 100 characters, no leading '.'")
    return name


def load_concept_file(path: str | Path) -> list[Concept]:
    """Concepts from a JSON file: one preset object or a list of them, with the fields of ``prompts/presets/*.json``
    (``name`` and ``forget_prompts`` required in a list; a single object's name defaults to the file's stem). Every
    mistake raises ``ValueError`` (``FileNotFoundError`` for a missing file) naming the file, the entry and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise ValueError(f"concept file {str(path)!r} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"concept file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    single = isinstance(data, dict)
    entries = [data] if single else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"concept file {str(path)!r} must hold one concept object or a non-empty list of them, "
                         f"got {type(data).__name__}" + (" (empty)" if isinstance(data, list) else ""))
    allowed = [f.name for f in fields(Concept)]
    concepts = []
    for i, entry in enumerate(entries):
        where = f"concept file {str(path)!r}, entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}; each concept is an object with {', '.join(allowed)}")
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise ValueError(f"{where} has an unknown field {unknown[0]!r}; allowed: {', '.join(allowed)}")
        entry = dict(entry)
        if single:
            entry.setdefault("name", path.stem)
        if "name" not in entry:
            raise ValueError(f"{where} has no 'name'")
        try:
            entry["name"] = check_concept_name(entry["name"])
            for key in ("forget_prompts", "retain_prompts", "generation_prompts"):
                value = entry.get(key, [])
                if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                    raise ValueError(f"{key!r} must be a list of strings")
            for key in ("anchor_prompt", "description", "category"):
                if not isinstance(entry.get(key, ""), str):
                    raise ValueError(f"{key!r} must be a string")
            concepts.append(Concept(**entry))
        except ValueError as e:
            raise ValueError(f"{where} ({entry.get('name')!r}): {e}") from None
    return concepts


def custom_concept(name: str, forget_prompts, anchor_prompt: str = "", retain_prompts=None) -> Concept:
    """A free-form concept (``--concept "X" --forget_prompts FILE --anchor_prompt ...``)."""
    return Concept(name=name, forget_prompts=list(forget_prompts), anchor_prompt=anchor_prompt,
                   retain_prompts=list(retain_prompts or []), category="custom")


@dataclass
class ConceptSet:
    """Several concepts erased in one run (``--concept three,five,eight``): each keeps its own forget prompts
    and anchor; the retain prompts are the union of theirs minus any prompt that names an erased concept."""

    concepts: list[Concept]
    retain_prompts: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ",".join(c.name for c in self.concepts)

    def __len__(self) -> int:
        return len(self.concepts)

    def forget_prompt_set(self) -> set[str]:
        return {p for c in self.concepts for p in c.forget_prompts + c.generation_prompts}

    def to_dict(self) -> dict:
        return {"concepts": [c.to_dict() for c in self.concepts], "retain_prompts": list(self.retain_prompts)}


def concept_set(concepts: list[Concept], retain_prompts: list[str] | None = None) -> ConceptSet:
    """Combine concepts; ``retain_prompts`` overrides the union of theirs. Raises ``ValueError`` when two
    concepts share a name or one's anchor prompt is another's forget prompt (it would redirect to an erased concept)."""
    names = [c.name for c in concepts]
    if not concepts:
        raise ValueError("no concept given")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"concept {dup[0]!r} is listed twice")
    erased = {p for c in concepts for p in c.forget_prompts + c.generation_prompts}
    for c in concepts:
        if c.anchor_prompt and c.anchor_prompt in erased:
            other = next(o.name for o in concepts if c.anchor_prompt in o.forget_prompts + o.generation_prompts)
            raise ValueError(f"the anchor prompt {c.anchor_prompt!r} of concept {c.name!r} names the erased concept "
                             f"{other!r}; give another --anchor_prompt")
    if retain_prompts is None:
        seen: dict[str, None] = {}
        for c in concepts:
            for p in c.retain_prompts:
                if p not in erased:
                    seen.setdefault(p, None)
        retain_prompts = list(seen)
    return ConceptSet(list(concepts), list(retain_prompts))
