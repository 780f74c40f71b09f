"""The digits table over many erased digits: ``eval.digits bench`` once per concept, in parallel lanes, then one table.

    python benchmarks/digits_sweep.py --concepts zero,two,three,four,five,six,eight,nine --methods scissorhands \\
        --seeds 0,1,2 --lanes 2 --output_dir OUT [--relearn] [-- extra eval.digits bench flags]

Each concept's bench writes ``OUT/<concept>/results.json`` (a rerun reuses its finished erasures and audits); this
script writes ``OUT/sweep.json`` and ``OUT/sweep.md``: one row per (concept, method) with forget / held-out forget /
retain (and the base's) / FD ratio / relearning columns, each target of issue 8 checked per concept, and how many
concepts met each. Several digits at once are one concept item written with ``+`` (``three+five+eight``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from erase.utils.folders import check_output_dir, hold_output_dir  # noqa: E402
from erase.utils.errors import UserError, cli_errors  # noqa: E402
from erase.utils.files import atomic_write_json, atomic_write_text  # noqa: E402


@cli_errors
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", required=True, help="comma-separated digits; several at once joined by + (three+five+eight)")
    p.add_argument("--methods", default="scissorhands")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lanes", type=int, default=2, help="bench processes at once (one torch thread each)")
    p.add_argument("--relearn", action="store_true", help="pass --relearn to every bench")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir this tool did not create")
    p.add_argument("extra", nargs="*", help="more eval.digits bench flags, after --")
    a = p.parse_args(argv)
    check_args(a)
    return a


def check_args(a) -> None:
    """Every check before the output folder is claimed or a bench starts: --lanes, the concepts (each item digits
    joined by +, no item twice), --methods, --seeds, and each bench's whole command line as eval.digits reads it."""
    import contextlib
    import io

    from benchmarks.inputs import check_counts, name_list
    from erase.utils.checks import check_int_list
    from erase.core import available_methods
    from eval.digits.__main__ import parse_args as bench_args
    from eval.digits.model import DIGIT_WORDS, parse_digits

    check_counts(a, lanes=1)
    a.concept_list, seen = [], {}
    for item in name_list("--concepts", a.concepts, what="concept"):
        try:
            digits = parse_digits(item.replace("+", ","))
        except ValueError as e:
            raise UserError(f"--concepts item {item!r}: {str(e).removeprefix('error: ')}") from None
        key = frozenset(digits)
        if key in seen:
            raise UserError(f"--concepts {a.concepts!r} names {'+'.join(DIGIT_WORDS[d] for d in sorted(key))} twice "
                            f"({seen[key]!r} and {item!r}); each concept may appear once")
        seen[key] = item
        a.concept_list.append(item.replace("+", ","))
    name_list("--methods", a.methods, available_methods("diffusion"), what="method")
    check_int_list("--seeds", a.seeds)
    check_output_dir(a.output_dir, overwrite=a.overwrite, by="benchmarks/digits_sweep.py")  # the claim's rules, read-only
    for concept in a.concept_list:
        argv = ["bench", "--concept", concept, "--methods", a.methods, "--seeds", a.seeds, "--output_dir",
                str(Path(a.output_dir) / concept.replace(",", "+"))] + (["--relearn"] if a.relearn else []) + list(a.extra)
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                bench_args(argv)
        except SystemExit as e:  # a one-line error (its message), or argparse's (its last line names the flag)
            if e.code in (0, None):  # -- --help: the bench's help, printed
                raise
            lines = [x for x in [*said.getvalue().strip().splitlines(), str(e.code or "")] if x.strip() and x != "2"]
            message = lines[-1].split("error: ", 1)[-1] if lines else "refused"
            raise UserError(f"eval.digits bench --concept {concept} with these flags: {message}") from None


def run_bench(concept: str, a, out: Path) -> dict:
    folder = out / concept.replace(",", "+")
    cmd = [sys.executable, "-m", "eval.digits", "bench", "--concept", concept, "--methods", a.methods, "--seeds", a.seeds,
           "--output_dir", str(folder)] + (["--relearn"] if a.relearn else []) + list(a.extra)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{folder.name}.log"  # beside the bench folder, which bench claims as its own
    start = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if code != 0:
        raise SystemExit(f"error: bench for {concept} failed (exit {code}); see {log_path}")
    results = json.loads((folder / "results.json").read_text())
    results["sweep_seconds"] = round(time.time() - start, 1)
    return results


def pct(cell) -> str:
    return "–" if not cell else f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"


def markdown(sweep: dict) -> str:
    lines = [f"# Digits sweep: {sweep['methods']} on {', '.join(sweep['concepts'])} (seeds {sweep['seeds']})", "",
             "| concept | method | forget ↓ | held-out forget ↓ | retain ↑ (base) | FD / base ↓ | relearn @10 / @25 ↓ | targets met |",
             "|---|---|---|---|---|---|---|---|"]
    for concept, r in sweep["results"].items():
        base = r["base"]
        met = {t["target"]: t["met"] for t in r["targets"]}
        for m, agg in r["methods"].items():
            fd = agg["retain_fd"]["mean"] / base["retain_fd"]
            rel = " / ".join(pct(agg.get(f"relearn_{k}")) for k in (10, 25)) if agg.get("relearn_25") else "–"
            mine = f"{sum(met.values())}/{len(met)}" if m == "scissorhands" else ""
            lines.append(f"| {concept} | {m} | {pct(agg['forget_acc'])} | {pct(agg.get('heldout_forget_acc'))} | "
                         f"{pct(agg['retain_acc'])} ({100 * base['retain_acc']:.1f}) | {fd:.2f} | {rel} | {mine} |")
    lines += ["", "Targets (Scissorhands), concepts meeting each:", ""]
    for target, (n, total, misses) in sweep["target_counts"].items():
        lines.append(f"- {target}: {n}/{total}" + (f" (missed on {', '.join(misses)})" if misses else ""))
    return "\n".join(lines) + "\n"


@cli_errors
def main(argv=None) -> dict:
    a = parse_args(argv)
    with hold_output_dir(a.output_dir, overwrite=a.overwrite, by="benchmarks/digits_sweep.py"):  # ours, one run at a time
        return _main(a)


def _main(a) -> dict:
    out = Path(a.output_dir)
    concepts = a.concept_list
    start = time.time()
    with ThreadPoolExecutor(max_workers=a.lanes) as pool:
        results = dict(zip(concepts, pool.map(lambda c: run_bench(c, a, out), concepts)))
    counts: dict[str, list] = {}
    for concept, r in results.items():
        for t in r["targets"]:
            n, total, misses = counts.setdefault(t["target"], [0, 0, []])
            counts[t["target"]] = [n + bool(t["met"]), total + 1, misses + ([] if t["met"] else [concept])]
    sweep = {"concepts": concepts, "methods": a.methods, "seeds": a.seeds, "relearn": a.relearn, "extra": a.extra,
             "results": results, "target_counts": counts, "seconds": round(time.time() - start, 1)}
    atomic_write_json(out / "sweep.json", sweep)
    atomic_write_text(out / "sweep.md", markdown(sweep))
    print(markdown(sweep))
    return sweep


if __name__ == "__main__":
    main()
