"""`python -m eval.shapes`: the command line of the shapes benchmark (train, retrain, score, bench, quickstart).

The library is in the package's modules: ``world`` / ``render`` (scenes and their pixels), ``tokenizer`` (SD's
CLIP tokenizer, offline), ``model`` / ``train`` (the text-to-image model), ``judges``, ``concepts`` (prompts),
``score`` (the audit of one model), ``bench`` (erase with several methods and tabulate), ``retrain``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import fields
from pathlib import Path

from erase.utils.errors import cli_errors, OneLineParser, UserError
from erase.utils.checks import check_int, check_int_list, check_numbers
from erase.utils.folders import hold_output_dir
from eval.attack.utils.columns import add_attack_args
from eval.shapes.model import ShapesModelConfig, default_model_dir
from eval.shapes.world import parse_concepts

logger = logging.getLogger("eval.shapes")

BENCH_DEFAULTS = dict(max_train_steps=100, train_batch_size=16, num_forget_images=64, num_retain_images=64)
COUNT_OPTIONS = ("num_images", "steps", "batch_size", "max_train_steps", "train_batch_size", "num_forget_images",
                 "num_retain_images")


def _add_config_args(parser, cls) -> None:
    for f in fields(cls):
        if f.name == "held_out":  # retrain's --concepts
            continue
        default = f.default
        kw = dict(default=default, help=f"{f.metadata.get('help', '')} (default: {default})")
        kw.update(type=int, nargs="+") if isinstance(default, tuple) else kw.update(type=type(default))
        parser.add_argument(f"--{f.name}", **kw)


def _audit_args(p, score_defaults) -> None:
    p.add_argument("--num_images", type=int, default=score_defaults["num_images"],
                   help="images per audit group and seed (retain: 3x), spread over the group's prompts")
    p.add_argument("--steps", type=int, default=score_defaults["steps"], help="DDIM sampling steps")
    p.add_argument("--guidance", type=float, default=score_defaults["guidance"], help="classifier-free guidance")


def read_concepts(text: str, flag: str = "--concept") -> list[str]:
    """A comma-separated list of concepts, ``many:N`` (:func:`eval.shapes.concepts.mixed_concepts`: shapes, colours and
    textures) or ``pairs:N`` (:func:`eval.shapes.concepts.compound_concepts`: "red star"...); ValueError if bad."""
    from eval.shapes.concepts import compound_concepts, mixed_concepts

    draw = {"many": mixed_concepts, "pairs": compound_concepts}
    head, sep, count = str(text).strip().lower().partition(":")
    if sep and head in draw:
        if not count.isdigit():
            raise ValueError(f"{flag} {text!r}: {head}:N takes a whole number of concepts, e.g. {head}:10")
        return parse_concepts(",".join(draw[head](int(count))), flag)
    return parse_concepts(text, flag)


@cli_errors
def parse_args(input_args=None):
    from eval.shapes.score import SCORE_DEFAULTS

    parser = OneLineParser(prog="python -m eval.shapes", description="The shapes benchmark: an offline compositional "
                           "text-to-image world with ground truth, judges and a retrain reference.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("train", help="train the shapes text-to-image model (cached by its settings)")
    p.add_argument("--output_dir", default=None, help="pipeline folder (default: $ERASE_CACHE/shapes/model-<settings hash>)")
    p.add_argument("--force", action="store_true", help="retrain even if a model with these settings exists")
    _add_config_args(p, ShapesModelConfig)

    p = sub.add_parser("retrain", help="train the shapes model from scratch without every scene of some concepts: "
                                       "the reference an erasure is compared with (cached)")
    p.add_argument("--concepts", required=True, help="the concept(s) to leave out, comma-separated (star,red,striped)")
    p.add_argument("--model", default=None, help="base shapes model whose settings are reused (default: the default settings)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the base model's)")
    p.add_argument("--output_dir", default=None, help="pipeline folder (default: $ERASE_CACHE/shapes/model-<hash>)")
    p.add_argument("--force", action="store_true", help="retrain even if a model with these settings exists")

    p = sub.add_parser("score", help="audit a shapes model (base, retrain or erase/sd.py output) with the judges")
    p.add_argument("--model", default=None, help="shapes pipeline folder or erase/sd.py output dir (default: the cached default)")
    p.add_argument("--concept", required=True, help="the erased concept(s): a shape, colour or texture, several comma-separated")
    _audit_args(p, SCORE_DEFAULTS)
    p.add_argument("--seeds", default="0", help="comma-separated audit seeds; each adds num_images per group")
    p.add_argument("--scheduler", default=SCORE_DEFAULTS["scheduler"],
                   help="sampler (erase.diffusion.generate names; default: the family's own, ddim for the UNet model, flow_euler for sd3)")
    p.add_argument("--batch_size", type=int, default=SCORE_DEFAULTS["batch_size"], help="images per pipeline call")
    p.add_argument("--output_dir", required=True, help="folder for summary.json, predictions.jsonl and images")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir this tool did not create")

    for name, helptext, methods, seeds, out in (
            ("bench", "erase a concept with several methods through erase/sd.py and tabulate", "scissorhands,esd,salun,ga,ft",
             "0,1,2", None),
            ("quickstart", "the whole loop offline: train if absent, erase star with Scissorhands, audit before and "
                           "after, table, chart and grids", "scissorhands", "0", "shapes-quickstart")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--concept", required=name == "bench", default="star", help="the concept to erase (a shape, colour or "
                       "texture)" + ("; a compound colour + shape (\"red star\"); several comma-separated, many:N (N concepts "
                                     "mixed over the kinds, at most 24) or pairs:N (N compounds, at most 60) are erased "
                                     "together in one run" if name == "bench" else ""))
        p.add_argument("--methods", default=methods, help="comma-separated erase/sd.py methods; an entry may add flags of its own: scissorhands+robust")
        p.add_argument("--seeds", default=seeds, help="comma-separated erasure seeds")
        p.add_argument("--output_dir", required=out is None, default=out, help="folder for results.json, results.md, "
                       "chart.png, grid_<row>.png and the runs")
        p.add_argument("--model", default=None, help="base shapes model (default: the cached default, trained if absent)")
        for opt, helptext2 in (("max_train_steps", "erase/sd.py steps, the same for every method"),
                               ("train_batch_size", "erase/sd.py batch size of the forget and retain streams"),
                               ("num_forget_images", "forget images erase/sd.py generates from the base model"),
                               ("num_retain_images", "retain images erase/sd.py generates from the base model")):
            p.add_argument(f"--{opt}", type=int, default=BENCH_DEFAULTS[opt], help=helptext2)
        _audit_args(p, SCORE_DEFAULTS)
        p.add_argument("--launcher", default="accelerate", choices=("accelerate", "python"),
                       help="run erase/sd.py under `accelerate launch` (default) or plain python")
        p.add_argument("--erase_args", default="", help="extra erase/sd.py flags for every method, as one string")
        add_attack_args(p)
        if name == "bench":
            p.add_argument("--no_retrain", action="store_true", help="skip the retrain row (the base settings trained "
                           "without the concept's scenes, one model per seed, cached; ~45 CPU minutes each)")
            p.add_argument("--retrain_seeds", default=None, help="comma-separated seeds of the retrain row, among --seeds "
                           "(default: every one): a model per seed is ~45 CPU minutes, so a reference may cover fewer seeds")
        else:
            p.add_argument("--retrain", dest="no_retrain", action="store_false",
                           help="add the retrain row (one more model to train, ~45 CPU minutes, cached)")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir this tool did not create")
    args = parser.parse_args(input_args)
    check_numbers(args)  # every float finite and in range (erase.utils.checks.OPTION_RANGES)

    if args.command == "retrain":
        try:
            args.concepts = read_concepts(args.concepts, "--concepts")
        except ValueError as e:
            raise UserError(str(e)) from None
        if args.seed is not None:
            check_int("--seed", args.seed, 0, 2**32 - 1)
    if args.command in ("score", "bench", "quickstart"):
        try:
            args.concepts = read_concepts(args.concept)
        except ValueError as e:
            raise UserError(str(e)) from None
        if args.command == "quickstart" and len(args.concepts) > 1:
            raise UserError(f"--concept {args.concept!r}: quickstart erases one concept; bench erases several at once")
        args.seeds = check_int_list("--seeds", args.seeds, 0, 9999)  # audit image seeds are 10**8 + 10**6 * seed + ...: distinct per seed
    if args.command in ("bench", "quickstart"):
        from eval.attack.utils.columns import parse_attacks

        args.attacks, args.attack_options = parse_attacks(args, len(args.concepts))
        if args.attacks and " " in args.concepts[0]:
            raise UserError(f"--attacks audit a shape, colour or texture; the compound {args.concepts[0]!r} has no judge")
    if getattr(args, "retrain_seeds", None) is not None:
        if args.no_retrain:
            raise UserError("--retrain_seeds chooses the retrain row's seeds; drop --no_retrain or --retrain_seeds")
        from eval.attack.utils.config import int_list

        args.retrain_seeds = list(int_list(args.retrain_seeds, "retrain_seeds"))  # integers, none repeated, not empty
        stray = [s for s in args.retrain_seeds if s not in args.seeds]
        if stray:
            raise UserError(f"--retrain_seeds {stray[0]} is not among --seeds {','.join(map(str, args.seeds))}: "
                            "the retrain row pairs with the methods' seeds")
    if args.command != "train":
        for name in COUNT_OPTIONS:
            if getattr(args, name, 1) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if getattr(args, "num_images", 1) > 3000:
            raise UserError(f"--num_images {args.num_images} is above 3000 (the retain group holds 3x, at most 10,000)")
    return args


def train(args) -> Path:
    from eval.shapes.train import train_shapes_model

    kw = {f.name: getattr(args, f.name) for f in fields(ShapesModelConfig) if f.name != "held_out"}
    try:
        cfg = ShapesModelConfig(**kw)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(args.output_dir) if args.output_dir else default_model_dir(cfg)
    try:
        return train_shapes_model(cfg, out, force=args.force)
    except (FileExistsError, ValueError) as e:
        raise UserError(str(e)) from None


@cli_errors
def main(input_args=None) -> int:
    from erase.utils.launch import setup_logging

    setup_logging()
    args = parse_args(input_args)
    if args.command == "train":
        print(train(args))
    elif args.command == "retrain":
        from eval.shapes.retrain import retrain_model

        print(retrain_model(args.model, args.concepts, args.seed, args.output_dir, args.force))
    elif args.command == "score":
        from eval.shapes.score import score, score_inputs

        score_inputs(args)  # inputs before outputs: a bad input leaves nothing behind
        with hold_output_dir(args.output_dir, overwrite=args.overwrite, by="eval.shapes score", base=args.model,
                             base_what="the scored model"):
            s = score(args)
        logger.info("forget %.3f (held-out %.3f) neighbour %.3f cooccur %.3f composition %.3f retain %.3f FD %.2f",
                    *(s[k] if s[k] is not None else float("nan") for k in (
                        "forget_acc", "forget_heldout_acc", "neighbour_acc", "cooccur_acc", "composition_acc",
                        "retain_acc", "retain_fd")))
        print(Path(args.output_dir) / "summary.json")
    else:
        if not (Path(__file__).resolve().parents[2] / "erase" / "sd.py").is_file():
            raise UserError("bench needs erase/sd.py, which this checkout does not have")
        from eval.shapes.bench import bench, check_methods

        check_methods(args)
        with hold_output_dir(args.output_dir, overwrite=args.overwrite, by=f"eval.shapes {args.command}"):
            bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
