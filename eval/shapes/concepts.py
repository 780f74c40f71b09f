"""Prompts of a concept of the shapes world: what an erasure is given (forget, anchor, retain) and what ``score``
audits (seven groups of :class:`Item` s, each a prompt with the scene it asks for).

Everything is drawn with generators seeded from the concept names (:func:`eval.shapes.world.stable_seed`), so the
base, the retrain reference and every erased model are audited on the very same prompts and image seeds.

Audit groups (each ``num_images`` images unless said otherwise):

* ``forget``: the erasure's own forget prompts (training phrasings), cycled;
* ``forget_heldout``: fresh prompts of the concept in held-out phrasings;
* ``neighbour``: one-object prompts of its look-alikes (``world.neighbours``), without any erased concept;
* ``cooccur``: two-object prompts where one object has the concept and the other has none ("a red star left of a
  blue circle"): the other one is what must stay;
* ``composition``: two-object (relation, "and") and count prompts without the concept;
* ``retain``: one-object prompts without the concept or its look-alikes (3 x ``num_images``);
* ``retain_heldout``: the same in held-out phrasings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval.shapes import world
from eval.shapes.world import Obj, Scene

AUDIT_SEED_OFFSET = 10**8  # audit image seeds: erase/sd.py's data seeds are seed + i, + 100000 j, + 1000000 (all < 10**8)
GROUPS = ("forget", "forget_heldout", "neighbour", "cooccur", "composition", "retain", "retain_heldout")
NUM_FORGET_PROMPTS = 24
NUM_RETAIN_PROMPTS = 80
MAX_DRAWS = 500  # draws for one distinct forget prompt before the concept is taken to have no more


@dataclass(frozen=True)
class Item:
    group: str
    prompt: str
    scene: Scene  # what the prompt asks for (an unnamed background is drawn at random, for the FD reference)
    value: str | None = None  # forget: the erased concept the prompt names; neighbour: the look-alike it names
    kept: Obj | None = None  # cooccur: the object that must still be drawn
    colour_named: bool = True


def _templates(kind: str, split: str) -> tuple[str, ...]:
    table = world.TRAIN_TEMPLATES if split == "train" else world.HELDOUT_TEMPLATES
    return tuple(t for t in table[kind] if "{ac}" not in t and "{pc}" not in t)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _obj(rng, bg: str, avoid, need: str | None = None, p_solid: float = 0.4, solid: bool = False) -> Obj:
    """A random object visible on ``bg`` with ``need`` as one of its values (a compound: its colour and shape) and
    none of ``avoid`` (a compound there: not that colour and shape together; drawn again until so)."""
    kind = world.concept_kind(need) if need else None
    colour_need, shape_need = world.compound_parts(need) if kind == "compound" else (need, need)
    shapes = [s for s in world.SHAPES if s not in avoid] if kind not in ("shape", "compound") else [shape_need]
    colours = ([c for c in world.COLOURS if c not in avoid and c not in world.HIDDEN_ON[bg]]
               if kind not in ("colour", "compound") else [colour_need])
    textures = [t for t in world.TEXTURES if t not in avoid]
    pairs = [v for v in avoid if " " in v]
    for _ in range(MAX_DRAWS):
        if kind == "texture":
            texture = need
        elif solid:
            texture = "solid"
        else:
            texture = "solid" if rng.random() < p_solid or len(textures) == 1 else _pick(rng, [t for t in textures if t != "solid"])
        o = Obj(_pick(rng, shapes), _pick(rng, colours), texture)
        if not any(o.has(v) for v in pairs):  # always true without compounds to avoid: one draw, as before
            return o
    raise ValueError(f"no object with {need or 'any value'} avoids {', '.join(pairs)}")


def _background(rng, need: str | None) -> str:
    colour = world.compound_parts(need)[0] if need and world.concept_kind(need) == "compound" else need
    return _pick(rng, [b for b in world.BACKGROUNDS if colour not in world.HIDDEN_ON[b]])


def single_item(rng, group: str, split: str, need: str | None, avoid, colour_named: bool = True) -> Item:
    bg = _background(rng, need)
    o = _obj(rng, bg, avoid, need)
    scene = Scene("single", "one", (o,), bg, seed=int(rng.integers(2**31)))
    template = _pick(rng, _templates("single", split)) if colour_named else "{ac}"
    return Item(group, world.caption(scene, template), scene, value=need, colour_named=colour_named)


def count_item(rng, group: str, split: str, need: str | None, avoid, colour_named: bool = True) -> Item:
    bg = _background(rng, need)
    o = _obj(rng, bg, avoid, need, solid=True)
    n = int(rng.integers(2, 4))
    layout = "three" if n == 3 else _pick(rng, ("h2", "v2"))
    scene = Scene("count", layout, (o,) * n, bg, seed=int(rng.integers(2**31)))
    template = _pick(rng, _templates("count", split)) if colour_named else "{n} {pc}"
    return Item(group, world.caption(scene, template), scene, value=need, colour_named=colour_named)


def pair_item(rng, group: str, split: str, need: str | None, avoid) -> Item:
    """Two objects of different shapes and colours; with ``need``, the first named has it and the other has none of
    ``avoid`` (it is the ``kept`` object)."""
    bg = _background(rng, need)
    a = _obj(rng, bg, avoid if need is None else [v for v in avoid if world.concept_kind(v) != world.concept_kind(need)],
             need, p_solid=0.6)
    while True:
        b = _obj(rng, bg, avoid, None, p_solid=0.6)
        if b.shape != a.shape and b.colour != a.colour:
            break
    relation = _pick(rng, world.RELATIONS)
    scene = world.pair_scene(a, b, relation, bg, rng, seed=int(rng.integers(2**31)))
    words = _pick(rng, world.RELATION_WORDS[relation]) if split == "train" else None
    prompt = world.caption(scene, _pick(rng, _templates("pair", split)), words)
    return Item(group, prompt, scene, value=need, kept=b if need is not None else None)


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(world.stable_seed(*parts))


# ----------------------------------------------------------------------------------------------- erasure inputs
def forget_items(concept: str, avoid=()) -> list[Item]:
    """The erasure's forget prompts of one concept (training phrasings): 16 one-object prompts, 4 count prompts and
    4 without a colour word ("a striped star", "two stars"); a colour has no colourless ones, a texture (count
    scenes are solid) no count ones. ``avoid``: other erased concepts, never named."""
    rng = _rng("forget", concept)
    kind = world.concept_kind(concept)
    others = [v for v in avoid if v != concept]
    plan = [(single_item, True)] * 16 + ([(count_item, True)] * 4 if kind != "texture" else [])
    while len(plan) < NUM_FORGET_PROMPTS:  # a colour (and a compound, which names its colour) has no colourless prompt
        plan.append((single_item, True) if kind in ("colour", "compound") else
                    (count_item, False) if kind == "shape" and len(plan) % 2 else (single_item, False))
    items: dict[str, Item] = {}
    for maker, coloured in plan:  # distinct prompts (a repeat is drawn again; with many concepts erased together
        for _ in range(MAX_DRAWS):  # the world may hold fewer than 24 prompts of this one: then fewer are kept)
            it = maker(rng, "forget", "train", concept, others, colour_named=coloured)
            if it.prompt not in items:
                items[it.prompt] = it
                break
    return list(items.values())


def anchor_prompt(concept: str, avoid=()) -> str:
    """Where an erased concept's prompts are redirected: a one-object prompt of another value of its kind that is
    not a look-alike ("star" -> "a circle", "red" -> "a yellow circle"); a texture goes to a plain solid circle.
    A prompt without the concept's kind ("a circle" for "red") would still draw it in 1 of 11 images. ``avoid``:
    the other erased concepts (never an anchor); when they leave no value that is not a look-alike, a look-alike
    that is not erased is taken."""
    avoid = set(avoid) | {concept}
    kind = world.concept_kind(concept)
    if kind == "compound":  # the same colour on the shape's anchor shape, neither erased alone nor as a compound
        colour, shape = world.compound_parts(concept)
        erased = {v for v in avoid if " " not in v} | {world.compound_parts(v)[1] for v in avoid if " " in v
                                                        and world.compound_parts(v)[0] == colour}
        to = anchor_prompt(shape, erased).split()[-1]
        return Obj(to, colour).phrase()
    values = world.KINDS[kind]
    start = values.index(concept)
    ordered = [v for v in values[start + 1:] + values[:start] if v not in avoid and v != "solid"]
    far = [v for v in ordered if v not in world.NEIGHBOURS.get(concept, ()) and concept not in world.NEIGHBOURS.get(v, ())]
    shape = next(s for s in world.SHAPES if s not in avoid)
    if kind == "shape":
        return Obj((far or ordered)[0], "").phrase(colour=False)
    if kind == "colour":  # on a shape that is not, with that colour, an erased compound
        colour = (far or ordered)[0]
        return Obj(next(s for s in world.SHAPES if s not in avoid and f"{colour} {s}" not in avoid), colour).phrase()
    return Obj(shape, "").phrase(colour=False)


def retain_prompts(concepts) -> list[str]:
    """The erasure's retain prompts (training phrasings) without any of ``concepts``: 48 one-object (look-alikes
    included: they are what must be kept), 16 count and 16 two-object prompts."""
    rng = _rng("retain-prompts", ",".join(sorted(concepts)))
    items = [single_item(rng, "retain", "train", None, concepts) for _ in range(48)]
    items += [count_item(rng, "retain", "train", None, concepts) for _ in range(16)]
    items += [pair_item(rng, "retain", "train", None, concepts) for _ in range(16)]
    return list(dict.fromkeys(it.prompt for it in items))


def presets(concepts) -> list[dict]:
    """The erasure inputs of concepts erased together, in ``prompts`` preset form (name, forget / generation prompts,
    anchor; no retain prompts: those are :func:`retain_prompts` of them all), as ``bench`` writes them into the
    concept file it hands to ``erase/sd.py --concept FILE.json``. No concept's prompts or anchor name another."""
    concepts = list(concepts)
    out = []
    for c in concepts:
        forget = [it.prompt for it in forget_items(c, concepts)]
        held = [it.prompt for it in audit_items([c], 4) if it.group == "forget_heldout"]
        out.append({
            "name": c, "category": f"shapes-{world.concept_kind(c)}",
            "description": (f"The {world.concept_kind(c)} {c} of the shapes world (python -m eval.shapes). forget_prompts "
                            f"are training phrasings; held-out phrasings such as {held[:2]} are never used in training or "
                            f"erasure and are audited by `score`."),
            "forget_prompts": forget, "generation_prompts": forget, "anchor_prompt": anchor_prompt(c, concepts)})
    return out


