"""The relearn attack on real digits models: hit-rate curves and seconds, one row per model.

    # an erased model to attack (GA relearns fast), then the audit of it and of the base:
    accelerate launch erase/sd.py --pretrained_model_name_or_path <digits model> --concept three --method ga \
        --lr 1e-4 --max_train_steps 100 --train_batch_size 16 --num_forget_images 64 --num_retain_images 192 \
        --num_inference_steps 20 --guidance_scale 4 --seed 0 --output_dir /tmp/attack/ga-three
    OMP_NUM_THREADS=1 python benchmarks/attack_relearn.py --models base,ga=/tmp/attack/ga-three --concept three \
        --output_dir /tmp/attack/bench

``base`` is the default digits model (eval.digits.model.default_model_dir); it has no erase config, so its
targets-only curve uses ``--base_targets`` (default xattn, erase/sd.py's default). Each audit runs in-process
through ``eval.attack.relearn_audit`` with the defaults (8 images, Adam 1e-4, batch 8, seeds 0,1,2, steps
0/10/25/50/100, 40 images per check) unless flags say otherwise; a rerun resumes finished cells. Writes
OUTPUT_DIR/<name>/summary.json per model and OUTPUT_DIR/relearn_bench.json, and prints a markdown table.

Where does the concept come back through? ``--split REGEX`` relearns, for each model, only the tensors whose names
match REGEX (``inside``) and, separately, only every other UNet tensor (``outside``), instead of all / targets; with
``--target_images`` (a robust_digits.py output's ``<digit>/base-concept-images/relearn``) on the same images as the
robustness bench (RESULTS.md, "Where relearning comes back through"):

    OMP_NUM_THREADS=1 python benchmarks/attack_relearn.py --concept seven --split '.*\\.attn[12]\\..*' --eval_steps 0,10,25 \
        --target_images OUT/seven/base-concept-images/relearn --output_dir /tmp/routes \
        --models plain=OUT/seven/runs/plain-seed0,RA2=OUT/seven/runs/RA2-seed0,retrain=<retrain model>
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from erase.utils.errors import UserError, cli_errors  # noqa: E402


@cli_errors
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="base", help="comma-separated NAME=PATH (or 'base' for the default digits model)")
    p.add_argument("--concept", default="three", help="the erased concept (a digit word)")
    p.add_argument("--output_dir", required=True, help="one audit folder per model, plus relearn_bench.json")
    p.add_argument("--base_targets", default="xattn", help="targets of the base model's targets-only curve")
    p.add_argument("--num_images", type=int, default=None, help="images per check (default: the judge's, 40)")
    p.add_argument("--relearn_seeds", default="0,1,2", help="relearning seeds")
    p.add_argument("--eval_steps", default="0,10,25,50,100", help="checked relearning steps")
    p.add_argument("--target_images", default=None, help="relearn on these images of the concept (default: drawn by the base)")
    p.add_argument("--check_prompts", default=None, help="file of prompts the checks draw from, one a line (default: the "
                                                         "concept's forget prompts); e.g. other concepts' prompts, to see "
                                                         "whether relearning brings the concept back everywhere")
    p.add_argument("--split", default=None, help="regex: relearn only the matching tensors (inside) and only the others "
                                                 "(outside) instead of all / targets")
    a = p.parse_args(argv)
    check_args(a)
    return a


def check_args(a) -> None:
    """Every check before an audit starts: the digit, the counts, the seed and step lists, --split, and --models
    (each NAME once: it names the audit folder; each PATH a folder)."""
    import re

    from benchmarks.inputs import check_counts, check_folder_path, name_list
    from erase.utils.checks import check_int_list
    from eval.digits.model import DIGIT_WORDS

    if a.concept not in DIGIT_WORDS:
        raise UserError(f"--concept {a.concept!r} is not a digit word; choose from {', '.join(DIGIT_WORDS)}")
    check_counts(a, num_images=1)
    check_int_list("--relearn_seeds", a.relearn_seeds)
    check_int_list("--eval_steps", a.eval_steps, lo=0, hi=10**6)
    if a.split is not None:
        try:
            re.compile(a.split)
        except re.error as e:
            raise UserError(f"--split {a.split!r} is not a valid regex: {e}") from None
    names = []
    for item in name_list("--models", a.models, what="NAME=PATH item"):
        name, sep, path = item.partition("=")
        if not name or name in names or (sep and "/" in name) or Path(name).is_absolute():
            raise UserError(f"--models item {item!r}: each NAME once, relative, without '/' in NAME=PATH (it names the "
                            "audit folder under --output_dir)")
        if (path or name != "base") and not Path(path or name).is_dir():
            raise UserError(f"--models item {item!r}: {path or name} is not a model folder")
        names.append(name)
    check_folder_path("--output_dir", a.output_dir)


@cli_errors
def main(argv=None) -> dict:
    import torch

    from eval.attack import relearn_audit
    from erase.utils.launch import setup_logging
    from eval.digits.model import default_model_dir

    setup_logging()
    args = parse_args(argv)
    out = Path(args.output_dir)
    rows = []
    for item in [m.strip() for m in args.models.split(",") if m.strip()]:
        name, _, path = item.partition("=")
        path = path or (str(default_model_dir()) if name == "base" else name)
        opts = dict(relearn_seeds=args.relearn_seeds, eval_steps=args.eval_steps)
        if args.num_images:
            opts["num_images"] = args.num_images
        if args.target_images:
            opts["target_images"] = args.target_images
        if args.check_prompts:
            opts["forget_prompts"] = args.check_prompts
        if not (Path(path) / "erase_config.json").is_file():
            opts["targets"] = args.base_targets
        t0, c0 = time.perf_counter(), time.process_time()
        if args.split:  # two targets-only audits: the matching tensors, then every other one (the attack's --exclude)
            curves = {label: relearn_audit(path, args.concept, out / name / label, **opts, relearn_params="targets",
                                           targets=spec, exclude=exclude)["relearn_targets"]
                      for label, spec, exclude in (("inside", args.split, None), ("outside", "all", args.split))}
            done = {"computed_cells": None, "target_images_judged": None}
        else:
            s = relearn_audit(path, args.concept, out / name, **opts)
            curves = {"relearn": s["relearn"], "relearn_targets": s["relearn_targets"]}
            done = {"computed_cells": s["seconds"]["computed_cells"], "target_images_judged": s["target_images_judged"]}
        rows.append({"name": name, "model": path, "wall_s": round(time.perf_counter() - t0, 1),
                     "cpu_s": round(time.process_time() - c0, 1), **done, **curves})
    result = {"date": str(date.today()), "machine": platform.platform(), "torch_threads": torch.get_num_threads(),
              "concept": args.concept, "split": args.split, "target_images": args.target_images,
              "check_prompts": args.check_prompts, "rows": rows}
    from erase.utils.files import atomic_write_json

    atomic_write_json(out / "relearn_bench.json", result)
    labels = (("inside", "inside"), ("outside", "outside")) if args.split else (("relearn", "all"), ("relearn_targets", "targets"))
    steps = rows[0][labels[0][0]]["steps"] if rows else []

    def curve(c):
        return " | ".join(f"{100 * m:.0f} ± {100 * d:.0f}" for m, d in zip(c["hit_rate"], c["hit_rate_std"]))

    print(f"\nrelearn attack on {args.concept}: hit rate % (mean ± std over seeds {args.relearn_seeds}) at steps "
          f"{steps}; torch threads {result['torch_threads']}\n")
    print("| model | params | " + " | ".join(f"step {s}" for s in steps) + " | first > 50 % | wall s | CPU s |")
    print("|---" * (len(steps) + 5) + "|")
    for r in rows:
        for i, (key, label) in enumerate(labels):
            c = r[key]
            if c is None:
                continue
            spec = "" if label == "all" else f" ({c['params']['spec']}: {c['params']['num_parameters']:,} parameters)"
            print(f"| {r['name']} | {label}{spec} | {curve(c)} | {c['first_step_over_50']} | "
                  f"{r['wall_s'] if i == 0 else ''} | {r['cpu_s'] if i == 0 else ''} |")
    return result


if __name__ == "__main__":
    main()
