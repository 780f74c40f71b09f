"""Audit one shapes model (a base, a retrain reference or an erase/sd.py output): ``python -m eval.shapes score``.

Generates the audit groups of :func:`eval.shapes.concepts.audit_items` through ``erase.diffusion.generate`` (the code of the
SD v1.4 audits), reads every image with the judges (:mod:`eval.shapes.judges`) and writes ``OUT/summary.json``:

* ``forget_acc``: share of the concept's prompts (the erasure's own) in which the judges still find it (any object
  with that shape / colour / texture; a compound "red star": an object both red and a star); ``forget_heldout_acc``
  the same under held-out phrasings;
* ``neighbour_acc``: look-alike prompts drawn correctly (every named attribute, one object);
* ``cooccur_acc``: two-object prompts naming the concept and another object: share where that other object (shape,
  colour, texture) is still drawn, anywhere;
* ``composition_acc``: two-object and count prompts without the concept drawn correctly: the relation's arrangement
  and order, each object's attributes ("and": both objects, either arrangement), the count (with its breakdown);
* ``retain_acc`` / ``retain_heldout_acc``: one-object prompts without the concept or its look-alikes drawn correctly;
* ``retain_fd``: Fréchet distance between the judges' features of the retain generations and of renders of the
  scenes their prompts ask for; ``per_concept_acc``: per shape, colour and texture, the share of one-object prompts
  naming it drawn with it; ``attribute_acc``: the base figures per judge (object, colour, texture, count, relation);
* ``settings``: model, erase config, fingerprints, judges (versions, hashes, accuracies), prompts, seeds, sampler.

``predictions.jsonl`` has one line per image (prompt, seed, group, what the judges read).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from erase.utils.errors import UserError
from erase.utils.files import atomic_write_json, atomic_write_text
from eval.shapes import world
from eval.shapes.concepts import AUDIT_SEED_OFFSET, GROUPS, audit_items, item_seed

logger = logging.getLogger(__name__)

# scheduler None: the model family's own sampler (erase.diffusion.generate.family_sampler): DDIM for the UNet model,
# flow-matching Euler for the sd3 one
SCORE_DEFAULTS = dict(num_images=40, steps=20, guidance=4.0, scheduler=None, batch_size=100)


# ----------------------------------------------------------------------------------------------- model folders
def resolve_shapes_model(model: str) -> tuple[dict, str, dict | None]:
    """(model card of the base shapes model, base folder, erase_config or None) for a base or erased folder;
    anything else is a ``UserError`` (the judges only mean something on a shapes model)."""
    from eval.digits.score import resolve_world_model
    from eval.shapes.model import read_model_card

    return resolve_world_model(model, "shapes", read_model_card)


# ----------------------------------------------------------------------------------------------- judging
def _match(seen: world.Obj, asked: world.Obj, colour_named: bool = True) -> bool:
    return seen.shape == asked.shape and seen.texture == asked.texture and (not colour_named or seen.colour == asked.colour)


def correct(item, reading) -> bool:
    """Whether ``reading`` shows what ``item``'s prompt asks for (every named attribute, the count, the relation)."""
    s = item.scene
    if s.kind == "single":
        return reading.count == 1 and _match(reading.objects[0], s.objects[0], item.colour_named)
    if s.kind == "count":
        return reading.count == s.count and all(_match(o, s.objects[0], item.colour_named) for o in reading.objects)
    if s.relation == "and":
        key = dataclasses.astuple
        return reading.count == 2 and sorted(map(key, reading.objects)) == sorted(map(key, s.objects))
    return reading.layout == s.layout and list(reading.objects) == list(s.objects)


def _mean(flags) -> float | None:
    flags = list(flags)
    return float(np.mean(flags)) if flags else None


