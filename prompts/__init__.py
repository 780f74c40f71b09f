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
from dataclasses import asdict, dataclass, field
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
