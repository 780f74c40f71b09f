"""Choose erasure settings on tuning digits only, by a rule fixed before the grid runs (issue 8's protocol).

Each grid point is a set of ``erase/sd.py`` flags for one method; every point runs on every tuning digit and
seed with the digits benchmark's shared budget (``eval.digits bench`` defaults: 100 steps, batch 16, 64 forget
images per seed), is audited by ``eval.digits score`` (40 images per digit, main and held-out phrasings), and
the rule picks one point:

1. admissible: mean forget acc <= 2 % and mean held-out forget acc <= 2 % on *each* tuning digit, and mean retain
   FD <= 1.3 x the base's on each tuning digit;
2. among those, the highest retain accuracy (mean over digits and seeds);
3. points within 0.25 points of that are tied: the lowest mean FD ratio wins, then the earlier grid point.

    python benchmarks/digits_tune.py --method scissorhands --digits seven,one --seeds 0,1,2 \\
        --grid "k5_l0.3=--lr 1e-3 --topk 5 --lam 0.3" --grid "k5_l1=--lr 1e-3 --topk 5 --lam 1" --output_dir OUT

Writes ``OUT/tune.json`` (every run, per-point aggregates, the rule and its choice) and ``OUT/tune.md``. Jobs run
in ``--workers`` processes (one torch thread each); finished erasures and audits are reused on rerun.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.grid import check_tuning_args, parse_points, run_waves, tuning_parser  # noqa: E402
from benchmarks.inputs import digit_list  # noqa: E402
from erase.utils.folders import hold_output_dir  # noqa: E402
from erase.utils.errors import cli_errors  # noqa: E402
from erase.utils.files import atomic_write_json, atomic_write_text  # noqa: E402
from eval.digits.score import BENCH_DEFAULTS, SCORE_DEFAULTS  # noqa: E402
from eval.digits.model import DIGIT_WORDS, default_model_dir  # noqa: E402

RULE = ("admissible: mean forget <= 2% and mean held-out forget <= 2% on each tuning digit, mean retain FD <= 1.3x base "
        "on each; then highest mean retain acc; within 0.25 points: lowest mean FD ratio, then grid order")


@cli_errors
def parse_args(argv=None):
    p = tuning_parser(__doc__, "digits", "seven,one", "0,1,2", "digits")
    a = p.parse_args(argv)
    a.digits = digit_list("--digits", a.digits)
    a.points = parse_points(a.grid)
    # every check before the output folder is claimed or a job starts: the grid points' flags as erase/sd.py reads them
    from eval.digits.bench import METHOD_ARGS

    model = a.model or (str(default_model_dir()) if default_model_dir().is_dir() else None)
    check_tuning_args(a, DIGIT_WORDS[a.digits[0]], model, METHOD_ARGS.get(a.method, []))
    return a


def bench_args(erase_args: str) -> SimpleNamespace:
    return SimpleNamespace(**BENCH_DEFAULTS, num_images=SCORE_DEFAULTS["num_images"], steps=SCORE_DEFAULTS["steps"],
                           guidance=SCORE_DEFAULTS["guidance"], launcher="accelerate", erase_args=erase_args)


def job(base: str, method: str, name: str, digit: int, seed: int, points: dict, out: str) -> dict:
    """Erase + audit one (point, digit, seed); reuses a finished erasure and its audit."""
    import torch

    from eval.digits.bench import _reusable_score, _row, _score, run_erasure

    import fcntl

    torch.set_num_threads(1)
    out = Path(out)
    args = bench_args(points[name])
    run_dir = out / "runs" / f"{name}-{DIGIT_WORDS[digit]}-seed{seed}"
    data_dir = out / "data" / f"{DIGIT_WORDS[digit]}-seed{seed}"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(data_dir.parent / f".{data_dir.name}.lock", "w") as lock:  # one erasure per data folder at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = run_erasure(base, digit, method, seed, run_dir, data_dir, args)
    score_dir = out / "scores" / run_dir.name
    summary = _reusable_score(run_dir, score_dir, args) or _score(str(run_dir), digit, score_dir, args)
    return {"point": name, "digit": digit, "seed": seed, **_row(summary, {k: info[k] for k in ("wall_seconds", "cpu_seconds")})}


def base_row(base: str, digit: int, out: Path) -> dict:
    from eval.digits.bench import _row, _score

    return _row(_score(base, digit, out / "base" / DIGIT_WORDS[digit], bench_args("")))


def choose(points: list[str], runs: list[dict], bases: dict[int, dict]) -> tuple[dict, str | None]:
    """Aggregate per point and digit, then apply RULE."""
    agg = {}
    for name in points:
        mine = [r for r in runs if r["point"] == name]
        per_digit = {}
        for d in sorted({r["digit"] for r in mine}):
            rs = [r for r in mine if r["digit"] == d]
            per_digit[DIGIT_WORDS[d]] = {
                "forget_acc": float(np.mean([r["forget_acc"] for r in rs])),
                "heldout_forget_acc": float(np.mean([r["heldout_forget_acc"] for r in rs])),
                "retain_acc": float(np.mean([r["retain_acc"] for r in rs])),
                "retain_acc_std": float(np.std([r["retain_acc"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0,
                "fd_ratio": float(np.mean([r["retain_fd"] / bases[d]["retain_fd"] for r in rs])),
                "base_retain_acc": bases[d]["retain_acc"], "n": len(rs)}
        pd = list(per_digit.values())
        admissible = bool(pd) and all(v["forget_acc"] <= 0.02 and v["heldout_forget_acc"] <= 0.02 and v["fd_ratio"] <= 1.3 for v in pd)
        agg[name] = {"per_digit": per_digit, "admissible": admissible,
                     "retain_acc": float(np.mean([r["retain_acc"] for r in mine])) if mine else None,
                     "fd_ratio": float(np.mean([v["fd_ratio"] for v in pd])) if pd else None}
    ok = [n for n in points if agg[n]["admissible"]]
    if not ok:
        return agg, None
    best = max(agg[n]["retain_acc"] for n in ok)
    tied = [n for n in ok if agg[n]["retain_acc"] >= best - 0.0025]
    return agg, min(tied, key=lambda n: (agg[n]["fd_ratio"], points.index(n)))


def markdown(result: dict) -> str:
    lines = [f"# Tuning {result['method']} on {', '.join(result['digits'])} (seeds {result['seeds']})", "",
             f"Rule: {result['rule']}.", "",
             "| point | flags | " + " | ".join(f"{d}: forget / held-out / retain (base) / FD x" for d in result["digits"]) + " | mean retain | admissible |",
             "|---|---|" + "---|" * len(result["digits"]) + "---|---|"]
    for name, a in result["points"].items():
        cells = []
        for d in result["digits"]:
            v = a["per_digit"].get(d)
            cells.append("–" if v is None else f"{100 * v['forget_acc']:.1f} / {100 * v['heldout_forget_acc']:.1f} / "
                         f"{100 * v['retain_acc']:.1f} ± {100 * v['retain_acc_std']:.1f} ({100 * v['base_retain_acc']:.1f}) / {v['fd_ratio']:.2f}")
        mark = " **chosen**" if name == result["chosen"] else ""
        lines.append(f"| {name}{mark} | `{result['flags'][name]}` | " + " | ".join(cells) +
                     f" | {100 * a['retain_acc']:.2f} | {'yes' if a['admissible'] else 'no'} |")
    lines += ["", f"Chosen: {result['chosen'] or 'none admissible'}."]
    return "\n".join(lines) + "\n"


@cli_errors
def main(argv=None) -> dict:
    a = parse_args(argv)
    with hold_output_dir(a.output_dir, overwrite=a.overwrite, by="benchmarks/digits_tune.py"):  # ours, one run at a time
        return _main(a)


def _main(a) -> dict:
    base = str(a.model or default_model_dir())
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    names = list(a.points)
    report = lambda r: print(f"{r['point']} {DIGIT_WORDS[r['digit']]} seed {r['seed']}: forget {100 * r['forget_acc']:.1f} "  # noqa: E731
                             f"held-out {100 * r['heldout_forget_acc']:.1f} retain {100 * r['retain_acc']:.1f} FD {r['retain_fd']:.1f}", flush=True)
    runs, bases = run_waves(a.workers, names, [(d, s) for d in a.digits for s in a.seeds],
                            partial(job, base, a.method, points=a.points, out=str(out)), partial(base_row, base, out=out),
                            a.digits, report)
    agg, chosen = choose(names, runs, bases)
    result = {"method": a.method, "digits": [DIGIT_WORDS[d] for d in a.digits], "seeds": a.seeds, "flags": a.points,
              "rule": RULE, "points": agg, "chosen": chosen, "runs": runs,
              "base": {DIGIT_WORDS[d]: b for d, b in bases.items()}, "base_model": base,
              "budget": {**BENCH_DEFAULTS, "audit_images_per_digit": SCORE_DEFAULTS["num_images"]},
              "seconds": round(time.time() - start, 1)}
    atomic_write_json(out / "tune.json", result)
    atomic_write_text(out / "tune.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
