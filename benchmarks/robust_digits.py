"""The robust erasure on digits (issue 17): erase, audit and attack each grid point, against the retrain reference.

Each grid point is a method and its ``erase/sd.py`` flags (``NAME=METHOD FLAGS``; a point without ``--robust`` is a
plain erasure, the cost baseline). ``--pre_edit uce`` (or ``speed``) among a point's flags is this tool's own: the
point's erasure then runs on top of that closed-form edit (``stacked_erasure``). For every digit and seed the script
runs, with the digits benchmark's shared budget (``eval.digits bench`` defaults and its per-method flags,
``METHOD_ARGS``):

* every point: ``erase/sd.py`` in its own process (CPU seconds and wall time of the whole erasure, by ``wait4``), the
  audit (``eval.digits score``: forget / retain / FD, main and held-out phrasings), and each ``--attacks`` attack with
  the one budget of ``eval.digits bench`` (``ATTACK_BUDGET`` + ``--attack_options``);
* the base model (audit and attacks: the images of the concept every attack learns from are the base's);
* the **retrain reference** (``eval.digits retrain``: the base settings trained without the digit, training seed = the
  erasure seed; cached), audited and attacked with the base's images of the concept.

Per point and digit: each attack column and its **gap** (the point's hit rate minus the retrain reference's, same
seed, then the mean over seeds); cost = the point's erasure CPU seconds / the plain point's of the same method, digit
and seed (``--cost_baseline``), median over seeds. With ``--rule tune`` the rule below chooses one point (it was
written before any evaluation digit was run). Writes ``OUT/results.json`` (every row, settings, rule, choice) and
``OUT/results.md``; finished erasures, audits and attack cells are reused on a rerun.

    OMP_NUM_THREADS=1 python benchmarks/robust_digits.py --digits seven,one --seeds 0 --attacks inversion,relearn \\
        --grid "plain=scissorhands" --grid "r25=scissorhands --robust --robust_every 25" --rule tune --output_dir OUT
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.grid import parse_points  # noqa: E402
from benchmarks.inputs import check_counts, check_erase_flags, digit_list  # noqa: E402
from erase.utils.checks import check_int_list  # noqa: E402
from erase.utils.errors import UserError, cli_errors  # noqa: E402
from erase.utils.files import atomic_write_json, atomic_write_text  # noqa: E402
from erase.utils.folders import hold_output_dir  # noqa: E402
from eval.digits.model import DIGIT_WORDS, default_model_dir  # noqa: E402
from eval.attack.utils.columns import INVERSION_STEPS, read_attack_options  # noqa: E402  (issue 17's inversion budget curve, the benches')
from eval.digits.score import BENCH_DEFAULTS, SCORE_DEFAULTS  # noqa: E402

RULE = ("admissible: on each tuning digit (mean over seeds) forget <= 2 %, held-out forget <= 2 %, retain >= base - 1 point, "
        "retain FD <= 1.15 x base, cost <= 5 x plain Scissorhands; among them the smallest worst inversion gap (max over the "
        "tuning digits and over 500 and 2000 attack steps); within 5 points of it: the smallest worst relearning gap at 25 "
        "steps, then the lowest cost, then grid order. None admissible: the same order over every robust point, reported "
        "as not admissible")


@cli_errors
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", default="seven,one", help="digits, comma-separated (tuning: seven,one)")
    p.add_argument("--seeds", default="0", help="erasure seeds (and retrain training seeds), comma-separated")
    p.add_argument("--grid", action="append", required=True, help="NAME=METHOD [erase/sd.py flags] (repeat for each point)")
    p.add_argument("--attacks", default="inversion,relearn", help="eval.attack attacks run on every model, comma-separated")
    p.add_argument("--attack_options", default=None, help="JSON budget overrides, as eval.digits bench --attack_options")
    p.add_argument("--cost_baseline", default="plain", help="the plain point each point's cost is measured against "
                                                            "(its method's: NAME for scissorhands, NAME-esd, NAME-salun if given)")
    p.add_argument("--rule", choices=("tune", "none"), default="none", help="tune: apply the tuning rule (RULE) to the points")
    p.add_argument("--model", default=None, help="base digits model (default: the cached default)")
    p.add_argument("--workers", type=int, default=1, help="parallel (point, digit, seed) jobs, one torch thread each")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir this tool did not create")
    a = p.parse_args(argv)
    a.digit_list = digit_list("--digits", a.digits)
    a.seed_list = check_int_list("--seeds", a.seeds)
    check_counts(a, workers=1)
    if a.model is not None and not Path(a.model).is_dir():
        raise UserError(f"--model {a.model!r} is not a folder (give a base digits model folder, or leave it out for the default)")
    a.points = {}
    for name, spec in parse_points(a.grid).items():  # NAME=..., a NAME without '/', none twice
        g = f"{name}={spec}"
        try:
            words = shlex.split(spec)
        except ValueError as e:
            raise UserError(f"--grid {g!r}: cannot split its flags ({e})") from None
        if not words:
            raise UserError(f"--grid {g!r} is not NAME=METHOD [FLAGS]")
        pre = None
        if "--pre_edit" in words:  # this tool's flag: the point erases on top of a closed-form edit (job)
            i = words.index("--pre_edit")
            if i + 1 >= len(words):
                raise UserError(f"--grid {g!r}: --pre_edit needs a closed-form method (uce, speed)")
            pre = words[i + 1]
            del words[i:i + 2]
            from erase.core import available_methods
            from eval.digits.bench import is_closed_form

            if pre not in available_methods("diffusion") or not is_closed_form(pre):
                raise UserError(f"--grid {g!r}: --pre_edit {pre!r} is not a closed-form method (uce, speed)")
        a.points[name] = {"method": words[0], "flags": " ".join(shlex.quote(w) for w in words[1:]), "pre_edit": pre}
    options = read_attack_options(a.attack_options)
    inv = options.setdefault("inversion", {}) if "inversion" in a.attacks.split(",") else {}
    inv.setdefault("eval_steps", list(INVERSION_STEPS))
    a.attack_options = json.dumps(options)
    check_points(a)
    return a


def check_points(a) -> None:
    """Before the output folder is claimed or a job starts: the attacks and their budgets as the jobs read them, and
    every point's method and erase/sd.py flags (erase/sd.py's own parser and validation, with the bench's flags)."""
    from erase.core import available_methods
    from eval.digits.bench import METHOD_ARGS, is_closed_form

    bench_args(a.digit_list[0], a)  # --attacks, --attack_options: one line naming a bad attack or option
    model = a.model or (str(default_model_dir()) if default_model_dir().is_dir() else None)
    for name, point in a.points.items():
        what = f"--grid {name}={point['method']} {point['flags']}".rstrip()
        if point["method"] not in available_methods("diffusion"):
            raise UserError(f"{what}: {point['method']!r} is not an erase/sd.py method; choose from "
                            f"{', '.join(available_methods('diffusion'))}")
        if point["pre_edit"]:  # its erasure starts from the edit's exported pipeline, on the base's images
            check_erase_flags(what, point["pre_edit"], "--export_pipeline", DIGIT_WORDS[a.digit_list[0]], model,
                              METHOD_ARGS.get(point["pre_edit"], []))
        steps = ["--max_train_steps", "0"] if is_closed_form(point["method"]) else []
        check_erase_flags(what, point["method"], point["flags"], DIGIT_WORDS[a.digit_list[0]], model,
                          METHOD_ARGS.get(point["method"], []) + steps)


