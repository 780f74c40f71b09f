"""The shapes world's own figures: training time of the model, judge accuracies, and the base model's audit.

    python benchmarks/shapes_base.py --concepts star,red,striped --guidance 4 --output_dir OUT

Trains the default shapes model if absent (its card has the wall and CPU seconds), loads the five judges (their
cards have the held-out test accuracy), and runs ``eval.shapes score`` on the **base** model for each concept and
guidance: per judge the base's accuracy on its own generations (``attribute_acc``), and every column. Several
``--guidance`` values give the rule for the audit's guidance (docs/SHAPES.md): on the tuning concepts only, the
highest mean of retain and composition accuracy. Writes ``OUT/base.json`` and ``OUT/base.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erase.utils.errors import UserError, cli_errors  # noqa: E402

COLUMNS = ("forget_acc", "forget_heldout_acc", "neighbour_acc", "cooccur_acc", "composition_acc", "retain_acc",
           "retain_heldout_acc", "retain_fd")


@cli_errors
def main(argv=None) -> dict:
    from benchmarks.inputs import check_counts, check_number, check_folder_path, name_list
    from erase.utils.checks import OPTION_RANGES
    from erase.utils.files import atomic_write_json, atomic_write_text
    from erase.utils.launch import setup_logging
    from eval.shapes.judges import load_judges
    from eval.shapes.model import ShapesModelConfig, default_model_dir, read_model_card
    from eval.shapes.score import SCORE_DEFAULTS, score
    from eval.shapes.train import train_shapes_model
    from eval.shapes.world import parse_concepts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="shapes model (default: the default one, trained if absent)")
    p.add_argument("--concepts", default="star,red,striped", help="audits to run on the base, one per concept")
    p.add_argument("--guidance", default=str(SCORE_DEFAULTS["guidance"]), help="comma-separated guidance scales")
    p.add_argument("--num_images", type=int, default=SCORE_DEFAULTS["num_images"])
    p.add_argument("--steps", type=int, default=SCORE_DEFAULTS["steps"])
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    try:  # every check before the model is trained or an audit runs
        concepts = parse_concepts(args.concepts, "--concepts")
    except ValueError as e:
        raise UserError(str(e) if str(e).startswith("--concepts") else f"--concepts {args.concepts!r}: {e}") from None
    guidances = name_list("--guidance", args.guidance, what="guidance scale")
    guidances = [check_number("--guidance", g, OPTION_RANGES["guidance"]) for g in guidances]
    if len(set(guidances)) != len(guidances):
        raise UserError(f"--guidance {args.guidance!r} names a scale twice; each may appear once")
    check_counts(args, num_images=1, steps=1)
    if args.model is not None and not Path(args.model).is_dir():
        raise UserError(f"--model {args.model!r} is not a folder (give a shapes model folder, or leave it out for the default)")
    check_folder_path("--output_dir", args.output_dir)
    setup_logging()
    model = Path(args.model) if args.model else train_shapes_model(ShapesModelConfig(), default_model_dir())
    card = read_model_card(model)
    judges = load_judges(progress=True)
    out = Path(args.output_dir)
    result = {"model": str(model), "fingerprint": card["fingerprint"],
              "training": {k: card[k] for k in ("train_seconds", "train_cpu_seconds", "train_user_cpu_seconds",
                                                "render_seconds", "torch_threads", "vae_reconstruction_mse", "final_unet_loss")},
              "judges": judges.describe(), "audits": {}}
    for g in guidances:
        for c in concepts:
            ns = SimpleNamespace(model=str(model), concepts=[c], num_images=args.num_images, seeds=[0], steps=args.steps,
                                 guidance=g, scheduler=None, batch_size=SCORE_DEFAULTS["batch_size"],
                                 output_dir=str(out / f"g{g:g}" / c))
            s = score(ns, judges=judges)
            result["audits"][f"{c} g{g:g}"] = {**{k: s[k] for k in COLUMNS}, "attribute_acc": s["attribute_acc"],
                                               "composition": s["composition"], "per_concept_acc": s["per_concept_acc"],
                                               "seconds": s["seconds"]}
    atomic_write_json(out / "base.json", result)
    atomic_write_text(out / "base.md", markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    t = r["training"]
    lines = [f"Model `{r['fingerprint']}`: trained in {t['train_seconds']:.0f} s wall, {t['train_cpu_seconds']:.0f} s CPU "
             f"({t['train_user_cpu_seconds']:.0f} s user), {t['torch_threads']} torch thread(s); autoencoder MSE "
             f"{t['vae_reconstruction_mse']:.4f}.", "", "| judge | test acc | augmented | n test |", "|---|---|---|---|"]
    for name, j in r["judges"].items():
        lines.append(f"| {name} | {100 * j['test_accuracy']:.2f} | {100 * j['test_accuracy_augmented']:.2f} | {j['n_test']} |")
    lines += ["", "| base audit | " + " | ".join(COLUMNS) + " | object | colour | texture | count | relation |",
              "|---|" + "---|" * (len(COLUMNS) + 5)]
    for name, a in r["audits"].items():
        cells = [f"{a[k]:.2f}" if k == "retain_fd" else f"{100 * a[k]:.1f}" for k in COLUMNS]
        cells += [f"{100 * a['attribute_acc'][k]:.1f}" if a["attribute_acc"][k] is not None else "–"
                  for k in ("object", "colour", "texture", "count", "relation")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