def metrics(items, readings, concepts) -> dict:
    """Every column of the summary from the items and what the judges read (no images needed)."""
    by = {g: [(it, r) for it, r in zip(items, readings) if it.group == g] for g in GROUPS}
    seen = lambda it, r: any(o.has(it.value) for o in r.objects)  # noqa: E731  (a compound: on one object)
    out = {
        "forget_acc": _mean(seen(it, r) for it, r in by["forget"]),
        "forget_acc_per_concept": {c: _mean(seen(it, r) for it, r in by["forget"] if it.value == c) for c in concepts},
        "forget_heldout_acc": _mean(seen(it, r) for it, r in by["forget_heldout"]),
        "neighbour_acc": _mean(correct(it, r) for it, r in by["neighbour"]),
        "neighbour_acc_per_value": {v: _mean(correct(it, r) for it, r in by["neighbour"] if it.value == v)
                                    for v in dict.fromkeys(it.value for it, _ in by["neighbour"])},
        "cooccur_acc": _mean(any(_match(o, it.kept) for o in r.objects) for it, r in by["cooccur"]),
        "composition_acc": _mean(correct(it, r) for it, r in by["composition"]),
        "composition": {
            "count": _mean(correct(it, r) for it, r in by["composition"] if it.scene.kind == "count"),
            "relation": _mean(correct(it, r) for it, r in by["composition"] if it.scene.kind == "pair" and it.scene.relation != "and"),
            "binding": _mean(correct(it, r) for it, r in by["composition"] if it.scene.relation == "and"),
        },
        "retain_acc": _mean(correct(it, r) for it, r in by["retain"]),
        "retain_heldout_acc": _mean(correct(it, r) for it, r in by["retain_heldout"]),
    }
    # per value: one-object prompts naming it (erased, look-alike and retained alike), drawn with it
    per: dict[str, list[bool]] = {}
    kept_singles = [(it, r) for g in ("neighbour", "retain") for it, r in by[g] if it.scene.kind == "single"]
    for it, r in [(it, r) for it, r in by["forget"] if it.scene.kind == "single"] + kept_singles:
        o = it.scene.objects[0]
        for attr in ("shape", "colour", "texture"):
            if attr == "colour" and not it.colour_named:
                continue
            v = getattr(o, attr)
            per.setdefault(v, []).append(r.count == 1 and getattr(r.objects[0], attr) == v)
    order = [v for vs in world.KINDS.values() for v in vs]
    out["per_concept_acc"] = {v: float(np.mean(per[v])) for v in order if v in per}
    comp = by["composition"]
    out["attribute_acc"] = {
        **{judge: _mean(r.count == 1 and getattr(r.objects[0], attr) == getattr(it.scene.objects[0], attr)
                        for it, r in kept_singles)
           for judge, attr in (("object", "shape"), ("colour", "colour"), ("texture", "texture"))},
        "count": _mean(r.count == it.scene.count for it, r in comp if it.scene.kind == "count"),
        "relation": _mean(r.layout == it.scene.layout and [o.shape for o in r.objects] == [o.shape for o in it.scene.objects]
                          for it, r in comp if it.scene.kind == "pair" and it.scene.relation != "and"),
    }
    out["n"] = {g: len(by[g]) for g in GROUPS}
    return out


# ----------------------------------------------------------------------------------------------- the audit
def score_inputs(args) -> tuple:
    """Check score's inputs before anything is written: (model, card, base, erase_config)."""
    from eval.shapes.model import default_model_dir

    model = args.model or str(default_model_dir())
    if not args.model and not Path(model).is_dir():
        raise UserError(f"no --model given and the default shapes model {model} is not trained yet; "
                        "run `python -m eval.shapes train` first")
    card, base, erase_config = resolve_shapes_model(model)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {args.output_dir} exists and is not a folder")
    return model, card, base, erase_config


def rows_for(items, seeds):
    """One PromptRow per (seed, item); image seed from :func:`eval.shapes.concepts.item_seed`."""
    from erase.diffusion.prompt_table import PromptRow

    rows, k = [], 0
    for s in seeds:
        position = {g: 0 for g in GROUPS}
        for it in items:
            rows.append(PromptRow(index=k, prompt=it.prompt, seed=item_seed(it.group, position[it.group], s),
                                  meta={"group": it.group, "seed_base": s}))
            position[it.group] += 1
            k += 1
    return rows