def bench_args(digit: int, a, erase_args: str = "") -> SimpleNamespace:
    """The namespace eval.digits bench's functions read: its budget, this digit, the attacks and their one budget."""
    from eval.digits.bench import parse_attacks

    ns = SimpleNamespace(**BENCH_DEFAULTS, num_images=SCORE_DEFAULTS["num_images"], steps=SCORE_DEFAULTS["steps"],
                         guidance=SCORE_DEFAULTS["guidance"], launcher="python", erase_args=erase_args, digits=[digit],
                         concept=DIGIT_WORDS[digit], attacks=a.attacks, attack_options=a.attack_options, relearn=False)
    ns.attacks, ns.attack_options = parse_attacks(ns)
    return ns


def audit(model: str, digit: int, out: Path) -> dict:
    """eval.digits score of ``model`` (40 images per digit, main and held-out phrasings); reused when done."""
    from eval.digits.score import score

    summary = out / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    ns = SimpleNamespace(model=str(model), digit=digit, digits=[digit], concept=DIGIT_WORDS[digit], forget_prompts=None,
                         retain_prompts=None, num_images=SCORE_DEFAULTS["num_images"], seeds=[0], steps=SCORE_DEFAULTS["steps"],
                         guidance=SCORE_DEFAULTS["guidance"], scheduler=None, batch_size=100, no_heldout=False, output_dir=str(out))
    return score(ns)


def row(summary: dict, **extra) -> dict:
    held = summary.get("heldout") or {}
    return {"forget_acc": summary["forget_acc"], "retain_acc": summary["retain_acc"], "retain_fd": summary["retain_fd"],
            "heldout_forget_acc": held.get("forget_acc"), "heldout_retain_acc": held.get("retain_acc"), **extra}


