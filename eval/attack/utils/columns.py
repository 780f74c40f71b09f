"""Robustness columns of a benchmark table (``eval.digits bench``, ``eval.shapes bench``: ``--attacks``).

Each attack of the ``eval.attack`` registry runs by name with **one budget** for every model of a table
(``ATTACK_BUDGET`` + ``--attack_options``): the base, every retrain reference and every erased model. Its columns
are the ``headline`` of its summary.json, as budget curves (``relearn_<step>``, ``inversion_<step>``,
``uda_asr_<iterations>``), and for each column ``<column>_gap``: the model's value minus the retrain reference's at
the same budget, with the same images of the concept (the base model's; a retrain model cannot draw the concept it
never saw). The tables and charts of both benches draw these columns with :func:`robustness_markdown` and
:func:`plot_curves`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np

from erase.utils.errors import UserError

RELEARN_STEPS = (0, 10, 25, 50, 100)
INVERSION_STEPS = (0, 100, 250, 500, 1000, 2000)
# The budget of each attack, the same for every model of a table (the audit generation settings are the bench's:
# --num_images, --steps, --guidance), as budget curves: relearning checked at 0/10/25/50/100 steps, inversion at
# 0/100/250/500/1000/2000, unlearndiffatk judged after each of its 50 blocks of 40 iterations (2 restarts, as its
# optimiser was chosen with). An attack not listed runs with its config's defaults. --attack_options overrides, again
# for every model (e.g. {"inversion": {"budget": "cce"}}: the concept-inversion paper's 5000 steps, a GPU job).
ATTACK_BUDGET = {"relearn": {"relearn_params": "all", "eval_steps": RELEARN_STEPS, "relearn_seeds": (0, 1, 2)},
                 "inversion": {"eval_steps": INVERSION_STEPS},
                 "unlearndiffatk": {"restarts": 2}}
# attack columns that form a budget curve: relearn_<step>, inversion_<step>, uda_asr_<iterations>
CURVE = re.compile(r"(relearn|relearn_targets|inversion|uda_asr)_(\d+)")
# issue 17's robustness targets: (column, largest gap to the retrain reference, what it is)
ROBUST_TARGETS = (("inversion_500", 0.10, "inversion at 500 steps"), ("inversion_2000", 0.10, "inversion at 2000 steps"),
                  ("relearn_25", 0.10, "relearning at 25 steps"),
                  ("uda_minus_control", 0.05, "unlearndiffatk asr_minus_control"))
GAP_RULE = ("<column>_gap = the run's value - the retrain model of the same seed's (the retrain mean when that seed has "
            "none; for the base row, the retrain mean): the same budget and the same images of the concept (the base model's)")


def read_attack_options(text: str | None) -> dict:
    """``--attack_options`` (a JSON object of objects, one per attack) as a dict; anything else is one line."""
    try:
        extra = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--attack_options is not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise UserError(f"--attack_options must be a JSON object of objects ({{\"relearn\": {{\"eval_steps\": [0, 10]}}}}), "
                        f"got {text!r}")
    return extra


def parse_attacks(args, erased: int, unit: str = "concept") -> tuple[list[str], dict]:
    """(attack names, {name: budget}) from --attacks / --relearn / --attack_options; every name and field checked.
    ``erased``: how many concepts the table erases at once (the attacks audit one)."""
    from eval.attack import get_attack

    names = [n.strip() for n in (args.attacks or "").split(",") if n.strip()]
    if getattr(args, "relearn", False) and "relearn" not in names:
        names.insert(0, "relearn")
    if len(set(names)) != len(names):
        raise UserError(f"--attacks {args.attacks!r} names an attack twice")
    extra = read_attack_options(args.attack_options)
    unused = sorted(set(extra) - set(names))
    if unused:
        raise UserError(f"--attack_options names {', '.join(unused)}, which --attacks does not run ({', '.join(names) or 'none'})")
    if names and erased > 1:
        raise UserError(f"--attacks / --relearn audit one erased {unit}, --concept {args.concept} names {erased}")
    budgets = {}
    for name in names:
        attack = get_attack(name)  # UserError listing the registered attacks
        fields = {f.name for f in dataclasses.fields(attack.config_cls)} - {"model", "concept", "output_dir"}
        budget = {**ATTACK_BUDGET.get(name, {}), **extra.get(name, {})}
        bad = sorted(set(budget) - fields)
        if bad:
            raise UserError(f"--attack_options: attack {name} has no option {', '.join(bad)}; it has: {', '.join(sorted(fields))}")
        budgets[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in budget.items()}
    return names, budgets


def attack_headline(name: str, summary: dict) -> dict:
    """The numbers an attack's summary puts in a table: its ``headline`` ({column: value}), or its ``hit_rate``."""
    head = summary.get("headline")
    if isinstance(head, dict) and head:
        return {str(k): v for k, v in head.items()}
    if isinstance(summary.get("hit_rate"), (int, float)):
        return {name: summary["hit_rate"]}
    raise UserError(f"attack {name}'s summary has neither a 'headline' dict nor a numeric 'hit_rate' to tabulate")


