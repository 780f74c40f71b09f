"""The digits benchmark: a concept erasure anyone can run and check on a laptop CPU.

    python -m eval.digits train --output_dir DIR          # tiny SD-format text-to-image model of digits (cached)
    python -m eval.digits retrain --digits three          # the same model trained without the digit's images (cached)
    python -m eval.digits score --model M --concept three --output_dir OUT
    python -m eval.digits bench --concept three --methods scissorhands,esd,salun,ga,ft --seeds 0,1,2 --output_dir OUT

``score`` generates images for the erased digit's prompts and for every other digit's prompts through
``eval.generate`` (the same code as the SD v1.4 audits), asks the judge (``eval.digits_judge``, a CNN trained on
real digits) which digit each image shows, and writes ``OUT/summary.json``: ``forget_acc`` (share of the erased
digit's generations the judge calls that digit), ``retain_acc`` (share of the other digits' generations called
their own digit, pooled), per-digit accuracies, the Fréchet distance of the retain generations to real digits
in the judge's feature space, the same under held-out phrasings, and every setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from erase.safety import check_int, check_numbers, hold_output_dir
from eval.common import UserError, atomic_write_json, atomic_write_text, read_json
from eval.digits_model import (
    DIGIT_WORDS,
    HELDOUT_TEMPLATES,
    DigitsModelConfig,
    default_model_dir,
    digit_prompts,
    parse_digits,
    prompt_digit,
    read_model_card,
)

logger = logging.getLogger(__name__)

SCORE_DEFAULTS = dict(num_images=40, steps=20, guidance=4.0, scheduler="ddim", batch_size=100)
BENCH_DEFAULTS = dict(max_train_steps=100, train_batch_size=16, num_forget_images=64, num_retain_images=192)


# ----------------------------------------------------------------------------------------------- args
def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in fields(cls):
        default = f.default
        kw = dict(default=default, help=f"{f.metadata.get('help', '')} (default: {default})")
        if isinstance(default, tuple):
            kw.update(type=int, nargs="+")
        else:
            kw.update(type=type(default))
        parser.add_argument(f"--{f.name}", **kw)


def parse_args(input_args=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.digits", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the digits text-to-image model (cached by its settings)")
    p.add_argument("--output_dir", default=None,
                   help="pipeline folder to write (default: $ERASE_CACHE/digits/model-<settings hash>)")
    p.add_argument("--force", action="store_true", help="retrain even if a model with these settings exists")
    _add_dataclass_args(p, DigitsModelConfig)

    p = sub.add_parser("retrain", help="train the digits model from scratch without the images of some digits: the "
                                       "reference an erasure is compared with (cached by settings + held-out digits)")
    p.add_argument("--digits", required=True, help="the digit(s) to leave out: zero..nine or 0..9, comma-separated")
    p.add_argument("--model", default=None,
                   help="base digits model whose settings are reused (default: the default digits model's settings)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the base model's)")
    p.add_argument("--output_dir", default=None,
                   help="pipeline folder to write (default: $ERASE_CACHE/digits/model-<settings + held-out hash>)")
    p.add_argument("--force", action="store_true", help="retrain even if a model with these settings exists")

    p = sub.add_parser("score", help="audit a digits model (base or erase/sd.py output) with the digit judge")
    p.add_argument("--model", default=None,
                   help="digits pipeline folder or erase/sd.py output dir (default: the cached default digits model)")
    p.add_argument("--concept", required=True, help="the erased digit(s): zero..nine or 0..9, several comma-separated")
    p.add_argument("--forget_prompts", default=None,
                   help="file of prompts for the erased digit, one a line (default: the preset's forget prompts)")
    p.add_argument("--retain_prompts", default=None,
                   help="file of prompts for other digits, one a line, each naming its digit "
                        "(default: the preset's retain prompts)")
    p.add_argument("--num_images", type=int, default=SCORE_DEFAULTS["num_images"],
                   help="images per digit and seed, spread over that digit's prompts")
    p.add_argument("--seeds", default="0", help="comma-separated base seeds; each adds num_images per digit")
    p.add_argument("--steps", type=int, default=SCORE_DEFAULTS["steps"], help="sampling steps")
    p.add_argument("--guidance", type=float, default=SCORE_DEFAULTS["guidance"], help="classifier-free guidance")
    p.add_argument("--scheduler", default=SCORE_DEFAULTS["scheduler"], help="sampling scheduler (eval.generate names)")
    p.add_argument("--batch_size", type=int, default=SCORE_DEFAULTS["batch_size"], help="images per pipeline call")
    p.add_argument("--no_heldout", action="store_true",
                   help="skip the extra audit under held-out phrasings (only with the preset prompts)")
    p.add_argument("--output_dir", required=True, help="folder for summary.json, predictions.jsonl and images")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir this tool did not create")

    for name, helptext, methods, seeds, out in (
            ("bench", "erase a digit with several methods through erase/sd.py and tabulate",
             "scissorhands,esd,salun,ga,ft", "0,1,2", None),
            ("quickstart", "the whole loop offline in minutes: train if absent, erase with Scissorhands, audit "
             "before and after, print the table", "scissorhands", "0", "digits-quickstart")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--concept", required=name == "bench", default="three",
                       help="the digit(s) to erase: zero..nine or 0..9; several at once comma-separated (three,five,eight)")
        p.add_argument("--methods", default=methods, help="comma-separated erase/sd.py methods")
        p.add_argument("--seeds", default=seeds, help="comma-separated erasure seeds")
        p.add_argument("--output_dir", required=out is None, default=out,
                       help="folder for results.json, results.md, chart.png, grid_<method>.png and the runs")
        p.add_argument("--model", default=None, help="base digits model (default: the cached default, trained if absent)")
        p.add_argument("--max_train_steps", type=int, default=BENCH_DEFAULTS["max_train_steps"],
                       help="erase/sd.py steps, the same for every method")
        p.add_argument("--train_batch_size", type=int, default=BENCH_DEFAULTS["train_batch_size"],
                       help="erase/sd.py batch size of the forget and retain streams")
        p.add_argument("--num_forget_images", type=int, default=BENCH_DEFAULTS["num_forget_images"],
                       help="forget images erase/sd.py generates from the base model")
        p.add_argument("--num_retain_images", type=int, default=BENCH_DEFAULTS["num_retain_images"],
                       help="retain images erase/sd.py generates from the base model")
        p.add_argument("--num_images", type=int, default=SCORE_DEFAULTS["num_images"], help="audit images per digit")
        p.add_argument("--steps", type=int, default=SCORE_DEFAULTS["steps"], help="sampling steps (data and audit)")
        p.add_argument("--guidance", type=float, default=SCORE_DEFAULTS["guidance"], help="guidance (data and audit)")
        p.add_argument("--launcher", default="accelerate", choices=("accelerate", "python"),
                       help="run erase/sd.py under `accelerate launch` (default) or plain python")
        p.add_argument("--erase_args", default="", help="extra erase/sd.py flags for every method, as one string")
        p.add_argument("--relearn", action="store_true",
                       help="also audit each erased model by relearning (eval.attack relearn: 8 images, Adam 1e-4, all "
                            "parameters, 3 seeds, hit rate at steps 0/10/25); one erased digit only; same as --attacks relearn")
        p.add_argument("--attacks", default=None,
                       help="robustness columns: eval.attack attacks run, by name, on the base, the retrain reference and "
                            "every erased model with the same budget (e.g. relearn,unlearndiffatk,inversion); one erased "
                            "digit only")
        p.add_argument("--attack_options", default=None,
                       help="JSON overriding the attacks' budget, the same for every model: "
                            "'{\"relearn\": {\"eval_steps\": [0, 10], \"relearn_seeds\": [0, 1, 2]}}'")
        if name == "bench":
            p.add_argument("--no_retrain", action="store_true",
                           help="skip the retrain row (the base settings trained from scratch without the erased digits' "
                                "images, one model per seed, cached)")
        else:  # the quick start stays a few minutes: the retrain reference trains one more model
            p.add_argument("--retrain", dest="no_retrain", action="store_false",
                           help="add the retrain row (the base settings trained from scratch without the erased digit's "
                                "images, cached)")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir this tool did not create")
    args = parser.parse_args(input_args)
    check_numbers(args)  # every float finite and in range (erase.safety.OPTION_RANGES)

    if args.command == "retrain":
        try:
            args.digits = parse_digits(args.digits)
        except ValueError as e:
            raise UserError(str(e).replace("--concept", "--digits")) from None
        if args.seed is not None:
            check_int("--seed", args.seed, 0, 2**32 - 1)
    if args.command in ("score", "bench", "quickstart"):
        try:
            args.digits = parse_digits(args.concept)
        except ValueError as e:
            raise UserError(str(e)) from None
        args.digit = args.digits[0]
        if len(args.digits) > 1 and getattr(args, "forget_prompts", None):
            raise UserError("--forget_prompts applies to one erased digit; with several the presets' prompts are used")
        try:
            args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if not args.seeds:
            raise UserError("--seeds is empty")
        for s in args.seeds:
            check_int("--seeds", s, 0, 2**32 - 1)
    if args.command in ("bench", "quickstart"):
        from eval.digits_bench import parse_attacks

        args.attacks, args.attack_options = parse_attacks(args)
    if args.command not in ("train", "retrain"):
        for name in ("num_images", "steps", "batch_size", "max_train_steps", "train_batch_size", "num_forget_images",
                     "num_retain_images"):
            if getattr(args, name, 1) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


# ----------------------------------------------------------------------------------------------- model folders
def resolve_digits_model(model: str) -> tuple[dict, str, dict | None]:
    """(model card of the base digits model, base folder, erase_config or None) for a base or erased folder.

    Anything else is a ``UserError``: the digits judge only means something on a digits model.
    """
    path = Path(model)
    if not path.is_dir():
        raise UserError(f"model folder not found: {model}")
    erase_config = None
    base = str(path)
    if (path / "erase_config.json").is_file():
        erase_config = read_json(path / "erase_config.json", "erase config")
        base = erase_config.get("pretrained_model_name_or_path") or ""
        if not (path / "unet").is_dir():
            raise UserError(f"{model} has an erase_config.json but no unet/ folder")
    card = read_model_card(base) if base and Path(base).is_dir() else None
    if card is None:
        what = f"{model} (base {base!r})" if erase_config is not None else model
        raise UserError(f"{what} is not a digits model (no digits_model.json); train one with `python -m eval.digits train`")
    return card, base, erase_config


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
    Row seed = 1000 * s + position within the digit, so an image's seed depends only on (s, digit slot)."""
    from eval.prompts_table import PromptRow

    rows, index = [], start
    for s in seeds:
        for d, prompts in groups.items():
            for i in range(n):
                rows.append(PromptRow(index=index, prompt=prompts[i % len(prompts)], seed=1000 * s + i,
                                      meta={"digit": d, "seed_base": s}))
                index += 1
    return rows


