"""Choose a method's settings on the shapes world's tuning concepts only, by a rule fixed before the grid runs (issue 19 §5).

Each grid point is a set of ``erase/sd.py`` flags for one method; every point runs on every tuning concept and seed
with the shapes benchmark's shared budget (``eval.shapes bench`` defaults: 100 steps, batch 16, 64 forget + 64 retain
images per seed; closed-form editors take no step), is audited by ``eval.shapes score`` (40 images per group), and
the rule picks one point:

1. admissible: on *each* tuning concept whose base draws it (base forget > 2 %), mean forget acc <= 2 % and mean
   held-out forget acc <= 2 %; on each tuning concept, mean retain FD <= 1.15 x the base's;
2. among those, the lowest mean drop: per concept the mean of the neighbour, co-occurrence and composition drops
   (base minus erased, in points; negative = better than the base), averaged over the concepts;
3. points within 1 point of that are tied: the lowest mean FD ratio wins, then the earlier grid point.

No point admissible: nothing is chosen (the table says so); the method keeps its setting.

With ``--margin NAME=GENTLER`` (repeat; the forget-margin rule, docs/SHAPES.md): a point is admissible only if it
names a gentler partner (the same flags one step weaker on forgetting, e.g. its forget weight divided by 3), that
partner is in the grid, and the partner too meets 1.'s forget bars on each tuning concept: the point sits at least
one step past the edge of forgetting, not on it. Points without a partner may still be partners.

    python benchmarks/shapes_tune.py --method esd --concepts star,red,striped --seeds 0 \\
        --grid "lr1e-4=--lr 1e-4" --grid "lr3e-5=--lr 3e-5" --output_dir OUT

Writes ``OUT/tune.json`` (every run, per-point aggregates, the rule and its choice) and ``OUT/tune.md``. Jobs run in
``--workers`` processes (one torch thread each); finished erasures and audits are reused on rerun.
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
from erase.utils.errors import cli_errors, UserError  # noqa: E402
from erase.utils.files import atomic_write_json, atomic_write_text  # noqa: E402
from erase.utils.folders import hold_output_dir  # noqa: E402

RULE = ("admissible: mean forget <= 2% and mean held-out forget <= 2% on each tuning concept the base draws (> 2%), "
        "mean retain FD <= 1.15x base on each; then the lowest mean of the neighbour / co-occurrence / composition "
        "drops; within 1 point: lowest mean FD ratio, then grid order")
MARGIN_RULE = ("; forget margin: only points with a gentler partner (--margin) whose forget and held-out forget are "
               "also <= 2% on each tuning concept")
DROPS = ("neighbour_acc", "cooccur_acc", "composition_acc")


@cli_errors
def parse_args(argv=None):
    from eval.shapes.world import parse_concepts

    p = tuning_parser(__doc__, "concepts", "star,red,striped", "0", "shapes")
    p.add_argument("--margin", action="append", default=[], help="NAME=GENTLER: the forget-margin rule (repeat)")
    a = p.parse_args(argv)
    try:
        a.concepts = parse_concepts(a.concepts, "--concepts")
    except ValueError as e:
        raise UserError(str(e) if str(e).startswith("--concepts") else f"--concepts {a.concepts!r}: {e}") from None
    a.points = parse_points(a.grid)
    # every check before the output folder is claimed or a job starts; the points' flags as erase/sd.py reads them (on a
    # preset concept: the world's concept files are written by the jobs)
    from eval.shapes.bench import UNTUNED_ARGS
    from eval.shapes.model import default_model_dir

    model = a.model or (str(default_model_dir()) if default_model_dir().is_dir() else None)
    check_tuning_args(a, "three", model, UNTUNED_ARGS.get(a.method, []))
    a.margins = {}
    for m in a.margin:
        name, sep, gentler = (x.strip() for x in m.partition("="))
        if not sep or name not in a.points or gentler not in a.points or name == gentler:
            raise UserError(f"--margin {m!r} is not NAME=GENTLER with two different --grid point names")
        a.margins[name] = gentler
    return a


def bench_args(out: Path, erase_args: str) -> SimpleNamespace:
    from eval.shapes.__main__ import BENCH_DEFAULTS
    from eval.shapes.score import SCORE_DEFAULTS

    return SimpleNamespace(**BENCH_DEFAULTS, num_images=SCORE_DEFAULTS["num_images"], steps=SCORE_DEFAULTS["steps"],
                           guidance=SCORE_DEFAULTS["guidance"], launcher="accelerate", erase_args=erase_args,
                           output_dir=str(out))


def job(base: str, method: str, name: str, concept: str, seed: int, points: dict, out: str) -> dict:
    """Erase + audit one (point, concept, seed); reuses a finished erasure and its audit."""
    import fcntl

    import torch

    from eval.shapes.bench import _score, concept_files, row, run_erasure, UNTUNED_ARGS

    torch.set_num_threads(1)
    out = Path(out)
    folder = out / name / concept  # the concept's inputs (bench's OUT/concept/) and this point's runs and audits
    args = bench_args(folder, points[name])
    concept_files(folder, [concept])
    data_dir = out / "data" / f"{concept}-seed{seed}"  # the base's images: the same for every point
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(data_dir.parent / f".{data_dir.name}.lock", "w") as lock:  # one erasure per data folder at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = run_erasure(base, method, seed, folder / "runs" / f"seed{seed}", data_dir, args,
                           method_args=UNTUNED_ARGS)  # grid points start from the untuned settings
    summary = _score(str(folder / "runs" / f"seed{seed}"), [concept], folder / "scores" / f"seed{seed}", args)
    return {"point": name, "concept": concept, "seed": seed,
            **row(summary, {k: info[k] for k in ("erase_seconds", "method_seconds", "cpu_seconds")})}


def base_row(base: str, concept: str, out: Path) -> dict:
    from eval.shapes.bench import _score, row

    return row(_score(base, [concept], out / "base" / concept, bench_args(out / "base", "")))


def forgets(per: dict) -> bool:
    """Rule 1's forget bars, on each tuning concept the base draws."""
    return all(not v["forget_measurable"] or (v["forget_acc"] <= 0.02 and v["forget_heldout_acc"] <= 0.02) for v in per.values())