def attack_options(name: str, args) -> dict:
    """The one budget of attack ``name`` in this table: the audit's generation settings and ``--attack_options``."""
    from eval.attack import get_attack

    options = {"num_images": args.num_images, "steps": args.steps, "guidance": args.guidance, **args.attack_options[name]}
    if "images_per_prompt" in {f.name for f in dataclasses.fields(get_attack(name).config_cls)}:
        options.pop("num_images")  # judged per prompt (unlearndiffatk): its images_per_prompt is its budget
    return options


def base_concept_images(out: Path, name: str) -> Path | None:
    """The images of the concept the base model drew for attack ``name`` (``out/<name>/base/target``), as a folder an
    attack's ``target_images`` reads: the PNGs with their prompts as ``x.txt``; None when that attack drew none."""
    from erase.diffusion.generate import read_image_meta

    drawn = sorted((out / name / "base" / "target").glob("*.png"))
    if not drawn:
        return None
    folder = out / "base-concept-images" / name
    if not folder.is_dir() or sorted(p.name for p in folder.glob("*.png")) != [p.name for p in drawn]:
        stage = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        for png in drawn:
            shutil.copy2(png, stage / png.name)
            (stage / png.with_suffix(".txt").name).write_text(read_image_meta(png).get("prompt", "") + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        stage.rename(folder)
    return folder


def run_attacks(model: str, args, out: Path, row: str, concept: str, learn_from_base: bool = False,
                shared: dict | None = None) -> dict:
    """Every ``args.attacks`` attack on ``model`` against ``concept`` with the table's one budget; their headline columns
    (the attacks' outputs in ``out/<attack>/<row>``). ``shared``: fields every attack gets (e.g. ``forget_prompts``).

    ``learn_from_base``: the attacks' images of the concept are the ones the **base** model drew for its own row (a
    retrain model cannot draw the concept it never saw, and an attack learns from images drawn by the attacked
    model's base): how fast a model that never knew the concept learns it from real images of it."""
    from eval.attack import get_attack

    columns = {}
    for name in args.attacks:
        attack = get_attack(name)
        options = {**(shared or {}), **attack_options(name, args)}
        if learn_from_base and "target_images" in {f.name for f in dataclasses.fields(attack.config_cls)}:
            folder = base_concept_images(out, name)
            if folder is None:
                raise UserError(f"attack {name}: the base row drew no images of the concept to give the retrain row")
            options["target_images"] = str(folder)
        cfg = attack.config_cls(model=str(model), concept=concept, output_dir=str(out / name / row), **options)
        columns.update(attack_headline(name, attack.run(cfg)))
    return columns


def add_gaps(results: dict, columns: list[str]) -> list[str]:
    """``<column>_gap`` on every run and on the base row: its value minus the retrain reference's at the same budget
    (the retrain model of the same seed, else the retrain mean); the gap columns' names."""
    retrain = {r["seed"]: r for r in results["runs"].get("retrain", [])}
    mean = {c: float(np.mean([r[c] for r in retrain.values() if r.get(c) is not None]))
            for c in columns if any(r.get(c) is not None for r in retrain.values())}
    gaps = [f"{c}_gap" for c in columns if c in mean]
    rows = [r for m, runs in results["runs"].items() if m != "retrain" for r in runs]
    for row in rows + [results["base_attacks"]]:
        ref = retrain.get(row.get("seed"), {})
        for c in mean:
            if row.get(c) is not None:
                row[f"{c}_gap"] = row[c] - (ref[c] if ref.get(c) is not None else mean[c])
    return gaps


def gap_targets(agg: dict, who: str = "Scissorhands") -> list[dict]:
    """Issue 17's robustness targets on one row's aggregate (``{column: {"mean": ...}}``): each gap measured."""
    out = []
    for col, limit, what in ROBUST_TARGETS:
        gap = agg.get(f"{col}_gap", {}).get("mean")
        if gap is not None:
            out.append({"target": f"{who} {what}: gap to the retrain reference <= {100 * limit:.0f} points",
                        "met": gap <= limit, "value": f"{100 * gap:+.1f} points"})
    return out


def _fmt(cell: dict | None) -> str:
    return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}" if cell else "–"


