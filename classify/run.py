"""Classification unlearning benchmark: every method against its seed's Retrain, over many seeds.

    python -m classify.run --dataset digits --forget random:0.1 \
        --methods retrain,ft,ga,salun,l1sparse,scissorhands --seeds 0-9 --output_dir DIR

Writes ``DIR/results.json`` (``{"methods": {NAME: {"UA": {"mean", "std", "median"}, ...}}, "settings": {...}}``),
``DIR/per_seed.json`` (every row of every seed), ``DIR/results.md`` (mean ± std table, medians, collapsed runs,
paired differences against Scissorhands) and ``DIR/chart.png`` (forgetting vs. utility per method).
Rows ``original`` (no unlearning) and ``retrain2`` (a second retrain from another init: the noise floor) are added
automatically, and with Scissorhands its ablations (``scissorhands_no_trim``, ``_no_projection``, ``_no_forget``).
Hyperparameters come from ``classify/tuned_<dataset>.json`` (chosen by ``python -m classify.tune`` on a
validation split) unless overridden here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import logging
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from erase.core import available_methods, get_method_class
from erase.core.options import add_method_options, option_names
from erase.core.topk import TopKError
from erase.utils.checks import check_numbers, FLOAT32_MAX, SEED_MAX
from erase.utils.folders import claim_output_dir
from erase.utils.errors import cli_errors, OneLineParser, UserError
from erase.utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from erase.utils.launch import setup_logging

from .adapter import ClassifierAdapter
from .data import DATASETS, DataError, forget_indices, load_data, num_classes_of, parse_forget
from .hparams import load_hparams, tuned_path
from .metrics import METRICS, MIA_SVC, summary
from .protocol import TrainSettings, run_seed

logger = logging.getLogger("classify.run")

DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "scissorhands-erase", "classify")
ABLATIONS = ("no_trim", "no_projection", "no_forget")
# Config fields this benchmark sets itself (ablation rows, Retrain's seeded init): not command-line options here.
CLASSIFY_OWN = ("ablation", "init_seed")
COLLAPSE_DROP = 20.0  # a run is "collapsed" when its TA falls this many points below its seed's Retrain
SUMMARY_KEYS = (*METRICS, "AvgGap", "RTE", "RTE_ratio")


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-9`` (inclusive) or a mix: ``0-4,7``."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise DataError(f"seeds {text!r} are not a list (0,1,2) or a range (0-9) of non-negative integers") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise DataError(f"seeds {text!r} must be distinct non-negative integers, e.g. 0-9 or 0,1,2")
    if max(seeds) > SEED_MAX:
        raise DataError(f"seed {max(seeds)} is above {SEED_MAX} (seeds go to numpy's generator, which takes 32 bits)")
    return seeds


@cli_errors
def parse_args(input_args=None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m classify.run", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", help=f"One of {', '.join(DATASETS)} (digits is offline).")
    p.add_argument("--forget", default="random:0.1", help="random:F (a random fraction F of D_train) or class:K (every example of class K).")
    p.add_argument("--methods", default="retrain,ft,ga,salun,l1sparse,scissorhands", help="Comma-separated unlearning methods.")
    p.add_argument("--seeds", default="0-9", help="Evaluation seeds: a list 0,1,2 or a range 0-9.")
    p.add_argument("--output_dir", required=True, help="Where results.json, per_seed.json, results.md and chart.png go.")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help=f"Scissorhands ablation rows ({', '.join(ABLATIONS)}); 'none' for none.")
    p.add_argument("--hparams", default=None, help="Tuned hyperparameter JSON (default: classify/tuned_<dataset>.json).")
    p.add_argument("--max_train_steps", type=int, default=None, help="Override every method's steps (quick runs).")
    p.add_argument("--ref_epochs", type=int, default=None, help="Override the epochs of original / retrain training (quick runs).")
    p.add_argument("--batch_size", type=int, default=64, help="Batch size of the forget and retain streams.")
    p.add_argument("--cache_dir", default=DEFAULT_CACHE, help="Cache of trained original / retrain models (safetensors + JSON).")
    p.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (small models run fastest on one).")
    p.add_argument("--overwrite", action="store_true", help="Write into a non-empty --output_dir this tool did not create.")
    # Every method's options, from its config dataclass; a set option applies to each method of --methods that has it.
    p.epilog = ("A method option overrides the tuned value for every method of --methods that has it "
                "(e.g. --alpha for salun and l1sparse); one that no chosen method has is an error.")
    add_method_options(p, "classify", exclude=CLASSIFY_OWN)
    args = p.parse_args(input_args)
    # Non-finite / huge values first, with their real range (the method configs below word the in-range check).
    check_numbers({k: v for k, v in vars(args).items() if isinstance(v, float) and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX)})
    try:
        method_overrides(args)  # an option of no chosen method, or a value its config refuses: before any work
        if args.trim_only is not None:
            re.compile(args.trim_only)
    except re.error as err:
        raise UserError(f"--trim_only {args.trim_only!r} is not a valid regex: {err}") from None
    check_numbers(args)  # every float finite and in range (erase.utils.checks.OPTION_RANGES)
    return args


def method_overrides(args) -> dict[str, dict]:
    """Method -> the options set on the command line that it has; an option that no method of ``--methods`` has, or
    a value a method's config refuses, is a ``UserError``."""
    chosen = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() in available_methods("classify")]
    names = {m: [n for n in option_names(m, "classify") if n not in CLASSIFY_OWN] for m in available_methods("classify")}
    set_ = {n for ns in names.values() for n in ns if getattr(args, n, None) is not None}
    out = {m: {n: getattr(args, n) for n in names[m] if n in set_} for m in chosen}
    for n in sorted(set_ - {k for o in out.values() for k in o}):
        owners = sorted(m for m, ns in names.items() if n in ns)
        raise UserError(f"--{n} is an option of {', '.join(owners)}, none of which is in --methods {args.methods}")
    for m, kw in out.items():
        check_forget_loss(kw.get("forget_loss"), f"--forget_loss (of {m})")
        try:
            get_method_class(m, "classify").config_cls(**kw)
        except (TypeError, ValueError) as err:
            raise UserError(f"--methods {m}: {err}") from None
    return out


