"""The digits table: erase one digit with several methods through ``erase/sd.py``, audit each, tabulate.

Every method gets the same step budget, batch size and forget / retain data (generated once per seed by the
base model into ``OUT/data/seed-<s>`` and shared). Each erasure is its own ``accelerate launch erase/sd.py``
process, so its wall time and peak resident memory (``wait4``'s ``ru_maxrss``, the largest process of the launch)
are measured alone. Writes ``OUT/results.json`` (every run and, per method, mean ± std over seeds),
``OUT/results.md``, ``OUT/chart.png`` and ``OUT/grid_<method>.png`` (sample images of seed 0 per digit).

The ``retrain`` row is the reference every erasure is measured against: the base model's settings trained from
scratch without the erased digits' images (``eval.digits retrain``; one model per seed, the seed as training seed,
cached by settings + held-out digits). ``--attacks NAME,...`` adds robustness columns (:mod:`eval.attack.utils.columns`):
each attack of the ``eval.attack`` registry is run by name, with one budget (``ATTACK_BUDGET`` + ``--attack_options``),
on the base, every retrain model and every erased model; its columns are the ``headline`` of its summary.json, budget curves
(``relearn_<step>``, ``inversion_<step>``, ``uda_asr_<iterations>``), and for each column ``<column>_gap``: the
model's value minus the retrain reference's at the same budget with the same images of the concept (the base
model's). ``eval/digits/tables.py`` writes results.md, the targets and chart.png (each attack's budget curve beside
the retrain curve).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from erase.utils.errors import UserError
from erase.utils.files import atomic_write_json, atomic_write_text
from eval.digits.model import DIGIT_WORDS, DigitsModelConfig, default_model_dir, train_digits_model
from eval.attack.utils import columns as robustness
from eval.attack.utils.columns import add_gaps, attack_headline, attack_options  # noqa: F401  (attack_headline: imported from here)
from eval.digits.tables import chart, grid, markdown, targets

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
# Per-method erase/sd.py settings for the digits model (the SD defaults are for an 860M-parameter UNet: the tiny
# UNet needs larger steps). Everything else is shared and listed in results.json.
METHOD_ARGS = {
    # the digits setting of Scissorhands: erase/sd.py's defaults (topk 2, lam 0.3, redirect, distill) at the digits
    # model's learning rate; chosen on the tuning digits seven and one only (benchmarks/digits_tune.py, docs/DIGITS.md)
    "scissorhands": ["--lr", "1e-3"],
    "esd": ["--lr", "1e-3", "--esd_ddim_steps", "20", "--esd_start_guidance", "4.0"],
    "salun": ["--lr", "1e-3"],
    "ga": ["--lr", "1e-4"],
    "ft": ["--lr", "1e-3"],
}
METRICS = ("forget_acc", "forget_acc_max", "retain_acc", "retain_fd", "heldout_forget_acc", "heldout_retain_acc",
           "relearn_0", "relearn_10", "relearn_25", "update_violations", "wall_seconds", "cpu_seconds", "peak_rss_mb")


def launch_cmd(launcher: str) -> list[str]:
    """The start of a bench's ``erase/sd.py`` command: ``accelerate launch`` on one process, or plain python."""
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [sys.executable]


def run_recorded(cmd: list[str], out_dir: Path, what: str, describe=None) -> dict:
    """Run ``cmd`` (an erasure writing ``out_dir``) in its own process, its log at ``out_dir``'s name + ``.log``, and
    record what it cost in ``<out_dir>.json``: wall seconds, CPU seconds and peak resident memory (``wait4``'s, the
    largest process of the launch), the command and the log; ``describe(info)`` may rename or add fields (the shapes
    bench's). A record of the same command beside a finished ``erase_config.json`` is returned instead of running
    again (a rerun resumes the table). A failed run: UserError naming ``what``, the exit code and the log's last line."""
    record = out_dir.parent / f"{out_dir.name}.json"
    if record.is_file() and (out_dir / "erase_config.json").is_file():
        try:
            done = json.loads(record.read_text())
        except (OSError, ValueError):
            done = None  # an unreadable record is no record: the erasure runs again and replaces it
        if isinstance(done, dict) and done.get("command") == cmd:
            logger.info("erase: %s already done, reused", out_dir.name)
            return done
    logger.info("erase: %s", " ".join(shlex.quote(c) for c in cmd))
    log = out_dir.parent / f"{out_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise UserError(f"{what} failed (exit {code}): {tail[0]} (log: {log})")
    info = {"wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024.0,
            "command": cmd, "log": str(log)}
    info = describe(info) if describe else info
    atomic_write_json(record, info)
    return info


def concept_name(digit: int | list[int]) -> str:
    """3 -> "three"; [3, 5, 8] -> "three,five,eight" (erase/sd.py's --concept)."""
    return ",".join(DIGIT_WORDS[d] for d in ([digit] if isinstance(digit, int) else digit))


