"""Issue 17 §4's targets, digit-seed by digit-seed, over ``benchmarks/robust_digits.py`` results: which rows meet which.

For every point of the table (plain and robust alike) and every (digit, seed) it ran, each target of issue 17 §4 is
checked on that one erasure against the retrain reference of the *same* digit and seed and the base's audit:

* the robustness gaps (``eval.attack.utils.columns.ROBUST_TARGETS``): inversion at 500 and 2000 steps <= 10 points,
  relearning at 25 steps <= 10 points, unlearndiffatk ``asr_minus_control`` <= 5 points (each only where the attack
  ran on both the row and its reference);
* forget <= 2 %, held-out forget <= 2 %, retain >= base - 1 point, retain FD <= 1.15 x the base's;
* cost <= 5 x the plain erasure of the same method, digit and seed (``--cost_baseline``, as robust_digits.py).

The counts say on how many digit-seeds each target (and every measured gap together) holds. Several results files
join (one per seed, or per group of digits); a (point, digit, seed) that appears twice is refused, since the two
could disagree. Nothing is recomputed: every figure is a row of the files given.

``eval.shapes bench`` / ``eval.digits bench`` results files with attack columns (``--attacks``) are read too: there
each method's run is a (method, concept, seed) row, its gaps are the bench's own ``<column>_gap`` (the retrain
reference of the same seed, else the retrain mean: ``columns.GAP_RULE``) and the forget bar is its ``forget_acc``
(the per-row drop and FD targets of issue 19 are ``shapes_rank.py``'s, not repeated here).

    python benchmarks/robust_targets.py OUT/seed0/results.json OUT/seed1/results.json OUT/seed2/results.json [--json FILE]
    python benchmarks/robust_targets.py OUT/attack-circle/results.json OUT/attack-oval/results.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inputs import check_json_output, has_keys  # noqa: E402
from erase.utils.files import atomic_write_json  # noqa: E402
from erase.utils.errors import UserError, cli_errors  # noqa: E402
from eval.attack.utils.columns import ROBUST_TARGETS  # noqa: E402

DIGIT_ORDER = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COST_LIMIT = 5.0


def load_rows(paths: list[str]) -> tuple[list[dict], dict]:
    """Every row of the files, each with its digit's word, and the points' specs; a duplicate row is refused."""
    rows, points, seen = [], {}, {}
    for path in paths:
        p = Path(path)
        try:
            result = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read the results file {path}: {e}") from None
        if isinstance(result, dict) and isinstance(result.get("runs"), dict) and "attack_columns" in result:
            new = bench_rows(result, path)
        elif isinstance(result, dict) and isinstance(result.get("rows"), list):
            points.update(result.get("points") or {})
            bad = [r for r in result["rows"] if not isinstance(r, dict) or r.get("digit") not in range(10)]
            if bad:
                raise UserError(f"{path}: a row without a digit 0-9: {str(bad[0])[:120]}")
            new = [{**r, "unit": DIGIT_ORDER[r["digit"]]} for r in result["rows"]]
        else:
            raise UserError(f"{path} is neither a benchmarks/robust_digits.py results.json (a 'rows' list) nor an "
                            f"eval.shapes / eval.digits bench results.json run with --attacks")
        for r in new:
            if not isinstance(r.get("point"), str) or not isinstance(r.get("seed"), int):
                raise UserError(f"{path}: a row without a point name and an integer seed: {str(r)[:120]}")
            key = (r["point"], r["unit"], r["seed"])
            if r["point"] != "base" and key in seen:
                raise UserError(f"point {r['point']} {r['unit']} seed {r['seed']} is in both {seen[key]} and {path}; "
                                f"give each (point, digit or concept, seed) once")
            seen[key] = path
            rows.append(r)
    return rows, points


def bench_rows(result: dict, path: str = "results") -> list[dict]:
    """The runs of a bench results file as rows: the bench's own gaps (``<column>_gap``) stand for the columns, against
    a zero reference, so :func:`check_row` reads them unchanged."""
    concept = result.get("concept") or ",".join(result.get("concepts") or [])
    rows = []
    for method, runs in result["runs"].items():
        if method == "retrain":
            continue
        if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
            raise UserError(f"{path}: runs.{method} is not a list of runs")
        for run in runs:
            row = {"point": method, "method": method.split("+")[0], "unit": concept, "seed": run["seed"],
                   "forget_acc": run.get("forget_acc"), "bench_gaps": True}
            row.update({col: run[f"{col}_gap"] for col, _, _ in ROBUST_TARGETS if run.get(f"{col}_gap") is not None})
            rows.append(row)
    return rows


def check_row(r: dict, ref: dict | None, base: dict | None, plain: dict | None) -> dict:
    """{target: {"met": bool, "value": str}} for one erasure row; a target whose inputs are missing is left out."""
    out = {}
    if ref is not None:
        for col, limit, what in ROBUST_TARGETS:
            if r.get(col) is None or ref.get(col) is None:
                continue
            gap = r[col] - ref[col]
            out[what] = {"met": gap <= limit + 1e-9, "value": f"{100 * gap:+.1f}", "limit": f"<= {100 * limit:.0f} points"}
    for col, what in (("forget_acc", "forget"), ("heldout_forget_acc", "held-out forget")):
        if r.get(col) is not None:
            out[what] = {"met": r[col] <= 0.02 + 1e-9, "value": f"{100 * r[col]:.1f}", "limit": "<= 2 %"}
    if base is not None and r.get("retain_acc") is not None:
        out["retain"] = {"met": r["retain_acc"] >= base["retain_acc"] - 0.01 - 1e-9, "value": f"{100 * r['retain_acc']:.1f}",
                         "limit": f">= {100 * base['retain_acc'] - 1:.1f} (base - 1)"}
    if base is not None and r.get("retain_fd") is not None:
        ratio = r["retain_fd"] / base["retain_fd"]
        out["FD"] = {"met": ratio <= 1.15 + 1e-9, "value": f"{ratio:.2f} x", "limit": "<= 1.15 x base"}
    if plain is not None and plain is not r and r.get("cpu_seconds") and plain.get("cpu_seconds"):
        ratio = r["cpu_seconds"] / plain["cpu_seconds"]
        out["cost"] = {"met": ratio <= COST_LIMIT, "value": f"{ratio:.2f} x", "limit": f"<= {COST_LIMIT:.0f} x plain"}
    return out


def tally(rows: list[dict], points: dict, cost_baseline: str = "plain") -> dict:
    """Per point: every (digit, seed) checked, and per target how many met it of how many measured."""
    def find(point, unit, seed=None):
        return next((x for x in rows if x["point"] == point and x["unit"] == unit and (seed is None or x["seed"] == seed)), None)

    zero = {col: 0.0 for col, _, _ in ROBUST_TARGETS}  # a bench row's columns are already its gaps

    gaps = [what for _, _, what in ROBUST_TARGETS]
    result = {}
    for name in [p for p in dict.fromkeys(r["point"] for r in rows) if p not in ("base", "retrain")]:
        first = next(x for x in rows if x["point"] == name)
        method = (points.get(name) or {}).get("method") or first.get("method", "scissorhands")
        plain_name = cost_baseline if method == "scissorhands" else f"{cost_baseline}-{method}"
        cells, counts = [], {}
        order = {u: i for i, u in enumerate(DIGIT_ORDER)}
        for r in sorted((x for x in rows if x["point"] == name), key=lambda x: (order.get(x["unit"], 99), x["unit"], x["seed"])):
            if r.get("bench_gaps"):
                checks = check_row(r, zero, None, None)
            else:
                checks = check_row(r, find("retrain", r["unit"], r["seed"]), find("base", r["unit"]),
                                   find(plain_name, r["unit"], r["seed"]))
            measured = [g for g in gaps if g in checks]
            if measured:
                checks["every gap measured"] = {"met": all(checks[g]["met"] for g in measured),
                                                "value": f"{sum(checks[g]['met'] for g in measured)}/{len(measured)}",
                                                "limit": "all of the gaps measured on the row"}
            cells.append({"unit": r["unit"], "seed": r["seed"], "checks": checks})
            for what, c in checks.items():
                n = counts.setdefault(what, {"met": 0, "of": 0})
                n["met"] += int(c["met"])
                n["of"] += 1
        result[name] = {"method": method, "cells": cells, "counts": counts}
    return result


def markdown(result: dict) -> str:
    lines = []
    for name, t in result.items():
        targets = list(t["counts"])
        lines += [f"## {name} ({t['method']})", "", "| digit or concept | seed | " + " | ".join(targets) + " |",
                  "|---|---:|" + "---|" * len(targets)]
        for c in t["cells"]:
            lines.append(f"| {c['unit']} | {c['seed']} | " + " | ".join(
                (f"{c['checks'][w]['value']} {'ok' if c['checks'][w]['met'] else '**miss**'}" if w in c["checks"] else "–")
                for w in targets) + " |")
        lines += ["", "| target | met on |", "|---|---|"]
        lines += [f"| {w} | {n['met']} of {n['of']} rows |" for w, n in t["counts"].items()]
        lines.append("")
    return "\n".join(lines)


@cli_errors
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="benchmarks/robust_digits.py results.json files (e.g. one per seed), or "
                                              "eval.shapes / eval.digits bench results.json files run with --attacks")
    p.add_argument("--cost_baseline", default="plain", help="the plain point costs are measured against (as robust_digits.py)")
    p.add_argument("--json", default=None, help="also write the tally here")
    a = p.parse_args(argv)
    check_json_output("--json", a.json, has_keys("results", "tally"))  # never over a file this tool did not write
    rows, points = load_rows(a.results)
    result = tally(rows, points, a.cost_baseline)
    print(markdown(result))
    if a.json:
        atomic_write_json(a.json, {"results": a.results, "tally": result})
    return result


if __name__ == "__main__":
    main()
