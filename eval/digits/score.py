"""Audit one digits model (a base or an erase/sd.py output) with the digit judge: ``python -m eval.digits score``.

See the package docstring for what ``summary.json`` holds."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from erase.utils.errors import UserError
from erase.utils.files import atomic_write_json, atomic_write_text
from eval.digits.model import (
    DIGIT_WORDS,
    HELDOUT_TEMPLATES,
    default_model_dir,
    digit_prompts,
    prompt_digit,
    read_model_card,
)

logger = logging.getLogger(__name__)

# scheduler None: the model family's own sampler (erase.diffusion.generate.family_sampler): DDIM for the UNet digits
# model, flow-matching Euler for the SD3-kind transformer
SCORE_DEFAULTS = dict(num_images=40, steps=20, guidance=4.0, scheduler=None, batch_size=100)
# Audit images are drawn on held-out noise: erase/sd.py draws forget image i with seed S + i, concept j's with
# S + 100000 j + i, retain image i with S + 1_000_000 + i, the attacks their concept images with 2_000_000 + i; the
# audit's seeds start at 10**8 (eval.attack's checks use the same offset, eval/attack/utils/checks.py).
AUDIT_SEED_OFFSET = 10**8
ROW_SEED_RULE = "10**8 + 1000 * seed + position of the image within its digit"
BENCH_DEFAULTS = dict(max_train_steps=100, train_batch_size=16, num_forget_images=64, num_retain_images=192)


# ----------------------------------------------------------------------------------------------- model folders
def resolve_digits_model(model: str) -> tuple[dict, str, dict | None]:
    """(model card of the base digits model, base folder, erase_config or None) for a base or erased folder.

    Anything else is a ``UserError``: the digits judge only means something on a digits model.
    """
    return resolve_world_model(model, "digits", read_model_card)


def resolve_world_model(model: str, kind: str, read_card) -> tuple[dict, str, dict | None]:
    """(model card of the base, base folder, erase_config or None) for a base or erased folder of a world model
    (``kind``: digits, shapes; ``read_card(folder)``: its card or None); anything else is a ``UserError``."""
    path = Path(model)
    if not path.is_dir():
        raise UserError(f"model folder not found: {model}")
    erase_config = None
    base = str(path)
    if (path / "erase_config.json").is_file():
        from erase.export.local import read_record

        erase_config = read_record(path)  # with this machine's local paths (erase_local.json) put back
        base = erase_config.get("pretrained_model_name_or_path") or ""
        from erase.export.formats import DENOISERS

        if not any((path / d).is_dir() for d in DENOISERS):
            raise UserError(f"{model} has an erase_config.json but no unet/ or transformer/ folder")
    card = read_card(base) if base and Path(base).is_dir() else None
    root, seen = base, set()
    while card is None and root and root not in seen and _exported_erasure(Path(root)):
        # an erasure stacked on another's exported pipeline: the world is its first base's
        from erase.export.local import read_record

        seen.add(root)
        record = read_record(Path(root))  # a folder this tool did not write: its record may be anything
        root = (record.get("pretrained_model_name_or_path") if isinstance(record, dict) else None) or ""
        card = read_card(root) if isinstance(root, str) and root and Path(root).is_dir() else None
    if card is None:
        what = f"{model} (base {base!r})" if erase_config is not None else model
        raise UserError(f"{what} is not a {kind} model (no {kind}_model.json); train one with `python -m eval.{kind} train`")
    return card, base, erase_config


def _exported_erasure(folder: Path) -> bool:
    """Whether ``folder`` is an erase/sd.py output written with ``--export_pipeline`` (a full pipeline and its record)."""
    return (folder / "erase_config.json").is_file() and (folder / "model_index.json").is_file()


# ----------------------------------------------------------------------------------------------- prompts
def _prompt_sets(args) -> tuple[dict[int, list[str]], dict[int, list[str]], str]:
    """Forget prompts per erased digit, retain prompts grouped by digit, and where they came from. Validates before
    any work. With several erased digits the retain prompts are the presets' minus every erased digit's."""
    from prompts import load_concept, read_prompt_file

    digits = list(getattr(args, "digits", None) or [args.digit])
    presets = {d: load_concept(DIGIT_WORDS[d]) for d in digits}
    try:
        forget = ({digits[0]: read_prompt_file(args.forget_prompts)} if args.forget_prompts
                  else {d: presets[d].forget_prompts for d in digits})
        retain = (read_prompt_file(args.retain_prompts) if args.retain_prompts
                  else [q for q in presets[digits[0]].retain_prompts if prompt_digit(q) not in digits])
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    by_digit: dict[int, list[str]] = {}
    for p in retain:
        d = prompt_digit(p)
        if d is None:
            raise UserError(f"retain prompt {p!r} names no single digit (a digit word like 'seven' or a numeral like '7')")
        if d in digits:
            raise UserError(f"retain prompt {p!r} names the erased digit {DIGIT_WORDS[d]}")
        by_digit.setdefault(d, []).append(p)
    source = "files" if (args.forget_prompts or args.retain_prompts) else "preset"
    return forget, dict(sorted(by_digit.items())), source


def _rows(groups: dict[int, list[str]], n: int, seeds: list[int], start: int = 0):
    """One PromptRow per image: for each seed s, n images per digit cycling over its prompts.
    Row seed = 10**8 + 1000 * s + position within the digit (held-out noise: no erasure trains on it), so an
    image's seed depends only on (s, digit slot)."""
    from erase.diffusion.prompt_table import PromptRow

    rows, index = [], start
    for s in seeds:
        for d, prompts in groups.items():
            for i in range(n):
                rows.append(PromptRow(index=index, prompt=prompts[i % len(prompts)], seed=AUDIT_SEED_OFFSET + 1000 * s + i,
                                      meta={"digit": d, "seed_base": s}))
                index += 1
    return rows