def choose(points: list[str], runs: list[dict], bases: dict[str, dict], margins: dict | None = None) -> tuple[dict, str | None]:
    """Aggregate per point and concept, then apply RULE (and, with ``margins`` {point: gentler partner}, MARGIN_RULE)."""
    agg = {}
    for name in points:
        mine = [r for r in runs if r["point"] == name]
        per = {}
        for c in dict.fromkeys(r["concept"] for r in mine):
            rs, b = [r for r in mine if r["concept"] == c], bases[c]
            mean = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
            drops = [100 * (b[k] - mean(k)) for k in DROPS if b.get(k) is not None]
            per[c] = {"forget_acc": mean("forget_acc"), "forget_heldout_acc": mean("forget_heldout_acc"),
                      **{k: mean(k) for k in DROPS + ("retain_acc",)}, "mean_drop": float(np.mean(drops)),
                      "fd_ratio": float(np.mean([r["retain_fd"] / b["retain_fd"] for r in rs])),
                      "forget_measurable": b["forget_acc"] > 0.02, "n": len(rs)}
        pc = list(per.values())
        admissible = bool(pc) and forgets(per) and all(v["fd_ratio"] <= 1.15 for v in pc)
        agg[name] = {"per_concept": per, "admissible": admissible,
                     "mean_drop": float(np.mean([v["mean_drop"] for v in pc])) if pc else None,
                     "fd_ratio": float(np.mean([v["fd_ratio"] for v in pc])) if pc else None}
    if margins:  # a point on the edge of forgetting is not admissible: its gentler partner must forget too
        for name in points:
            partner = margins.get(name)
            held = partner is not None and bool(agg[partner]["per_concept"]) and forgets(agg[partner]["per_concept"])
            agg[name]["margin"] = {"partner": partner, "partner_forgets": held}
            agg[name]["admissible"] = agg[name]["admissible"] and held
    ok = [n for n in points if agg[n]["admissible"]]
    if not ok:
        return agg, None
    best = min(agg[n]["mean_drop"] for n in ok)
    tied = [n for n in ok if agg[n]["mean_drop"] <= best + 1.0]
    return agg, min(tied, key=lambda n: (agg[n]["fd_ratio"], points.index(n)))