# ----------------------------------------------------------------------------------------------- scoring
def _audit(pipe, judge, gen_cfg, rows, image_dir: Path, forget_digits: list[int]) -> tuple[dict, list[dict], np.ndarray]:
    from PIL import Image

    from eval.generate import generate

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
    from eval.digits_judge import frechet_distance, load_judge
    from eval.generate import GenerationConfig, describe, load_pipeline
    from eval.digits_model import load_digit_images

    model, card, base, erase_config, forget, retain, source = score_inputs(args)
    out = Path(args.output_dir)
    gen_cfg = GenerationConfig(model=model, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                               batch_size=args.batch_size)
    start = time.time()
    judge = load_judge()
    pipe = load_pipeline(model, scheduler=args.scheduler, dtype="fp32", device="cpu")
    real_x, real_y = load_digit_images(judge.config.resolution)
    _, real_feats = judge.predict(real_x, grey=True)
    retain_digits = sorted(retain)
    real_retain = real_feats[np.isin(real_y.numpy(), retain_digits)]

    out.mkdir(parents=True, exist_ok=True)
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
            "row_seed_rule": "1000 * seed + position of the image within its digit",
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


# ----------------------------------------------------------------------------------------------- commands
def train(args) -> Path:
    from eval.digits_model import train_digits_model

    kw = {f.name: getattr(args, f.name) for f in fields(DigitsModelConfig)}
    try:
        cfg = DigitsModelConfig(**kw)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(args.output_dir) if args.output_dir else default_model_dir(cfg)
    try:
        return train_digits_model(cfg, out, force=args.force)
    except FileExistsError as e:
        raise UserError(str(e)) from None