# ----------------------------------------------------------------------------------------------- scoring
def _audit(pipe, judge, gen_cfg, rows, image_dir: Path, forget_digits: list[int]) -> tuple[dict, list[dict], np.ndarray]:
    from PIL import Image

    from erase.diffusion.generate import generate

    records = generate(rows, image_dir, gen_cfg, pipe=pipe)
    images = np.stack([np.asarray(Image.open(image_dir / r["file"]).convert("RGB")) for r in records])
    pred, feats = judge.predict(images)
    truth = np.array([row.meta["digit"] for row in rows])
    per_digit = {str(d): float((pred[truth == d] == d).mean()) for d in sorted(set(truth.tolist()))}
    forget_mask = np.isin(truth, forget_digits)
    retain_mask = ~forget_mask
    metrics = {
        # share of the erased digits' generations the judge calls the digit they were prompted for (pooled)
        "forget_acc": float((pred[forget_mask] == truth[forget_mask]).mean()) if forget_mask.any() else None,
        "forget_acc_per_digit": {str(d): per_digit[str(d)] for d in forget_digits if str(d) in per_digit},
        "retain_acc": float((pred[retain_mask] == truth[retain_mask]).mean()) if retain_mask.any() else None,
        "per_digit_acc": per_digit,
        "n_forget": int(forget_mask.sum()), "n_retain": int(retain_mask.sum()),
        # what the forget generations were called instead: a histogram over 0..9
        "forget_predicted_hist": np.bincount(pred[forget_mask], minlength=10).tolist(),
    }
    preds = [{**rec, "digit": int(t), "predicted": int(p), "seed_base": row.meta["seed_base"]}
             for rec, row, t, p in zip(records, rows, truth, pred)]
    return metrics, preds, feats[retain_mask]