def check_forget_loss(value, name: str) -> None:
    """A forget term the classification adapter has (the method configs take any string; the adapter refuses it only
    mid-run)."""
    kinds = ClassifierAdapter.forget_kinds
    if value is not None and value not in kinds:
        raise UserError(f"{name} {value!r} is not a classification forget term; allowed: {', '.join(kinds)}")


def duplicates(items: list[str], flag: str) -> None:
    """A one-line error naming the first item given twice in a comma-separated flag."""
    seen = set()
    for item in items:
        if item in seen:
            raise DataError(f"{flag}: {item!r} is given twice; name each once")
        seen.add(item)


def check_cache_dir(path) -> None:
    """``--cache_dir`` is a folder or can be made one: neither it nor a parent is a file."""
    if str(path).strip() == "":
        raise DataError("--cache_dir is empty; give a folder for the trained reference models")
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise DataError(f"--cache_dir {str(path)!r}: {str(p)!r} is a file, not a folder; give a folder for the trained reference models")


def check_hparams_file(path: str, spec) -> None:
    """A ``--hparams`` file the user named must hold tuned values for the run's forget kind (as written by
    ``python -m classify.tune``): never a silent fallback to the built-in values."""
    kind = spec.kind
    shape = f"{{{kind!r}: {{'methods': {{method: {{name: value}}}}}}}} (as written by python -m classify.tune)"
    if not str(path).strip():
        raise DataError("--hparams is empty; give a tuned-values JSON file, or leave --hparams out for classify/tuned_<dataset>.json")
    if not Path(path).is_file():
        raise DataError(f"hyperparameter file {path!r} does not exist" if not Path(path).exists()
                        else f"hyperparameter file {path!r} is not a file")
    content = read_json(path, "hyperparameter file")
    if not isinstance(content, dict):
        raise DataError(f"hyperparameter file {path!r} holds no JSON object; it needs {shape}")
    entry = content.get(kind)
    if entry is None:
        keys = [repr(k) for k in content]
        has = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "") if keys else "none"
        raise DataError(f"hyperparameter file {path!r} has no {kind!r} entry for --forget {spec} (its entries: {has}); it needs {shape}")
    methods = entry.get("methods") if isinstance(entry, dict) else None
    if not isinstance(methods, dict) or not methods or not all(isinstance(h, dict) for h in methods.values()):
        raise DataError(f"hyperparameter file {path!r}: entry {kind!r} has no tuned methods; it needs {shape}")
    for m, hp in methods.items():
        check_forget_loss(hp.get("forget_loss"), f"hyperparameter file {path!r}: {m}: forget_loss")