def retrain_config(base_model: str | None, digits, seed: int | None = None) -> DigitsModelConfig:
    """The settings of ``base_model`` (default: the default digits model's) with ``digits`` held out of training."""
    if base_model is None:
        base = DigitsModelConfig()
    else:
        card, base_dir, erase_config = resolve_digits_model(base_model)
        if erase_config is not None:
            raise UserError(f"--model {base_model} is an erased model; give the base digits model whose settings to reuse")
        try:
            base = DigitsModelConfig(**card["config"])
        except (TypeError, ValueError) as e:
            raise UserError(f"{base_dir}: its digits_model.json config is not one this version can train ({e})") from None
    changes = {"held_out_digits": tuple(digits)}
    if seed is not None:
        changes["seed"] = seed
    from dataclasses import replace

    return replace(base, **changes)


def retrain_model(base_model: str | None, digits, seed: int | None = None, output_dir: str | None = None,
                  force: bool = False, progress: bool = True) -> Path:
    """Train (or find cached) the retrain reference: the base settings without ``digits``' images."""
    from eval.digits_model import train_digits_model

    cfg = retrain_config(base_model, digits, seed)
    out = Path(output_dir) if output_dir else default_model_dir(cfg)
    try:
        return train_digits_model(cfg, out, progress=progress, force=force)
    except FileExistsError as e:
        raise UserError(str(e)) from None


def main(input_args=None) -> int:
    from eval.common import setup_logging

    setup_logging()
    args = parse_args(input_args)
    if args.command == "train":
        print(train(args))
    elif args.command == "retrain":
        print(retrain_model(args.model, args.digits, args.seed, args.output_dir, args.force))
    elif args.command == "score":
        score_inputs(args)  # inputs before outputs: a bad input leaves nothing behind
        with hold_output_dir(args.output_dir, overwrite=args.overwrite, by="eval.digits score"):
            s = score(args)
        held = s["heldout"] or {}
        logger.info("forget_acc %.3f retain_acc %.3f retain_fd %.2f%s", s["forget_acc"], s["retain_acc"],
                    s["retain_fd"] or float("nan"),
                    f" | held-out phrasings: forget_acc {held['forget_acc']:.3f} retain_acc {held['retain_acc']:.3f}"
                    if held else "")
        print(Path(args.output_dir) / "summary.json")
    elif args.command in ("bench", "quickstart"):
        if not (Path(__file__).resolve().parents[1] / "erase" / "sd.py").is_file():
            raise UserError("bench needs erase/sd.py, which this checkout does not have yet")
        from eval.digits_bench import bench

        with hold_output_dir(args.output_dir, overwrite=args.overwrite, by=f"eval.digits {args.command}"):
            bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