def is_closed_form(method: str) -> bool:
    """Whether ``method`` is a closed-form editor (uce, speed): one edit from prompts, no repair steps, no images."""
    from erase.core import get_method_class

    return bool(getattr(get_method_class(method, "diffusion"), "closed_form", False))


def run_erasure(base: str, digit: int | list[int], method: str, seed: int, out_dir: Path, data_dir: Path, args) -> dict:
    """One ``erase/sd.py`` run in its own process; returns wall seconds, peak RSS and the command."""
    # erase/sd.py runs in the repository root: every path it gets is absolute, so the caller's folder is what counts
    out_dir, data_dir = Path(out_dir).absolute(), Path(data_dir).absolute()
    base = str(Path(base).absolute()) if Path(base).exists() else str(base)
    cmd = launch_cmd(args.launcher) + [
        str(ROOT / "erase" / "sd.py"), "--pretrained_model_name_or_path", str(base), "--concept", concept_name(digit),
        "--method", method, "--max_train_steps", str(0 if is_closed_form(method) else args.max_train_steps), "--seed", str(seed),
        "--output_dir", str(out_dir), "--data_dir", str(data_dir), "--train_batch_size", str(args.train_batch_size),
        "--num_forget_images", str(args.num_forget_images), "--num_retain_images", str(args.num_retain_images),
        "--num_inference_steps", str(args.steps), "--guidance_scale", str(args.guidance),
        "--generation_batch_size", "64", "--log_every", "1000",
    ] + METHOD_ARGS.get(method, []) + shlex.split(args.erase_args or "")
    return run_recorded(cmd, out_dir, f"erase/sd.py --method {method} --seed {seed}")


def _score(model: str, digit: int | list[int], out: Path, args) -> dict:
    from eval.digits.score import score

    digits = [digit] if isinstance(digit, int) else list(digit)
    ns = SimpleNamespace(model=str(model), digit=digits[0], digits=digits, concept=concept_name(digits), forget_prompts=None,
                         retain_prompts=None, num_images=args.num_images, seeds=[0], steps=args.steps,
                         guidance=args.guidance, scheduler=None, batch_size=100, no_heldout=False, output_dir=str(out))
    return score(ns)


def parse_attacks(args) -> tuple[list[str], dict]:
    """(attack names, {name: budget}) of the table's --attacks (eval.attack.utils.columns): one erased digit."""
    return robustness.parse_attacks(args, len(args.digits), unit="digit")


def run_attacks(model: str, args, out: Path, row: str, learn_from_base: bool = False) -> dict:
    """Every --attacks attack on ``model`` against the erased digit with the table's one budget; their columns."""
    return robustness.run_attacks(model, args, out, row, DIGIT_WORDS[args.digits[0]], learn_from_base)


def _repair(run_dir: Path) -> dict:
    """How often a projected step's applied update still lowered the memory forget loss (Scissorhands only)."""
    repair = json.loads((run_dir / "erase_config.json").read_text()).get("repair") or {}
    return {"update_violations": repair["update_violated_after"]} if "update_violated_after" in repair else {}


def _reusable_score(run_dir: Path, score_dir: Path, args) -> dict | None:
    """An earlier audit of this very erasure with the same audit settings, or None (a rerun resumes the table)."""
    from eval.digits.score import ROW_SEED_RULE

    path, record = score_dir / "summary.json", run_dir.parent / f"{run_dir.name}.json"
    if not (path.is_file() and record.is_file() and (run_dir / "erase_config.json").is_file()):
        return None
    if path.stat().st_mtime < record.stat().st_mtime:  # the erasure was redone after this audit
        return None
    summary = json.loads(path.read_text())
    st, gen = summary.get("settings", {}), summary.get("settings", {}).get("generation", {})
    same = (st.get("erase_config") == json.loads((run_dir / "erase_config.json").read_text())
            and st.get("num_images_per_digit_per_seed") == args.num_images and st.get("seeds") == [0]
            and gen.get("steps") == args.steps and gen.get("guidance") == args.guidance and "heldout" in summary
            and st.get("row_seed_rule") == ROW_SEED_RULE)
    return summary if same else None


def _row(summary: dict, extra: dict | None = None) -> dict:
    held = summary.get("heldout") or {}
    per_forget = summary.get("forget_acc_per_digit") or {}
    return {"forget_acc": summary["forget_acc"], "retain_acc": summary["retain_acc"], "retain_fd": summary["retain_fd"],
            "forget_acc_max": max(per_forget.values()) if per_forget else summary["forget_acc"],
            "heldout_forget_acc": held.get("forget_acc"), "heldout_retain_acc": held.get("retain_acc"),
            "per_digit_acc": summary["per_digit_acc"], **(extra or {})}


def _aggregate(runs: list[dict], columns=()) -> dict:
    out = {}
    for k in list(METRICS) + [c for c in columns if c not in METRICS]:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                      "n": len(vals)}
    return out