def margin_note(agg: dict) -> str:
    m = agg.get("margin")
    if m is None:
        return ""
    if m["partner"] is None:
        return " (no gentler partner)"
    return f" (gentler {m['partner']}: {'forgets' if m['partner_forgets'] else 'does not forget'})"


def markdown(result: dict) -> str:
    cs = result["concepts"]
    lines = [f"# Tuning {result['method']} on {', '.join(cs)} (seeds {result['seeds']})", "", f"Rule: {result['rule']}.", "",
             "Per concept: forget / held-out forget / neighbour / co-occur / composition / retain (%) / mean drop (points) / FD x base.", "",
             "| point | flags | " + " | ".join(cs) + " | mean drop | FD x | admissible |",
             "|---|---|" + "---|" * len(cs) + "---|---|---|"]
    base = result["base"]
    lines.append("| base | – | " + " | ".join(
        f"{100 * base[c]['forget_acc']:.1f} / {100 * base[c]['forget_heldout_acc']:.1f} / "
        + " / ".join(f"{100 * base[c][k]:.1f}" for k in DROPS + ("retain_acc",)) + " / – / 1.00" for c in cs) + " | – | – | – |")
    for name, a in result["points"].items():
        cells = []
        for c in cs:
            v = a["per_concept"].get(c)
            cells.append("–" if v is None else f"{100 * v['forget_acc']:.1f} / {100 * v['forget_heldout_acc']:.1f} / "
                         + " / ".join(f"{100 * v[k]:.1f}" for k in DROPS + ("retain_acc",)) + f" / {v['mean_drop']:+.1f} / {v['fd_ratio']:.2f}")
        mark = " **chosen**" if name == result["chosen"] else ""
        lines.append(f"| {name}{mark} | `{result['flags'][name]}` | " + " | ".join(cells)
                     + f" | {a['mean_drop']:+.1f} | {a['fd_ratio']:.2f} | {'yes' if a['admissible'] else 'no'}{margin_note(a)} |")
    lines += ["", f"Chosen: {result['chosen'] or 'none admissible (the method keeps its setting)'}."]
    return "\n".join(lines) + "\n"


@cli_errors
def main(argv=None) -> dict:
    a = parse_args(argv)
    with hold_output_dir(a.output_dir, overwrite=a.overwrite, by="benchmarks/shapes_tune.py"):  # ours, one run at a time
        return _main(a)


def _main(a) -> dict:
    from eval.shapes.model import default_model_dir

    base = str(Path(a.model or default_model_dir()).absolute())
    out = Path(a.output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    names = list(a.points)
    report = lambda r: print(  # noqa: E731
        f"{r['point']} {r['concept']} seed {r['seed']}: forget {100 * r['forget_acc']:.1f} held-out "
        f"{100 * r['forget_heldout_acc']:.1f} neighbour {100 * r['neighbour_acc']:.1f} co-occur {100 * r['cooccur_acc']:.1f} "
        f"composition {100 * r['composition_acc']:.1f} retain {100 * r['retain_acc']:.1f} FD {r['retain_fd']:.1f}", flush=True)
    runs, bases = run_waves(a.workers, names, [(c, s) for c in a.concepts for s in a.seeds],
                            partial(job, base, a.method, points=a.points, out=str(out)), partial(base_row, base, out=out),
                            a.concepts, report)
    agg, chosen = choose(names, runs, bases, a.margins)
    from eval.shapes.__main__ import BENCH_DEFAULTS
    from eval.shapes.score import SCORE_DEFAULTS

    result = {"method": a.method, "concepts": a.concepts, "seeds": a.seeds, "flags": a.points,
              "rule": RULE + (MARGIN_RULE if a.margins else ""), "margins": a.margins,
              "points": agg, "chosen": chosen, "runs": runs, "base": bases, "base_model": base,
              "budget": {**BENCH_DEFAULTS, "audit": SCORE_DEFAULTS}, "seconds": round(time.time() - start, 1)}
    atomic_write_json(out / "tune.json", result)
    atomic_write_text(out / "tune.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