def preset(concept: str) -> dict:
    """One concept's erasure inputs with its retain prompts: a complete ``prompts/presets`` entry."""
    return {**presets([concept])[0], "retain_prompts": retain_prompts([concept])}


def mixed_concepts(n: int) -> list[str]:
    """``n`` concepts for a many-concept run (``--concept many:N``): shapes, colours and textures in proportion to how
    many each kind has (solid never), each kind in a fixed shuffled order (seeded by the kind's name), so ``many:10``
    is always the same ten and is part of ``many:24``. Two shapes and two colours are kept (a two-object prompt names
    two of each) and one texture besides solid (:func:`eval.shapes.world.parse_concepts`): at most 24 of the world's
    29 erasable values."""
    erasable = {k: [v for v in vs if v != "solid"] for k, vs in world.KINDS.items()}
    room = {"shape": len(erasable["shape"]) - 2, "colour": len(erasable["colour"]) - 2, "texture": len(erasable["texture"]) - 1}
    if not 1 <= n <= sum(room.values()):
        raise ValueError(f"many:{n}: between 1 and {sum(room.values())} concepts can be erased at once "
                         "(two shapes, two colours and one texture besides solid are kept)")
    order = {k: [vs[i] for i in _rng("many", k).permutation(len(vs))] for k, vs in erasable.items()}
    total = sum(len(vs) for vs in erasable.values())
    taken = {k: 0 for k in erasable}
    picked = []
    for _ in range(n):  # the kind furthest below its share of the picks so far takes the next one
        kind = max((k for k in erasable if taken[k] < room[k]),
                   key=lambda k: ((len(picked) + 1) * len(erasable[k]) / total - taken[k], -list(erasable).index(k)))
        picked.append(order[kind][taken[kind]])
        taken[kind] += 1
    return picked