def score(args, judges=None) -> dict:
    """Run the audit; writes OUT/summary.json (atomically, last) and OUT/predictions.jsonl. ``judges``: a loaded
    :class:`eval.shapes.judges.Judges` (default: the cached default judges, trained first if absent)."""
    from PIL import Image

    from erase.diffusion.generate import describe, family_sampler, generate, GenerationConfig, load_pipeline
    from eval.digits.judge import frechet_distance
    from eval.shapes.judges import load_judges
    from eval.shapes.render import render_many

    model, card, base, erase_config = score_inputs(args)
    concepts = list(args.concepts)
    out = Path(args.output_dir)
    scheduler = args.scheduler or family_sampler(model)
    gen_cfg = GenerationConfig(model=model, steps=args.steps, guidance=args.guidance, scheduler=scheduler,
                               batch_size=args.batch_size)
    start = time.time()
    judges = judges or load_judges(progress=True)
    pipe = load_pipeline(model, scheduler=scheduler, dtype="fp32", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    items = audit_items(concepts, args.num_images)
    rows = rows_for(items, args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # an earlier run's, until this one writes its own: a killed run leaves none
    records = generate(rows, out / "images", gen_cfg, pipe=pipe)
    images = np.stack([np.asarray(Image.open(out / "images" / r["file"]).convert("RGB")) for r in records])
    readings = judges.read(images)
    all_items = [it for _ in args.seeds for it in items]
    summary = {"concept": ",".join(concepts), "concepts": concepts, "kinds": {c: world.concept_kind(c) for c in concepts},
               **metrics(all_items, readings, concepts)}

    retain = [i for i, it in enumerate(all_items) if it.group == "retain"]
    side = images.shape[1]
    reference = render_many([dataclasses.replace(all_items[i].scene, seed=rows[i].seed) for i in retain], side)
    summary["retain_fd"] = frechet_distance(judges.features(images[retain]), judges.features(reference)) if len(retain) > 1 else None
    summary["settings"] = {
        "model": str(model), "base_model": str(base), "erased": erase_config is not None, "erase_config": erase_config,
        "shapes_model_fingerprint": card.get("fingerprint"), "held_out_by_model": card.get("config", {}).get("held_out", []),
        "num_images_per_group_per_seed": args.num_images, "seeds": args.seeds,
        "image_seed_rule": f"{AUDIT_SEED_OFFSET} + 1,000,000 * seed + 10,000 * group index ({', '.join(GROUPS)}) + "
                           "position within the group (erase/sd.py's data seeds stay below 10**8)",
        "generation": describe(gen_cfg, pipe),
        "judges": judges.describe(), "judge_config": dataclasses.asdict(judges.config),
        "fd_features": "concatenated penultimate features of the object, colour and texture judges on the whole image",
        "fd_reference": "renders of the scenes the retain prompts ask for (geometry seeded by the image seed)",
        "prompts": {g: list(dict.fromkeys(it.prompt for it in items if it.group == g)) for g in GROUPS},
    }
    summary["seconds"] = round(time.time() - start, 1)
    preds = [{**rec, "group": it.group, "seed_base": row.meta["seed_base"], "asked": _describe_scene(it.scene),
              "read": {"count": r.count, "layout": r.layout, "objects": [dataclasses.astuple(o) for o in r.objects]},
              "correct": correct(it, r)}
             for rec, row, it, r in zip(records, rows, all_items, readings)]
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
    atomic_write_json(out / "summary.json", summary)
    return summary


def _describe_scene(scene) -> dict:
    return {"kind": scene.kind, "layout": scene.layout, "objects": [dataclasses.astuple(o) for o in scene.objects],
            "relation": scene.relation}
