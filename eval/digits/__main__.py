"""`python -m eval.digits`: the command line of the digits benchmark (train, score, bench, quickstart).

The library is in the package's modules: ``model`` (the tiny text-to-image model), ``judge`` (the digit CNN),
``score`` (the audit of one model), ``bench`` (erase with several methods and tabulate).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

from erase.utils.errors import cli_errors, UserError
from erase.utils.checks import check_int, check_int_list, check_numbers
from erase.utils.folders import hold_output_dir
from eval.attack.utils.columns import add_attack_args
from eval.digits.model import DENOISERS, DigitsModelConfig, default_model_dir, parse_digits
from eval.digits.score import BENCH_DEFAULTS, SCORE_DEFAULTS, score, score_inputs

logger = logging.getLogger("eval.digits")

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


@cli_errors
def parse_args(input_args=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.digits", description="The digits benchmark: a concept erasure anyone can run and check on a laptop CPU.")
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
    p.add_argument("--scheduler", default=SCORE_DEFAULTS["scheduler"], help="sampling scheduler (erase.diffusion.generate names; default: the model family's own, ddim for the UNet "
                        "digits model, flow_euler for the sd3 one)")
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
        p.add_argument("--denoiser", default="unet",
                       help=f"{' or '.join(DENOISERS)}; without --model: the default digits model of this kind (unet: SD v1.4's kind; sd3: the "
                            "SD3-kind transformer trained with rectified flow), trained if absent")
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
                            "parameters, 3 seeds, hit rate at steps 0/10/25/50/100); one erased digit only; same as "
                            "--attacks relearn")
        add_attack_args(p, unit="digit")
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
    check_numbers(args)  # every float finite and in range (erase.utils.checks.OPTION_RANGES)

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
        args.seeds = check_int_list("--seeds", args.seeds, 0, 2**32 - 1)
    if args.command in ("bench", "quickstart"):
        from eval.digits.bench import parse_attacks

        if args.denoiser not in DENOISERS:
            raise UserError(f"unknown --denoiser {args.denoiser!r}; choose one of: {', '.join(DENOISERS)}")
        if args.model and args.denoiser != "unet":
            raise UserError(f"--denoiser {args.denoiser} picks the default model; with --model the model's own denoiser is used")

        args.attacks, args.attack_options = parse_attacks(args)
    if args.command not in ("train", "retrain"):
        for name in ("num_images", "steps", "batch_size", "max_train_steps", "train_batch_size", "num_forget_images",
                     "num_retain_images"):
            if getattr(args, name, 1) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


# ----------------------------------------------------------------------------------------------- commands
def train(args) -> Path:
    from eval.digits.model import train_digits_model

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


@cli_errors
def main(input_args=None) -> int:
    from erase.utils.launch import setup_logging

    setup_logging()
    args = parse_args(input_args)
    if args.command == "train":
        print(train(args))
    elif args.command == "retrain":
        from eval.digits.retrain import retrain_model

        print(retrain_model(args.model, args.digits, args.seed, args.output_dir, args.force))
    elif args.command == "score":
        score_inputs(args)  # inputs before outputs: a bad input leaves nothing behind
        with hold_output_dir(args.output_dir, overwrite=args.overwrite, by="eval.digits score", base=args.model,
                             base_what="the scored model"):
            s = score(args)
        held = s["heldout"] or {}
        logger.info("forget_acc %.3f retain_acc %.3f retain_fd %.2f%s", s["forget_acc"], s["retain_acc"],
                    s["retain_fd"] or float("nan"),
                    f" | held-out phrasings: forget_acc {held['forget_acc']:.3f} retain_acc {held['retain_acc']:.3f}"
                    if held else "")
        print(Path(args.output_dir) / "summary.json")
    elif args.command in ("bench", "quickstart"):
        if not (Path(__file__).resolve().parents[2] / "erase" / "sd.py").is_file():
            raise UserError("bench needs erase/sd.py, which this checkout does not have yet")
        from eval.digits.bench import bench

        with hold_output_dir(args.output_dir, overwrite=args.overwrite, by=f"eval.digits {args.command}"):
            bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