MAX_COMPOUNDS = 60


def compound_concepts(n: int) -> list[str]:
    """``n`` compound concepts ("red star") for a many-concept run (``--concept pairs:N``): the world's 154 colour-shape
    pairs in one fixed shuffled order, so ``pairs:25`` is the start of ``pairs:50``. At most 60, so every colour keeps
    shapes to be redirected to."""
    if not 1 <= n <= MAX_COMPOUNDS:
        raise ValueError(f"pairs:{n}: between 1 and {MAX_COMPOUNDS} compound concepts can be erased at once")
    every = [f"{c} {s}" for c in world.COLOURS for s in world.SHAPES]
    return [every[i] for i in _rng("pairs").permutation(len(every))[:n]]


# ----------------------------------------------------------------------------------------------- audit
def audit_items(concepts, num_images: int) -> list[Item]:
    """The items ``score`` generates, group by group (see the module docstring)."""
    concepts = list(concepts)
    key = ",".join(sorted(concepts))
    items: list[Item] = []
    for c in concepts:
        prompts = forget_items(c, concepts)
        items += [prompts[i % len(prompts)] for i in range(num_images)]
        rng = _rng("forget_heldout", key, c)
        for i in range(num_images):
            others = [v for v in concepts if v != c]
            maker = count_item if world.concept_kind(c) != "texture" and i % 4 == 3 else single_item
            items.append(maker(rng, "forget_heldout", "heldout", c, others))
    neighbours = [v for c in concepts for v in world.neighbours(c) if v not in concepts]
    neighbours = list(dict.fromkeys(neighbours))
    rng = _rng("neighbour", key)
    items += [single_item(rng, "neighbour", "train", neighbours[i % len(neighbours)], concepts) for i in range(num_images)] \
        if neighbours else []
    rng = _rng("cooccur", key)
    items += [pair_item(rng, "cooccur", "train", concepts[i % len(concepts)], concepts) for i in range(num_images)]
    rng = _rng("composition", key)
    items += [(pair_item if i % 2 == 0 else count_item)(rng, "composition", "train", None, concepts)
              for i in range(num_images)]
    avoid = retain_avoid(concepts, neighbours)
    rng = _rng("retain", key)
    items += [single_item(rng, "retain", "train", None, avoid) for _ in range(3 * num_images)]
    rng = _rng("retain_heldout", key)
    items += [single_item(rng, "retain_heldout", "heldout", None, avoid) for _ in range(num_images)]
    return items


def retain_avoid(concepts, neighbours) -> list[str]:
    """What retain prompts leave out: the erased concepts and their look-alikes (those have their own group), except the
    look-alikes of a kind whose every other value is erased (with many concepts erased at once); colours must leave
    one visible on every background."""
    avoid = list(concepts) + [v for v in neighbours if " " in v]  # a compound's look-alikes: plenty is left
    for kind, values in world.KINDS.items():
        near = [v for v in neighbours if v != "solid" and world.concept_kind(v) == kind]
        left = [v for v in values if v not in avoid + near]
        if kind == "colour":
            left = [v for v in left if not any(v in hidden for hidden in world.HIDDEN_ON.values())]
        if left:
            avoid += near
    return avoid


def item_seed(group: str, position: int, seed: int) -> int:
    """Image seed of the ``position``-th item of ``group`` for audit seed ``seed``:
    ``AUDIT_SEED_OFFSET + 1_000_000 * seed + 10_000 * group index + position``."""
    if not 0 <= position < 10_000:
        raise ValueError(f"an audit group holds at most 10,000 images, got position {position}")
    return AUDIT_SEED_OFFSET + 1_000_000 * seed + 10_000 * GROUPS.index(group) + position
