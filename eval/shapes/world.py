"""The shapes world: what a scene is, how it is sampled, and how it is captioned.

A scene is one to three objects on a plain background. Each object has a shape (14, in look-alike pairs), a colour
(11, in neighbour groups) and a texture (5). Kinds of scene:

* ``single``: one object in the middle, any texture;
* ``count``: one, two or three copies of one solid object ("two red stars");
* ``pair``: two objects of different shapes and colours, side by side (left / right) or stacked (top / bottom),
  captioned with their relation ("a red star left of a blue circle") or with "and" (either arrangement).

Objects are listed in **slot order** (``SLOTS[layout]``): left then right, top then bottom, and for three objects
top-left, top-right, bottom. That list is the scene's ground truth; :mod:`eval.shapes.render` draws exactly it.

Captions name every object's shape and colour, a texture unless it is solid, and sometimes the background. Each
kind has training phrasings (the model is trained on them, erasure prompts use them) and held-out phrasings that
combine the same words differently and are never used in training or erasure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "oval", "square", "diamond", "triangle", "arrow", "star", "flower", "heart", "spade",
          "pentagon", "house", "cross", "moon")
PLURALS = {s: s + ("es" if s.endswith(("s", "x")) else "s") for s in SHAPES}
COLOURS = ("red", "orange", "yellow", "pink", "purple", "blue", "teal", "green", "brown", "white", "black")
TEXTURES = ("solid", "striped", "dotted", "checkered", "outlined")
BACKGROUNDS = ("white", "black", "grey")
NUMBERS = ("one", "two", "three")

# Look-alikes: what an erasure of the key is most likely to damage (EraseBench's "visually similar" concepts).
NEIGHBOURS = {
    "circle": ("oval", "moon"), "oval": ("circle",), "square": ("diamond",), "diamond": ("square",),
    "triangle": ("arrow",), "arrow": ("triangle",), "star": ("flower", "cross"), "flower": ("star",),
    "heart": ("spade",), "spade": ("heart",), "pentagon": ("house",), "house": ("pentagon",), "cross": ("star",),
    "moon": ("circle",),
    "red": ("orange", "pink"), "orange": ("red", "yellow", "brown"), "yellow": ("orange",), "pink": ("red", "purple"),
    "purple": ("pink", "blue"), "blue": ("teal", "purple"), "teal": ("blue", "green"), "green": ("teal",),
    "brown": ("orange", "red"), "white": ("yellow",), "black": ("brown",),
    "striped": ("checkered",), "checkered": ("striped", "dotted"), "dotted": ("checkered",), "outlined": ("solid",),
    "solid": ("outlined",),
}
KINDS = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES}
# Colours an object may not have on a background: it would not be visible.
HIDDEN_ON = {"white": ("white",), "black": ("black",), "grey": ()}

LAYOUTS = ("one", "h2", "v2", "three")
SLOTS = {"one": ("centre",), "h2": ("left", "right"), "v2": ("top", "bottom"), "three": ("top-left", "top-right", "bottom")}
LAYOUT_COUNT = {"one": 1, "h2": 2, "v2": 2, "three": 3}
RELATIONS = ("left of", "right of", "above", "below", "and")

# Phrasings. {a} / {b}: an object with its article ("a red striped star"); {n} {p}: a number and a plural
# ("two red stars"); {r}: a relation; {bg}: a background; {ac} / {pc}: the same without the colour ("a striped
# star", "two stars": any colour; anchors use them).
TRAIN_TEMPLATES = {
    "single": ("{a}", "{a} on a {bg} background", "a picture of {a}", "a drawing of {a}", "{ac}"),
    "count": ("{n} {p}", "an image of {n} {p}", "{n} {p} on a {bg} background", "{n} {pc}"),
    "pair": ("{a} {r} {b}", "{a} {r} {b} on a {bg} background", "an image of {a} {r} {b}"),
}
HELDOUT_TEMPLATES = {
    "single": ("an image of {a}", "a drawing of {a} on a {bg} background"),
    "count": ("a picture of {n} {p}",),
    "pair": ("a picture of {a} {r} {b}", "a drawing of {a} {r} {b}"),
}
# How a relation is worded in training ("left of" and "to the left of" mean the same); held-out: the short form.
RELATION_WORDS = {"left of": ("left of", "to the left of"), "right of": ("right of", "to the right of"),
                  "above": ("above",), "below": ("below",), "and": ("and",)}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    texture: str = "solid"

    def phrase(self, article: bool = True, colour: bool = True) -> str:
        """"a red striped star" (no texture word when solid; ``colour=False``: "a striped star")."""
        words = ([self.colour] if colour else []) + ([] if self.texture == "solid" else [self.texture]) + [self.shape]
        text = " ".join(words)
        return (("an " if text[0] in "aeiou" else "a ") + text) if article else text

    def has(self, value: str) -> bool:
        """Whether the object shows ``value``: a shape, colour or texture, or a compound "red star" (both at once)."""
        if " " in value:
            colour, shape = compound_parts(value)
            return self.colour == colour and self.shape == shape
        return value in (self.shape, self.colour, self.texture)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image: objects in slot order, their layout, background, how it is captioned."""

    kind: str  # single | count | pair
    layout: str  # one | h2 | v2 | three
    objects: tuple[Obj, ...]
    background: str
    relation: str | None = None  # pair scenes: the relation of the caption, read first object -> second
    first: int = 0  # pair scenes: slot of the object the caption names first
    seed: int = 0  # seed of the geometry (jitter, sizes)

    @property
    def count(self) -> int:
        return len(self.objects)

    def has(self, value: str) -> bool:
        return any(o.has(value) for o in self.objects)