def check_hparams(rows: dict[str, tuple[str, dict]]) -> None:
    """Every row's hyperparameters are options of its method or of the engine, finite and in range, and build."""
    from erase.core import EngineConfig, get_method_class

    from .protocol import ENGINE_FIELDS

    for name, (method, hp) in rows.items():
        if not isinstance(hp, dict):
            raise UserError(f"hyperparameters of {name!r} are not an object: {hp!r}")
        cls = get_method_class(method, "classify").config_cls
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(hp) - fields - ENGINE_FIELDS)
        if unknown:
            raise UserError(f"hyperparameter(s) {', '.join(unknown)} of {name!r} are not options of {method!r} or the engine")
        check_numbers(hp, prefix=f"{name}: ")
        check_forget_loss(hp.get("forget_loss"), f"{name}: forget_loss")
        try:
            EngineConfig(**{k: v for k, v in hp.items() if k in ENGINE_FIELDS})
            cls(**{k: v for k, v in hp.items() if k in fields})
        except (TypeError, ValueError) as err:
            raise UserError(f"hyperparameters of {name!r}: {err}") from None
        steps = hp.get("max_train_steps", 1)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"{name}: max_train_steps {steps!r} must be a positive integer")


def resolve(args) -> dict:
    """Check every user value before any work; raise DataError with one line naming the value and the allowed ones."""
    if args.dataset not in DATASETS:
        raise DataError(f"unknown dataset {args.dataset!r}; allowed: {', '.join(DATASETS)}")
    allowed = available_methods("classify")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in allowed:
            raise DataError(f"unknown method {m!r}; allowed: {', '.join(allowed)}")
    if not methods:
        raise DataError(f"no method given; allowed: {', '.join(allowed)}")
    duplicates(methods, "--methods")
    ablations = [] if args.ablations.strip() in ("", "none") else [a.strip() for a in args.ablations.split(",") if a.strip()]
    for a in ablations:
        if a not in ABLATIONS:
            raise DataError(f"unknown ablation {a!r}; allowed: {', '.join(ABLATIONS)} or none")
    duplicates(ablations, "--ablations")
    spec = parse_forget(args.forget, num_classes_of(args.dataset))
    seeds = parse_seeds(args.seeds)
    for name in ("max_train_steps", "ref_epochs", "batch_size", "num_threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise DataError(f"--{name} {v} must be a positive integer")
    if args.hparams is not None:  # named by the user: it must hold this kind's values (the default file may not)
        check_hparams_file(args.hparams, spec)
    check_cache_dir(args.cache_dir)
    return {"methods": methods, "ablations": ablations, "spec": spec, "seeds": seeds}


def build_rows(methods, ablations, spec, args) -> tuple[dict[str, tuple[str, dict]], str]:
    """Row name -> (method, hyperparameters), after the tuned values and the command-line overrides."""
    hp, source = load_hparams(args.dataset, spec.kind, args.hparams)
    overrides = method_overrides(args)
    rows = {}
    for m in methods:
        if m == "retrain":
            continue  # the oracle is a reference row of every seed
        h = {**hp.get(m, {}), **overrides.get(m, {})}
        if args.max_train_steps:
            h["max_train_steps"] = args.max_train_steps
        rows[m] = (m, h)
    if "scissorhands" in rows:
        for a in ablations:
            rows[f"scissorhands_{a}"] = ("scissorhands", {**rows["scissorhands"][1], "ablation": a})
    return rows, source


def aggregate(per_seed: list[dict], names: list[str]) -> dict:
    by = {n: [r for r in per_seed if r["method"] == n] for n in names}
    ref = {r["seed"]: r for r in by["retrain"]}
    sciss = {r["seed"]: r["AvgGap"] for r in by.get("scissorhands", [])}
    out = {}
    for n in names:
        rows = by[n]
        entry = {k: summary(r[k] for r in rows) for k in SUMMARY_KEYS}
        entry["collapsed"] = sum(r["TA"] < ref[r["seed"]]["TA"] - COLLAPSE_DROP for r in rows)
        entry["seeds"] = len(rows)
        if sciss and n not in ("scissorhands", "retrain"):  # Retrain is the reference: its gap is 0 by definition
            diff = [r["AvgGap"] - sciss[r["seed"]] for r in rows]
            entry["paired_vs_scissorhands"] = {**summary(diff), "scissorhands_better": int(sum(d > 0 for d in diff)),
                                               "ties": int(sum(d == 0 for d in diff))}
        out[n] = entry
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Classification unlearning: {s['dataset']} {s['forget']} ({len(s['seeds'])} seeds)", "",
             f"Seeds {s['seeds'][0]}..{s['seeds'][-1]}; Avg.Gap = mean |metric − Retrain| over UA, RA, TA, MIA (lower is better); "
             f"RTE in seconds and as a ratio to Retrain; collapsed = TA more than {COLLAPSE_DROP:g} points below Retrain; "
             "Δ vs Scissorhands = paired Avg.Gap(method) − Avg.Gap(Scissorhands) (positive: Scissorhands closer to Retrain).", "",
             "| method | UA | RA | TA | MIA | Avg.Gap | Avg.Gap median | RTE (s) | RTE / Retrain | collapsed | Δ vs Scissorhands (better on) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["methods"].items():
        cells = [f"{e[k]['mean']:.2f} ± {e[k]['std']:.2f}" for k in (*METRICS, "AvgGap")]
        paired = e.get("paired_vs_scissorhands")
        p = f"{paired['mean']:+.2f} ± {paired['std']:.2f} ({paired['scissorhands_better']}/{e['seeds']})" if paired else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {e['AvgGap']['median']:.2f} | {e['RTE']['mean']:.2f} | "
                     f"{e['RTE_ratio']['mean']:.2f} | {e['collapsed']}/{e['seeds']} | {p} |")
    lines += ["", f"Hyperparameters: {s['hparams_source']}. Command: `{s['command']}`", ""]
    return "\n".join(lines)