def bench(args) -> dict:
    """Run the table; see the module docstring."""
    from tqdm.auto import tqdm

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from erase.core import available_methods

    known = available_methods("diffusion")
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise UserError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from: {', '.join(known)}")
    out = Path(args.output_dir)
    default = DigitsModelConfig(denoiser=getattr(args, "denoiser", "unet"))
    base = Path(args.model) if args.model else default_model_dir(default)
    if args.model:
        from eval.digits.score import resolve_digits_model

        resolve_digits_model(str(base))
    else:
        train_digits_model(default, base)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    attacks = list(getattr(args, "attacks", None) or [])
    base_summary = _score(str(base), args.digits, out / "base", args)
    results = {"concept": concept_name(args.digits), "digits": args.digits, "base_model": str(base), "base": _row(base_summary),
               "runs": {}, "methods": {}}
    columns: list[str] = []

    def attacked(model, row: str, learn_from_base: bool = False) -> dict:
        found = run_attacks(model, args, out, row, learn_from_base) if attacks else {}
        columns.extend(c for c in found if c not in columns)
        return found

    results["base_attacks"] = attacked(base, "base")
    retrain_info = None
    if not getattr(args, "no_retrain", False):
        from eval.digits.retrain import retrain_config, retrain_model

        retrain_info = {"held_out_digits": list(args.digits), "models": {}, "fingerprints": {},
                        "config": retrain_config(str(base), args.digits, args.seeds[0]).to_dict(),
                        "seed_rule": "retrain row of seed s: the base settings with seed s, trained without the erased "
                                     "digits' images (eval.digits retrain)",
                        "attack_images": "the retrain row's attacks learn from the images of the concept the base model "
                                         "drew for the base row (base-concept-images/<attack>/): it cannot draw them itself"}
        for s in tqdm(args.seeds, desc="retrain + audit", unit="model"):
            cfg = retrain_config(str(base), args.digits, s)  # the base's own settings (its card), seed s
            model = retrain_model(str(base), args.digits, s, progress=False)
            retrain_info["models"][str(s)], retrain_info["fingerprints"][str(s)] = str(model), cfg.fingerprint()
            summary = _score(str(model), args.digits, out / "scores" / f"retrain-seed{s}", args)
            results["runs"].setdefault("retrain", []).append(_row(summary, {"seed": s, **attacked(model, f"retrain-seed{s}", learn_from_base=True)}))
    jobs = [(m, s) for m in methods for s in args.seeds]
    for m, s in tqdm(jobs, desc="erase + audit", unit="run"):
        run_dir = out / "runs" / f"{m}-seed{s}"
        info = run_erasure(str(base), args.digits, m, s, run_dir, out / "data" / f"seed-{s}", args)
        summary = _reusable_score(run_dir, out / "scores" / f"{m}-seed{s}", args)
        if summary is None:
            summary = _score(str(run_dir), args.digits, out / "scores" / f"{m}-seed{s}", args)
        else:
            logger.info("audit: %s-seed%s already done, reused", m, s)
        extra = {"seed": s, **info, **_repair(run_dir), **attacked(run_dir, f"{m}-seed{s}")}
        results["runs"].setdefault(m, []).append(_row(summary, extra))
    gap_columns = add_gaps(results, columns) if retrain_info else []
    for m in methods:
        results["methods"][m] = _aggregate(results["runs"][m], columns + gap_columns)
        grid(out / "scores" / f"{m}-seed{args.seeds[0]}", out / f"grid_{m}.png")
    results["retrain"] = _aggregate(results["runs"]["retrain"], columns) if retrain_info else None
    results["base_attacks"] = _aggregate([results["base_attacks"]], columns + gap_columns)
    results["attack_columns"] = columns
    grid(out / "base", out / "grid_base.png")
    results["settings"] = {
        "methods": methods, "seeds": args.seeds, "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size, "num_forget_images": args.num_forget_images,
        "num_retain_images": args.num_retain_images, "method_args": {m: METHOD_ARGS.get(m, []) for m in methods},
        "erase_args": args.erase_args, "launcher": args.launcher, "num_images": args.num_images,
        "attacks": {n: {"options": attack_options(n, args),
                        "budget_rule": "the same options for the base, every retrain model and every erased model"}
                    for n in attacks},
        "retrain": retrain_info,
        "gap_rule": robustness.GAP_RULE,
        "steps": args.steps, "guidance": args.guidance, "scheduler": base_summary["settings"]["generation"]["scheduler"],
        "audit_settings": base_summary["settings"]["generation"], "judge": base_summary["settings"]["judge"],
    }
    results["targets"] = targets(results)
    results["seconds"] = round(time.time() - start, 1)
    chart(results, out / "chart.png")
    atomic_write_text(out / "results.md", markdown(results))
    atomic_write_json(out / "results.json", results)
    print(markdown(results))
    return results
