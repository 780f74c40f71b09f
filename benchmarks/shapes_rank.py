"""Issue 19's fixed ranking over ``eval.shapes bench`` results: which method is first on each evaluation concept.

The ranking (docs/SHAPES.md, fixed before the first evaluation run): methods whose mean ``forget_acc`` is <= 2 % come
first; among them the lowest mean drop (per seed the mean of the neighbour, co-occurrence and composition drops from
the base, in points); then the lowest retain FD ratio. Methods above the forget bar follow, by their forget. With
several seeds the drops are also compared paired, seed by seed, between the first method and each other one: a
method is *tied-best* when it passes the bar and its paired mean difference from the first is within the paired
differences' standard error (with one seed: never; the table says how many seeds each concept had).

Several files of one concept are ranked together when their base rows agree (the same base model and audits): a
bench run with other seeds adds its seeds, one run with ``--erase_args`` adds its methods as rows of their own,
named with those flags (``scissorhands --robust``).

    python benchmarks/shapes_rank.py OUT/bench-circle/results.json OUT/bench-orange/results.json ... [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.shapes_tune import DROPS  # noqa: E402  (the tuning rule's kept-concept columns)
from benchmarks.inputs import check_json_output  # noqa: E402
from erase.utils.errors import cli_errors, UserError  # noqa: E402
from erase.utils.files import atomic_write_json  # noqa: E402

BAR = 0.02


def drop(run: dict, base: dict) -> float:
    """One run's mean drop from the base over the three kept-concept columns, in points."""
    return float(np.mean([100 * (base[k] - run[k]) for k in DROPS]))


def rank(results: dict) -> dict:
    """The ranking of one bench's ``results.json`` (see the module's docstring)."""
    base, rows = results["base"], {}
    for method, runs in results["runs"].items():
        if method == "retrain" or not runs:
            continue
        by_seed = {r["seed"]: r for r in runs}
        rows[method] = {"forget_acc": float(np.mean([r["forget_acc"] for r in runs])),
                        "mean_drop": float(np.mean([drop(r, base) for r in runs])),
                        "fd_ratio": float(np.mean([r["retain_fd"] / base["retain_fd"] for r in runs])),
                        "drops_by_seed": {s: drop(r, base) for s, r in by_seed.items()}, "seeds": sorted(by_seed)}
    passing = sorted((m for m in rows if rows[m]["forget_acc"] <= BAR), key=lambda m: (rows[m]["mean_drop"], rows[m]["fd_ratio"]))
    failing = sorted((m for m in rows if rows[m]["forget_acc"] > BAR), key=lambda m: (rows[m]["forget_acc"], rows[m]["mean_drop"]))
    first = passing[0] if passing else None
    tied = []
    for m in passing[1:]:
        common = sorted(set(rows[m]["seeds"]) & set(rows[first]["seeds"]))
        d = np.array([rows[m]["drops_by_seed"][s] - rows[first]["drops_by_seed"][s] for s in common])
        if len(d) >= 2 and d.mean() <= d.std(ddof=1) / np.sqrt(len(d)):
            tied.append(m)
    return {"concept": results.get("concept"), "order": passing + failing, "passing": passing, "first": first,
            "tied_best": tied, "rows": rows, "seeds": sorted({s for r in rows.values() for s in r["seeds"]})}


def place(r: dict, method: str) -> str:
    if method not in r["rows"]:
        return "not run"
    if method == r["first"] or method in r["tied_best"]:
        return "first" if method == r["first"] else "tied first"
    if method in r["passing"]:
        return f"{r['passing'].index(method) + 1} of {len(r['passing'])} under the bar"
    return "above the forget bar"


def markdown(ranks: list[dict], method: str = "scissorhands") -> str:
    lines = ["| concept | seeds | under the forget bar (mean drop, FD x) | first | " + method + " |", "|---|---|---|---|---|"]
    for r in ranks:
        under = ", ".join(f"{m} ({r['rows'][m]['mean_drop']:+.1f}, {r['rows'][m]['fd_ratio']:.2f})" for m in r["passing"]) or "none"
        lines.append(f"| {r['concept']} | {','.join(map(str, r['seeds']))} | {under} | {r['first'] or 'none'} | {place(r, method)} |")
    wins = sum(place(r, method) in ("first", "tied first") for r in ranks)
    lines += ["", f"{method} first or tied first on {wins} of {len(ranks)} concepts."]
    return "\n".join(lines) + "\n"


@cli_errors
def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="eval.shapes bench results.json files (several of one concept are joined)")
    p.add_argument("--method", default="scissorhands", help="the method whose place the last column gives")
    p.add_argument("--json", default=None, help="also write the rankings here")
    a = p.parse_args(argv)
    check_json_output("--json", a.json, _ours)  # never over a file this tool did not write
    ranks = []
    for f, results in merged(a.results).values():  # files this tool did not write: anything in them may be wrong
        try:
            ranks.append(rank(results))
        except (KeyError, TypeError, AttributeError, ValueError, ZeroDivisionError) as e:
            raise UserError(f"{f} is not an eval.shapes bench results.json ({type(e).__name__}: {e})") from None
    print(markdown(ranks, a.method), end="")
    if a.json:
        atomic_write_json(Path(a.json), {"bar": BAR, "drops": list(DROPS), "rankings": ranks, "files": a.results})
    return ranks


def merged(files: list[str]) -> dict[str, tuple[str, dict]]:
    """The files' results per concept, as (the concept's first file, results): runs of several files of one concept
    are joined when their base rows agree on the ranked columns; a method run with ``--erase_args`` is a row of its
    own, named ``"<method> <erase_args>"``; the same row and seed twice is refused."""
    out: dict[str, tuple[str, dict]] = {}
    for f in files:
        try:
            results = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{f} is not a readable results.json ({e})") from None
        if not isinstance(results, dict) or not isinstance(results.get("base"), dict) or not isinstance(results.get("runs"), dict):
            raise UserError(f"{f} is not an eval.shapes bench results.json (no 'base' and 'runs')")
        settings = results.get("settings") if isinstance(results.get("settings"), dict) else {}
        flags = str(settings.get("erase_args") or "").strip()
        runs = {(f"{m} {flags}" if flags and m != "retrain" else m): rs for m, rs in results["runs"].items()}
        concept = results.get("concept")
        if concept not in out:
            out[concept] = (f, {**results, "runs": runs})
            continue
        first, into = out[concept]
        if any(into["base"].get(k) != results["base"].get(k) for k in ("forget_acc", "retain_fd") + DROPS):
            raise UserError(f"{f} and {first} rank {concept!r} from different base rows (another model or audit): "
                            "give one of them")
        for m, rs in runs.items():
            seen = {r.get("seed") for r in into["runs"].get(m, []) if isinstance(r, dict)}
            if m == "retrain":  # not ranked: the reference per seed is the same model in every bench
                rs = [r for r in rs if isinstance(r, dict) and r.get("seed") not in seen]
            again = sorted(str(r.get("seed")) for r in rs if isinstance(r, dict) and r.get("seed") in seen)
            if again:
                raise UserError(f"{f} repeats {m!r} seed {', '.join(again)} of {first} for {concept!r}: give one of them")
            into["runs"][m] = list(into["runs"].get(m, [])) + list(rs)
    return out


def _ours(old) -> bool:
    """Whether an existing ``--json`` file's JSON is a rankings file this tool wrote (the only kind it replaces)."""
    return isinstance(old, dict) and {"bar", "drops", "rankings", "files"} <= old.keys()


if __name__ == "__main__":
    main()