# ----------------------------------------------------------------------------------------------- concepts
def compound_parts(name: str) -> tuple[str, str]:
    """``"red star"`` -> ("red", "star"); anything else raises ``ValueError``."""
    words = name.split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        raise ValueError(f"unknown concept {name!r}; a compound concept is a colour and a shape (\"red star\")")
    return words[0], words[1]


def concept_kind(name: str) -> str:
    """``"star"`` -> ``"shape"``; ``"red star"`` -> ``"compound"`` (one object both red and a star: erasing it keeps
    red objects of other shapes and stars of other colours); an unknown name raises ``ValueError`` listing every concept."""
    for kind, values in KINDS.items():
        if name in values:
            return kind
    if " " in name.strip():
        compound_parts(name)
        return "compound"
    raise ValueError(f"unknown concept {name!r}; shapes: {', '.join(SHAPES)}; colours: {', '.join(COLOURS)}; "
                     f"textures: {', '.join(t for t in TEXTURES if t != 'solid')}; or a colour and a shape (\"red star\")")


def neighbours(name: str) -> tuple[str, ...]:
    """A concept's look-alikes: ``NEIGHBOURS`` for a value; for a compound the same shape in the colour's look-alike
    colours and the same colour on the shape's look-alike shapes ("red star" -> orange star, pink star, red flower,
    red cross): what binding must keep."""
    if concept_kind(name) != "compound":
        return NEIGHBOURS.get(name, ())
    colour, shape = compound_parts(name)
    return tuple(f"{c} {shape}" for c in NEIGHBOURS[colour]) + tuple(f"{colour} {s}" for s in NEIGHBOURS[shape])


def parse_concepts(text: str, flag: str = "--concept") -> list[str]:
    """``"star,red"`` -> ["star", "red"]; empty items, unknown names, repeats, "solid" or erasing a whole kind
    raise ``ValueError``."""
    items = [" ".join(n.split()).lower() for n in str(text).split(",")]
    if not items or any(not n for n in items):
        raise ValueError(f"{flag} {text!r}: expected concept names separated by commas (star,red,striped)")
    for n in items:
        concept_kind(n)
        if n == "solid":
            raise ValueError(f"{flag} {text!r}: solid is the default texture, not a concept to erase; "
                             f"choose from {', '.join(TEXTURES[1:])}")
    if len(set(items)) != len(items):
        raise ValueError(f"{flag} {text!r} names a concept twice")
    for kind, values in KINDS.items():
        left = [v for v in values if v not in items and v != "solid"]
        if not left:
            raise ValueError(f"{flag} {text!r} erases every {kind}: at least one must be kept")
    return items


def all_concepts() -> list[str]:
    return [v for values in KINDS.values() for v in values if v != "solid"]


# ----------------------------------------------------------------------------------------------- sampling
def _colours_for(bg: str) -> list[str]:
    return [c for c in COLOURS if c not in HIDDEN_ON[bg]]


def _texture(rng, p_solid: float) -> str:
    return "solid" if rng.random() < p_solid else TEXTURES[1 + int(rng.integers(len(TEXTURES) - 1))]