def job(kind: str, name: str | None, digit: int, seed: int, a) -> dict:
    """One row: ``base`` (the base model), ``data`` (the forget data of this seed), ``retrain`` (the reference of this
    seed) or ``point`` ``name``."""
    import torch

    from eval.digits.bench import run_attacks, run_erasure
    from eval.digits.retrain import retrain_model

    torch.set_num_threads(1)
    out = Path(a.output_dir) / DIGIT_WORDS[digit]
    base = str(a.model or default_model_dir())
    if kind == "base":
        args = bench_args(digit, a)
        r = row(audit(base, digit, out / "scores" / "base"))
        return {"kind": kind, "point": "base", "digit": digit, "seed": seed, **r, **run_attacks(base, args, out, "base")}
    if kind == "retrain":
        args = bench_args(digit, a)
        model = str(retrain_model(base, [digit], seed, progress=False))
        r = row(audit(model, digit, out / "scores" / f"retrain-seed{seed}"))
        return {"kind": kind, "point": "retrain", "digit": digit, "seed": seed, "model": model, **r,
                **run_attacks(model, args, out, f"retrain-seed{seed}", learn_from_base=True)}
    data_dir = out / "data" / f"seed{seed}"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if kind == "data":  # the forget images and latents, made before any timed erasure (a 0-step run that needs no retain set)
        args = bench_args(digit, a)
        args.max_train_steps = 0
        with open(data_dir.parent / f".seed{seed}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            run_erasure(base, digit, "esd", seed, out / "runs" / f".data-seed{seed}", data_dir, args)
        return {"kind": kind, "point": "data", "digit": digit, "seed": seed}
    point = a.points[name]
    args = bench_args(digit, a, point["flags"])
    run_dir = out / "runs" / f"{name}-seed{seed}"
    with open(data_dir.parent / f".seed{seed}.lock", "w") as lock:  # one erasure per data folder at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if point.get("pre_edit"):
            info = stacked_erasure(base, digit, point, seed, run_dir, data_dir, a)
        else:
            info = run_erasure(base, digit, point["method"], seed, run_dir, data_dir, args)
    record = json.loads((run_dir / "erase_config.json").read_text())
    r = row(audit(str(run_dir), digit, out / "scores" / f"{name}-seed{seed}"), cpu_seconds=info["cpu_seconds"],
            wall_seconds=info["wall_seconds"], train_seconds=record.get("train_seconds"),
            robust_search_seconds=(record.get("repair") or {}).get("robust_search_seconds"), command=info["command"])
    return {"kind": kind, "point": name, "method": point["method"], "digit": digit, "seed": seed, **r,
            # a stacked point's own base is the closed-form edit, which no longer draws the digit: its attacks learn
            # from the images the base model drew, as the retrain rows' do
            **run_attacks(str(run_dir), args, out, f"{name}-seed{seed}", learn_from_base=bool(point.get("pre_edit")))}


def stacked_erasure(base: str, digit: int, point: dict, seed: int, run_dir: Path, data_dir: Path, a) -> dict:
    """A point with ``--pre_edit M``: the closed-form edit ``M`` (its digits-bench settings) exported as a full pipeline,
    then the point's erasure from that pipeline on the *base's* forget images of this seed (``--forget_images``: the
    edited model no longer draws the digit); CPU and wall seconds are the two stages' sums."""
    from eval.digits.bench import run_erasure

    pre_dir = run_dir.parent / f"{run_dir.name}-pre"
    first = run_erasure(base, digit, point["pre_edit"], seed, pre_dir, data_dir, bench_args(digit, a, "--export_pipeline"))
    second = run_erasure(str(pre_dir), digit, point["method"], seed, run_dir, run_dir.parent / f"{run_dir.name}-data",
                         bench_args(digit, a, f"{point['flags']} --forget_images {shlex.quote(str(data_dir / 'forget'))}"))
    return {**second, "cpu_seconds": first["cpu_seconds"] + second["cpu_seconds"],
            "wall_seconds": first["wall_seconds"] + second["wall_seconds"], "pre_edit": first["command"]}


ATTACK_PREFIXES = ("inversion_", "relearn_", "uda_")


def aggregate(a, rows: list[dict]) -> dict:
    """Per point and digit: means (and std) over seeds of every metric, the gaps to the retrain row, the cost ratio."""
    out = {}
    for name in ["base", "retrain", *a.points]:
        per_digit = {}
        for d in a.digit_list:
            mine = [r for r in rows if r["point"] == name and r["digit"] == d]
            if not mine:
                continue
            cols = sorted({k for r in mine for k, v in r.items() if isinstance(v, (int, float)) and k not in ("digit", "seed")})
            cell = {k: _stat([r[k] for r in mine if r.get(k) is not None]) for k in cols}
            if name not in ("base", "retrain"):
                gaps, costs = {}, []
                for r in mine:
                    ref = next((x for x in rows if x["point"] == "retrain" and x["digit"] == d and x["seed"] == r["seed"]), None)
                    for k in cols:
                        if ref is not None and k.startswith(ATTACK_PREFIXES) and ref.get(k) is not None:
                            gaps.setdefault(f"gap_{k}", []).append(r[k] - ref[k])
                    plain = next((x for x in rows if x["point"] == baseline_of(a, r) and x["digit"] == d and x["seed"] == r["seed"]), None)
                    if plain is not None and plain.get("cpu_seconds"):
                        costs.append(r["cpu_seconds"] / plain["cpu_seconds"])
                cell.update({k: _stat(v) for k, v in gaps.items()})
                if costs:
                    cell["cost_ratio"] = {"mean": float(np.median(costs)), "std": 0.0, "n": len(costs), "stat": "median"}
            per_digit[DIGIT_WORDS[d]] = cell
        out[name] = per_digit
    return out


def baseline_of(a, r: dict) -> str:
    """The plain point of the same method: --cost_baseline for Scissorhands, NAME-<method> for the others."""
    return a.cost_baseline if r.get("method", "scissorhands") == "scissorhands" else f"{a.cost_baseline}-{r['method']}"


def _stat(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}


def choose(a, agg: dict) -> tuple[str | None, dict]:
    """RULE over the robust points (those whose flags hold --robust)."""
    robust = [n for n, p in a.points.items() if "--robust" in shlex.split(p["flags"])]
    base = agg.get("base", {})
    verdict = {}
    for n in robust:
        cells = agg.get(n, {})
        checks, inv, rel, cost = [], [], [], []
        for d, c in cells.items():
            b = base.get(d, {})
            m = lambda k: (c.get(k) or {}).get("mean")  # noqa: E731
            checks += [m("forget_acc") is not None and m("forget_acc") <= 0.02,
                       m("heldout_forget_acc") is not None and m("heldout_forget_acc") <= 0.02,
                       m("retain_acc") is not None and m("retain_acc") >= b["retain_acc"]["mean"] - 0.01,
                       m("retain_fd") is not None and m("retain_fd") <= 1.15 * b["retain_fd"]["mean"],
                       m("cost_ratio") is not None and m("cost_ratio") <= 5.0]
            inv += [m(k) for k in ("gap_inversion_500", "gap_inversion_2000") if m(k) is not None]
            rel += [m("gap_relearn_25")] if m("gap_relearn_25") is not None else []
            cost += [m("cost_ratio")] if m("cost_ratio") is not None else []
        verdict[n] = {"admissible": bool(cells) and all(checks), "worst_inversion_gap": max(inv) if inv else None,
                      "worst_relearn_25_gap": max(rel) if rel else None, "cost_ratio": max(cost) if cost else None}
    pool = [n for n in robust if verdict[n]["admissible"]] or [n for n in robust if verdict[n]["worst_inversion_gap"] is not None]
    pool = [n for n in pool if verdict[n]["worst_inversion_gap"] is not None]
    if not pool:
        return None, verdict
    best = min(verdict[n]["worst_inversion_gap"] for n in pool)
    tied = [n for n in pool if verdict[n]["worst_inversion_gap"] <= best + 0.05]
    key = lambda n: (verdict[n]["worst_relearn_25_gap"] if verdict[n]["worst_relearn_25_gap"] is not None else 1.0,  # noqa: E731
                     verdict[n]["cost_ratio"] or 0.0, list(a.points).index(n))
    return min(tied, key=key), verdict


COLUMNS = ("forget_acc", "heldout_forget_acc", "retain_acc", "retain_fd", "cost_ratio", "cpu_seconds", "robust_search_seconds",
           "gap_inversion_500", "gap_inversion_2000", "gap_relearn_25", "gap_uda_minus_control")


def markdown(result: dict) -> str:
    agg = result["aggregate"]
    lines = [f"# Robust erasure on digits {', '.join(result['digits'])} (seeds {result['seeds']})", "",
             "Cells: mean ± std over seeds; accuracies and hit rates in %; gap = the row's attack hit rate minus the retrain "
             "reference's (same seed); cost = erasure CPU seconds / the plain point's (median over seeds).", ""]
    attack_cols = sorted({k for p in agg.values() for c in p.values() for k in c if k.startswith(ATTACK_PREFIXES)},
                         key=lambda k: (k.split("_")[0], int(k.rsplit("_", 1)[1]) if k.rsplit("_", 1)[1].isdigit() else -1, k))
    for d in result["digits"]:
        lines += [f"## {d}", "", "| row | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        for name, per in agg.items():
            if d in per:
                lines.append(f"| {name} | " + " | ".join(_fmt(per[d].get(k), k) for k in COLUMNS) + " |")
        lines += ["", "| row | " + " | ".join(attack_cols) + " |", "|---|" + "---|" * len(attack_cols)]
        for name, per in agg.items():
            if d in per:
                lines.append(f"| {name} | " + " | ".join(_fmt(per[d].get(k), k) for k in attack_cols) + " |")
        lines.append("")
    if result.get("rule"):
        lines += [f"Rule: {result['rule']}.", "", "| point | flags | admissible | worst inversion gap | worst relearn_25 gap | cost |",
                  "|---|---|---|---|---|---|"]
        for n, v in result["verdict"].items():
            g, r, c = v["worst_inversion_gap"], v["worst_relearn_25_gap"], v["cost_ratio"]
            pt = result["points"][n]
            pre = f" --pre_edit {pt['pre_edit']}" if pt.get("pre_edit") else ""
            lines.append(f"| {n}{' **chosen**' if n == result['chosen'] else ''} | `{pt['method']} "
                         f"{pt['flags']}{pre}` | {'yes' if v['admissible'] else 'no'} | "
                         f"{'–' if g is None else f'{100 * g:.1f}'} | {'–' if r is None else f'{100 * r:.1f}'} | "
                         f"{'–' if c is None else f'{c:.2f}'} |")
        lines += ["", f"Chosen: {result['chosen'] or 'none'}."]
    return "\n".join(lines) + "\n"


def _fmt(cell: dict | None, key: str) -> str:
    if not cell:
        return "–"
    if key in ("retain_fd", "cost_ratio", "cpu_seconds", "robust_search_seconds", "wall_seconds", "train_seconds"):
        return f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell["n"] > 1 and key != "cost_ratio" else "")
    return f"{100 * cell['mean']:.1f}" + (f" ± {100 * cell['std']:.1f}" if cell["n"] > 1 else "")


@cli_errors
def main(argv=None) -> dict:
    a = parse_args(argv)
    with hold_output_dir(a.output_dir, overwrite=a.overwrite, by="benchmarks/robust_digits.py"):
        return _main(a)


def _main(a) -> dict:
    out = Path(a.output_dir)
    start = time.time()
    rows = []
    names = list(a.points)
    with ProcessPoolExecutor(max_workers=a.workers) as pool:
        # the base first (its attacks draw the images of the concept the retrain rows learn from) and the data of each
        # (digit, seed), so no timed erasure generates it; then the retrain rows and the points, interleaved by seed
        first = [pool.submit(job, "base", None, d, 0, a) for d in a.digit_list]
        first += [pool.submit(job, "data", None, d, s, a) for d in a.digit_list for s in a.seed_list]
        for f in first:
            r = f.result()
            if r["kind"] != "data":
                rows.append(_log(r))
        rest = [pool.submit(job, "retrain", None, d, s, a) for d in a.digit_list for s in a.seed_list]
        rest += [pool.submit(job, "point", n, d, s, a) for d in a.digit_list for s in a.seed_list for n in names]
        for f in rest:
            rows.append(_log(f.result()))
    agg = aggregate(a, rows)
    chosen, verdict = choose(a, agg) if a.rule == "tune" else (None, {})
    result = {"digits": [DIGIT_WORDS[d] for d in a.digit_list], "seeds": a.seed_list, "points": a.points,
              "attacks": a.attacks, "attack_options": json.loads(a.attack_options), "rule": RULE if a.rule == "tune" else None,
              "verdict": verdict, "chosen": chosen, "aggregate": agg, "rows": rows, "base_model": str(a.model or default_model_dir()),
              "budget": {**BENCH_DEFAULTS, "audit_images_per_digit": SCORE_DEFAULTS["num_images"]},
              "seconds": round(time.time() - start, 1)}
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", markdown(result))
    print(markdown(result))
    return result


def _log(r: dict) -> dict:
    keys = [k for k in ("forget_acc", "retain_acc", "inversion_500", "inversion_2000", "relearn_25") if r.get(k) is not None]
    print(f"{r['point']} {DIGIT_WORDS[r['digit']]} seed {r['seed']}: " + " ".join(f"{k} {100 * r[k]:.1f}" for k in keys), flush=True)
    return r


if __name__ == "__main__":
    main()