def chart(results: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, e in results["methods"].items():
        ax1.errorbar(e["UA"]["mean"], e["TA"]["mean"], xerr=e["UA"]["std"], yerr=e["TA"]["std"], fmt="o", capsize=3, label=name)
    ax1.set_xlabel("UA: forgetting (%)")
    ax1.set_ylabel("TA: test accuracy (%)")
    ax1.set_title("forgetting vs. utility (mean ± std)")
    ax1.legend(fontsize=7)
    names = list(results["methods"])
    ax2.bar(range(len(names)), [results["methods"][n]["AvgGap"]["mean"] for n in names],
            yerr=[results["methods"][n]["AvgGap"]["std"] for n in names], capsize=3)
    ax2.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax2.set_ylabel("Avg.Gap to Retrain (lower is better)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


@cli_errors
def main(args) -> dict:
    try:
        chosen = resolve(args)
        data = load_data(args.dataset)
        forget_indices(data.train.y, chosen["spec"], chosen["seeds"][0])  # an empty forget set fails before any work
    except DataError as err:
        raise UserError(str(err)) from None
    torch.set_num_threads(args.num_threads)
    spec, seeds = chosen["spec"], chosen["seeds"]
    try:
        rows, source = build_rows(chosen["methods"], chosen["ablations"], spec, args)
    except AttributeError:  # a hyperparameter file whose kinds / methods are not objects
        raise UserError(f"hyperparameter file {args.hparams!r} is not {{kind: {{'methods': {{method: {{name: value}}}}}}}}") from None
    check_hparams(rows)
    claim = claim_output_dir(args.output_dir, overwrite=args.overwrite, by="classify.run")
    try:
        return _run(args, data, spec, seeds, rows, source)
    finally:
        claim.release()


def _run(args, data, spec, seeds, rows, source) -> dict:
    """Every seed, then the aggregate and the files (the output folder is held by ``main``)."""
    from accelerate import Accelerator

    train = TrainSettings(**({"epochs": args.ref_epochs} if args.ref_epochs else {})).resolved(args.dataset)
    accelerator = Accelerator()  # one shared accelerator: AcceleratorState is a process-wide singleton
    start, per_seed = time.perf_counter(), []
    for seed in seeds:
        try:
            per_seed.extend(run_seed(data, data.train, data.test, spec, seed, rows, train, args.cache_dir, accelerator, args.batch_size))
        except TopKError as err:  # e.g. a --topk that rounds to 0 entries of the targeted model
            raise UserError(str(err)) from None
        logger.info(f"seed {seed} done ({time.perf_counter() - start:.0f} s)")
    names = ["original", "retrain", "retrain2", *rows]
    results = {"methods": aggregate(per_seed, names), "settings": settings(args, spec, seeds, rows, source, train, data, time.perf_counter() - start)}
    out = Path(args.output_dir)
    atomic_write_json(out / "per_seed.json", per_seed)
    atomic_write_text(out / "results.md", markdown(results))
    atomic_write_bytes(out / "chart.png", chart(results))
    atomic_write_json(out / "results.json", results)
    logger.info(f"wrote {out}/results.json, results.md, chart.png")
    return results


def _config_of(method: str, hp: dict):
    cls = get_method_class(method, "classify").config_cls
    return cls(**{k: v for k, v in hp.items() if k in cls.__dataclass_fields__})  # hp also holds engine fields


def settings(args, spec, seeds, rows, source, train, data, seconds) -> dict:
    tuned = {}
    file = Path(args.hparams) if args.hparams else tuned_path(args.dataset)
    if file.exists():
        t = json.loads(file.read_text()).get(spec.kind, {}).get("tuning", {})
        tuned = {k: t.get(k) for k in ("command", "tuning_seeds", "validation_fraction", "selection", "tie_break")}
        tuned["disjoint_from_evaluation_seeds"] = not set(t.get("tuning_seeds") or []) & set(seeds)
    sciss = rows.get("scissorhands")
    return {
        "dataset": args.dataset, "data": data.info | {"normalisation": "per-channel train mean/std"}, "forget": str(spec),
        "seeds": seeds, "test_split": "fixed (stratified, seed 0)" if args.dataset == "digits" else "the dataset's test split",
        "per_seed": "new forget set (seeded by the seed), original init 10000+3s, retrain init 10000+3s+1, retrain2 init 10000+3s+2, unlearning engine seed s",
        "reference_training": dataclasses.asdict(train) | {"optimizer": "adam", "schedule": "cosine"},
        "hparams_source": source, "hparams": {n: {"method": m, **h} for n, (m, h) in rows.items()}, "tuning": tuned,
        "scissorhands": dataclasses.asdict(_config_of("scissorhands", sciss[1])) if sciss else None,
        "metrics": {"UA": "100 - accuracy on D_f", "RA": "accuracy on D_r",
                    "TA": "test accuracy" + (" on the remaining classes" if spec.kind == "class" else ""),
                    "MIA": f"% of D_f an SVC({MIA_SVC}) on true-label confidence calls non-member (members: retain sample, non-members: test)",
                    "AvgGap": "mean |metric - Retrain| over UA, RA, TA, MIA", "RTE": "wall seconds of the unlearning run (Retrain: its training)",
                    "collapsed": f"TA < Retrain TA - {COLLAPSE_DROP:g}"},
        "batch_size": args.batch_size, "cache_dir": str(args.cache_dir),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "command": "python -m classify.run " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if Path(sys.argv[0]).stem == "run" else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": seconds,
    }


if __name__ == "__main__":
    setup_logging()
    main(parse_args())