def sample_scene(rng: np.random.Generator, kind: str | None = None, mix=(0.45, 0.2, 0.35)) -> Scene:
    """One random scene (kind drawn from ``mix`` = P(single), P(count), P(pair) unless given)."""
    kind = kind or ("single", "count", "pair")[int(rng.choice(3, p=np.asarray(mix) / sum(mix)))]
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    colours = _colours_for(bg)
    seed = int(rng.integers(2**31))
    if kind == "single":
        o = Obj(SHAPES[int(rng.integers(len(SHAPES)))], colours[int(rng.integers(len(colours)))], _texture(rng, 0.4))
        return Scene("single", "one", (o,), bg, seed=seed)
    if kind == "count":
        n = int(rng.choice(3, p=(0.2, 0.4, 0.4))) + 1
        o = Obj(SHAPES[int(rng.integers(len(SHAPES)))], colours[int(rng.integers(len(colours)))])
        layout = "one" if n == 1 else "three" if n == 3 else ("h2", "v2")[int(rng.integers(2))]
        return Scene("count", layout, (o,) * n, bg, seed=seed)
    s1, s2 = rng.choice(len(SHAPES), 2, replace=False)
    c1, c2 = rng.choice(len(colours), 2, replace=False)
    a = Obj(SHAPES[s1], colours[c1], _texture(rng, 0.6))
    b = Obj(SHAPES[s2], colours[c2], _texture(rng, 0.6))
    return pair_scene(a, b, RELATIONS[int(rng.integers(len(RELATIONS)))], bg, rng, seed)


def pair_scene(a: Obj, b: Obj, relation: str, bg: str, rng=None, seed: int = 0) -> Scene:
    """The scene "``a`` ``relation`` ``b``": slot order follows the relation; "and" picks an arrangement and an
    order with ``rng`` (side by side, ``a`` first, without one)."""
    if relation in ("left of", "above"):
        layout, objs, first = ("h2" if relation == "left of" else "v2"), (a, b), 0
    elif relation in ("right of", "below"):
        layout, objs, first = ("h2" if relation == "right of" else "v2"), (b, a), 1
    elif relation == "and":
        layout = ("h2", "v2")[int(rng.integers(2))] if rng is not None else "h2"
        swap = bool(rng.integers(2)) if rng is not None else False
        objs, first = ((b, a), 1) if swap else ((a, b), 0)
    else:
        raise ValueError(f"unknown relation {relation!r}; choose from {', '.join(RELATIONS)}")
    return Scene("pair", layout, objs, bg, relation=relation, first=first, seed=seed)


def scene_seed(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of a data set with seed ``seed`` (independent of every other index)."""
    return np.random.default_rng([seed, index])


def training_scenes(n: int, seed: int) -> list[Scene]:
    """The model's fixed training set: scene i is ``sample_scene(scene_seed(seed, i))``."""
    return [sample_scene(scene_seed(seed, i)) for i in range(n)]


def training_indices(scenes, held_out=()) -> np.ndarray:
    """Indices of the scenes a model trains on: every scene with no object having a held-out shape, colour or
    texture (the ``retrain`` reference never sees an image of the erased concepts, so no caption naming them)."""
    held = set(held_out)
    return np.array([i for i, s in enumerate(scenes) if not any(o.has(v) for o in s.objects for v in held)], dtype=np.int64)


# ----------------------------------------------------------------------------------------------- captions
def caption(scene: Scene, template: str, relation_words: str | None = None) -> str:
    """The caption of ``scene`` in one phrasing (a template of :data:`TRAIN_TEMPLATES` / :data:`HELDOUT_TEMPLATES`)."""
    fields = {"bg": scene.background}
    if scene.kind == "single":
        fields.update(a=scene.objects[0].phrase(), ac=scene.objects[0].phrase(colour=False))
    elif scene.kind == "count":
        o = scene.objects[0]
        words = [] if o.texture == "solid" else [o.texture]
        noun = o.shape if scene.count == 1 else PLURALS[o.shape]
        fields.update(n=NUMBERS[scene.count - 1], p=" ".join([o.colour] + words + [noun]), pc=" ".join(words + [noun]))
    else:
        a, b = scene.objects[scene.first], scene.objects[1 - scene.first]
        fields.update(a=a.phrase(), b=b.phrase(), r=relation_words or RELATION_WORDS[scene.relation][0])
    return template.format(**fields)


def captions(scene: Scene, split: str = "train") -> list[str]:
    """Every caption of ``scene`` in the training (``split="train"``) or held-out phrasings."""
    templates = (TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES)[scene.kind]
    words = RELATION_WORDS[scene.relation] if scene.kind == "pair" and split == "train" else (None,)
    return list(dict.fromkeys(caption(scene, t, w) for t in templates for w in words))


def vocabulary_words() -> list[str]:
    """Every word a caption of the world can contain (training and held-out phrasings)."""
    words = set(SHAPES) | set(PLURALS.values()) | set(COLOURS) | set(TEXTURES[1:]) | set(BACKGROUNDS) | set(NUMBERS)
    for table in (TRAIN_TEMPLATES, HELDOUT_TEMPLATES):
        for ts in table.values():
            for t in ts:
                words |= {w for w in t.split() if not w.startswith("{")}
    for ws in RELATION_WORDS.values():
        for w in ws:
            words |= set(w.split())
    return sorted(words | {"an"})


def stable_seed(*parts) -> int:
    """A seed from strings / ints, the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")
