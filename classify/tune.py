"""Tune unlearning hyperparameters on a validation split carved from the training set (never the test split).

For each tuning seed (disjoint from the evaluation seeds), ``validation_fraction`` of every class of D_train is
held out as the evaluation split; the protocol of ``classify.run`` runs on the rest (new forget set, original,
its own Retrain) and every point of the forget kind's grid (``classify.hparams.GRIDS``) of every method is scored by its Avg.Gap to that Retrain on the validation
split. Choice: the lowest mean Avg.Gap over tuning seeds; tie-break: means equal after rounding to 0.01 go to
fewer ``max_train_steps``, then the lower ``lr``, then grid order. The choice is merged into
``classify/tuned_<dataset>.json`` under the forget kind, with every score and the command that produced it.

    python -m classify.tune --dataset digits --forget random:0.1
    python -m classify.tune --dataset digits --forget class:3
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from erase.utils.checks import check_numbers
from erase.utils.errors import cli_errors, OneLineParser, UserError
from erase.utils.files import atomic_write_json, read_json
from erase.utils.launch import setup_logging

from .data import DataError, load_data, num_classes_of, parse_forget, stratified_split
from .hparams import GRIDS, RANDOM_GRIDS, grid_points, tuned_path
from .protocol import TrainSettings, run_seed
from .run import DEFAULT_CACHE, check_cache_dir, duplicates, parse_seeds

logger = logging.getLogger("classify.tune")
TIE_BREAK = "lowest mean Avg.Gap over tuning seeds; means equal to 0.01 -> fewer max_train_steps, then lower lr, then grid order"


@cli_errors
def parse_args(input_args=None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m classify.tune", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", help="Dataset (digits offline; cifar10, cifar100, svhn from the hub).")
    p.add_argument("--forget", default="random:0.1", help="random:F or class:K; the choice is stored under its kind.")
    p.add_argument("--methods", default=",".join(RANDOM_GRIDS), help=f"Comma-separated methods to tune; allowed: {', '.join(RANDOM_GRIDS)}.")
    p.add_argument("--tuning_seeds", default="100-102", help="Seeds of the tuning runs (list or range); keep them disjoint from evaluation seeds.")
    p.add_argument("--validation_fraction", type=float, default=0.2, help="Share of each class of D_train held out for validation.")
    p.add_argument("--output", default=None, help="Tuned-values JSON to merge into (default: classify/tuned_<dataset>.json).")
    p.add_argument("--cache_dir", default=DEFAULT_CACHE, help="Cache of trained original / retrain models.")
    p.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    args = p.parse_args(input_args)
    check_numbers(args)  # every float finite and in range (erase.utils.checks.OPTION_RANGES)
    return args


def check_output(path: Path) -> None:
    """The tuned-values file is merged into at the end of a long run: refuse, before any work, a file that is not
    one (never overwrite foreign content) and a folder that cannot be written."""
    if path.exists():
        existing = read_json(path, "tuned-values file")
        if not isinstance(existing, dict) or (existing and "dataset" not in existing):
            raise UserError(f"--output {path} is not a tuned-values file written by classify.tune; choose another path")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise UserError(f"--output {path}: {folder} is not writable")


def choose(scores: list[dict]) -> dict:
    """Apply the stated tie-break to [{"hparams", "mean"}, ...] (in grid order)."""
    key = lambda i: (round(scores[i]["mean"], 2), scores[i]["hparams"].get("max_train_steps", 0), scores[i]["hparams"].get("lr", 0.0), i)
    return scores[min(range(len(scores)), key=key)]


@cli_errors
def main(args) -> dict:
    try:
        spec = parse_forget(args.forget, num_classes_of(args.dataset))
        seeds = parse_seeds(args.tuning_seeds)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in RANDOM_GRIDS]
        if bad:
            raise DataError(f"unknown method {bad[0]!r} to tune; allowed: {', '.join(RANDOM_GRIDS)}")
        duplicates(methods, "--methods")
        check_cache_dir(args.cache_dir)
        if not 0.0 < args.validation_fraction < 1.0:
            raise DataError(f"validation fraction {args.validation_fraction} is outside (0, 1)")
        data = load_data(args.dataset)
        check_output(Path(args.output or tuned_path(args.dataset)))
    except DataError as err:
        raise UserError(str(err)) from None
    torch.set_num_threads(args.num_threads)
    accelerator = Accelerator()
    train = TrainSettings().resolved(args.dataset)
    grids = GRIDS[spec.kind]
    points = {m: grid_points(grids[m]) for m in methods}
    gaps: dict[tuple[str, int], list[float]] = {}
    start = time.perf_counter()
    for seed in seeds:
        rest, val = stratified_split(data.train.y, args.validation_fraction, seed)
        rows = {f"{m}#{i}": (m, hp) for m in methods for i, hp in enumerate(points[m])}
        out = run_seed(data, data.train.subset(rest), data.train.subset(val), spec, seed, rows, train, args.cache_dir,
                       accelerator, retrain2=False)
        for r in out:
            if "#" in r["method"]:
                m, i = r["method"].split("#")
                gaps.setdefault((m, int(i)), []).append(r["AvgGap"])
        logger.info(f"tuning seed {seed} done ({time.perf_counter() - start:.0f} s)")
    chosen, table = {}, {}
    for m in methods:
        scores = [{"hparams": hp, "mean": float(np.mean(gaps[(m, i)])), "per_seed": gaps[(m, i)]} for i, hp in enumerate(points[m])]
        best = choose(scores)
        chosen[m], table[m] = best["hparams"], scores
        logger.info(f"{m}: {best['hparams']} (validation Avg.Gap {best['mean']:.2f})")
    out_path = args.output or tuned_path(args.dataset)
    existing = read_json(out_path, "tuned-values file") if Path(out_path).exists() else {}
    previous = existing.get(spec.kind, {}).get("methods", {})
    existing["dataset"] = args.dataset
    existing[spec.kind] = {
        "methods": {**previous, **chosen},
        "tuning": {"command": "python -m classify.tune " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "forget": str(spec),
                   "tuning_seeds": seeds, "validation_fraction": args.validation_fraction, "selection": "Avg.Gap to Retrain on the validation split",
                   "tie_break": TIE_BREAK, "grids": {m: grids[m] for m in methods}, "scores": table, "train": vars(train),
                   "seconds": time.perf_counter() - start},
    }
    atomic_write_json(out_path, existing)
    logger.info(f"wrote {out_path}")
    return existing


if __name__ == "__main__":
    setup_logging()
    main(parse_args())