def score_inputs(args) -> tuple:
    """Check score's inputs before anything is written: (model, card, base, erase_config, forget, retain, source)."""
    model = args.model or str(default_model_dir())
    if not args.model and not Path(model).is_dir():
        raise UserError(f"no --model given and the default digits model {model} is not trained yet; "
                        "run `python -m eval.digits train` first")
    card, base, erase_config = resolve_digits_model(model)
    forget, retain, source = _prompt_sets(args)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {args.output_dir} exists and is not a folder")
    return model, card, base, erase_config, forget, retain, source


def score(args) -> dict:
    """Run the audit; writes OUT/summary.json (atomically, last) and OUT/predictions.jsonl."""
    from eval.digits.judge import frechet_distance, load_judge
    from erase.diffusion.generate import describe, family_sampler, GenerationConfig, load_pipeline
    from eval.digits.model import load_digit_images

    model, card, base, erase_config, forget, retain, source = score_inputs(args)
    out = Path(args.output_dir)
    scheduler = args.scheduler or family_sampler(model)
    gen_cfg = GenerationConfig(model=model, steps=args.steps, guidance=args.guidance, scheduler=scheduler,
                               batch_size=args.batch_size)
    start = time.time()
    judge = load_judge()
    pipe = load_pipeline(model, scheduler=scheduler, dtype="fp32", device="cpu")
    real_x, real_y = load_digit_images(judge.config.resolution)
    _, real_feats = judge.predict(real_x, grey=True)
    retain_digits = sorted(retain)
    real_retain = real_feats[np.isin(real_y.numpy(), retain_digits)]

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # an earlier run's, until this one writes its own: a killed run leaves none
    digits = list(forget)
    audits = {"main": ({**forget, **retain})}
    if source == "preset" and not args.no_heldout:
        audits["heldout"] = {d: digit_prompts(d, HELDOUT_TEMPLATES) for d in digits + retain_digits}
    results, all_preds = {}, []
    for name, groups in audits.items():
        rows = _rows(groups, args.num_images, args.seeds)
        metrics, preds, retain_feats = _audit(pipe, judge, gen_cfg, rows, out / "images" / name, digits)
        metrics["retain_fd"] = frechet_distance(retain_feats, real_retain) if len(retain_feats) > 1 else None
        metrics["prompts"] = {DIGIT_WORDS[d]: p for d, p in groups.items()}
        results[name] = metrics
        all_preds += [{**p, "audit": name} for p in preds]

    main = results.pop("main")
    summary = {
        "concept": ",".join(DIGIT_WORDS[d] for d in digits), "digit": digits[0], "digits": digits,
        "forget_acc": main["forget_acc"], "forget_acc_per_digit": main["forget_acc_per_digit"], "retain_acc": main["retain_acc"],
        "per_digit_acc": main["per_digit_acc"], "retain_fd": main["retain_fd"],
        "n_forget": main["n_forget"], "n_retain": main["n_retain"],
        "forget_predicted_hist": main["forget_predicted_hist"],
        "heldout": results.get("heldout"),
        "settings": {
            "model": str(model), "base_model": str(base), "erased": erase_config is not None,
            "erase_config": erase_config, "digits_model_fingerprint": card.get("fingerprint"),
            "prompt_source": source, "forget_prompts": forget[digits[0]] if len(digits) == 1 else
            {DIGIT_WORDS[d]: p for d, p in forget.items()},
            "retain_prompts": {DIGIT_WORDS[d]: p for d, p in retain.items()},
            "num_images_per_digit_per_seed": args.num_images, "seeds": args.seeds,
            "row_seed_rule": ROW_SEED_RULE, "seed_offset": AUDIT_SEED_OFFSET,
            "generation": describe(gen_cfg, pipe),
            "judge": {"fingerprint": judge.config.fingerprint(), "test_accuracy": judge.meta["test_accuracy"],
                      "features": "penultimate layer, 128-d", "fd_reference": "all real sklearn digits of the retain digits"},
            "retain_acc_definition": "pooled over all retain images (each digit has the same image count with the preset)",
        },
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in all_preds))
    atomic_write_json(out / "summary.json", summary)
    return summary