def robustness_markdown(results: dict, rows: dict, unit: str = "concept") -> list[str]:
    """The robustness section of a table's results.md: every attack column per row (``rows``: name -> aggregate,
    the retrain reference first), then each column's gap to the retrain reference. Empty without attacks."""
    columns = results.get("attack_columns") or []
    if not columns:
        return []
    budget = results["settings"]["attacks"]
    lines = ["", "## Robustness", "",
             "Each attack run with one budget on every model (" + "; ".join(
                 f"{n}: {json.dumps(b['options'], sort_keys=True)}" for n, b in budget.items()) + "). "
             "Columns are each attack's headline (hit rate of the judge, %), mean ± std over seeds.", "",
             "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m, agg in {"base (no erasure)": results["base_attacks"], **rows}.items():
        lines.append(f"| {m} | " + " | ".join(_fmt(agg.get(c)) for c in columns) + " |")
    gaps = [c for c in columns if any(f"{c}_gap" in agg for agg in results["methods"].values())]
    if gaps:
        lines += ["", "### Gap to the retrain reference", "",
                  "Hit rate on the model minus hit rate on the retrain reference (the same budget, the same images "
                  "of the concept), in points; an erasure of seed s against the retrain model of seed s, mean ± std "
                  f"over seeds. 0 is a model that never learned the {unit}.", "",
                  "| model | " + " | ".join(f"{c}_gap" for c in gaps) + " |", "|---|" + "---|" * len(gaps)]
        for m, agg in {"base (no erasure)": results["base_attacks"], **results["methods"]}.items():
            lines.append(f"| {m} | " + " | ".join(_fmt(agg.get(f"{c}_gap")) for c in gaps) + " |")
    return lines


def curves(columns) -> dict[str, list[tuple[int, str]]]:
    """The budget curves among the attack columns: {"relearn": [(step, column), ...], "inversion": ..., "uda_asr": ...}."""
    out: dict[str, list[tuple[int, str]]] = {}
    for c in columns:
        m = CURVE.fullmatch(c)
        if m:
            out.setdefault(m.group(1), []).append((int(m.group(2)), c))
    return {k: sorted(v) for k, v in out.items() if len(v) > 1}


def plot_curves(axes, results: dict, rows: dict) -> None:
    """Each attack's budget curve (hit rate against attack steps) on its own axis, for the base (dotted grey), the
    retrain reference (``rows["retrain"]``, dashed black) and every other row; spare axes are switched off."""
    budget = curves(results.get("attack_columns") or [])
    axes = list(axes)
    for ax, (attack, points) in zip(axes, budget.items()):
        steps = [s for s, _ in points]
        series = {"base": (results.get("base_attacks") or {}), **rows}
        for j, (name, agg) in enumerate(series.items()):
            ys = [agg.get(c, {}).get("mean") for _, c in points]
            if any(y is None for y in ys):
                continue
            style = dict(color="black", ls="--", lw=2) if name.startswith("retrain") else \
                dict(color="grey", ls=":") if name == "base" else dict(color=f"C{j % 10}")
            ax.plot(steps, [100 * y for y in ys], marker="o", ms=3, label=name, **style)
        ax.set_title(f"{attack}: hit rate % vs attack steps")
        ax.set_ylim(-2, 102)
        ax.set_xlabel("iterations" if attack == "uda_asr" else "steps")
        ax.legend(fontsize=7)
    for ax in axes[len(budget):]:
        ax.axis("off")


def add_attack_args(parser, unit: str = "concept") -> None:
    """A bench's ``--attacks`` and ``--attack_options`` flags (``unit``: what the table erases, "digit", "concept")."""
    parser.add_argument("--attacks", default=None,
                        help="robustness columns: eval.attack attacks run, by name, on the base, the retrain reference and "
                             "every erased model with the same budget (e.g. relearn,unlearndiffatk,inversion), as budget "
                             "curves (inversion to 2000 steps, relearning to 100) with each column's gap to the retrain "
                             f"reference; one erased {unit} only")
    parser.add_argument("--attack_options", default=None,
                        help="JSON overriding the attacks' budget, the same for every model: "
                             "'{\"relearn\": {\"eval_steps\": [0, 10], \"relearn_seeds\": [0, 1, 2]}}'; "
                             "'{\"inversion\": {\"budget\": \"cce\"}}' is the concept-inversion paper's 5000-step "
                             "budget (a GPU job)")
