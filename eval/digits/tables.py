"""The digits bench's tables, targets and figures: results.md, the targets checked on the numbers, chart.png (bars
and each attack's budget curve beside the retrain reference's) and the sample grids."""

from __future__ import annotations

import json
from pathlib import Path

from eval.attack.utils.columns import curves, gap_targets, plot_curves, robustness_markdown
from eval.digits.model import DIGIT_WORDS


def _fmt(cell: dict | None, pct: bool) -> str:
    if not cell:
        return "–"
    if pct:
        return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def markdown(results: dict) -> str:
    word = results["concept"]
    lines = [
        f"# Erasing the digit {word}: digits benchmark",
        "",
        f"Base model `{results['base_model']}`; {results['settings']['max_train_steps']} steps per method, "
        f"seeds {results['settings']['seeds']}; audit: {results['settings']['num_images']} images per digit, "
        f"{results['settings']['steps']} {results['settings'].get('scheduler', 'ddim')} steps, guidance {results['settings']['guidance']}. "
        "Accuracies in %, "
        "mean ± std over seeds; FD = Fréchet distance of the retain generations to real digits in the judge's "
        "feature space (lower is better).",
        "",
        "| method | forget acc ↓ | retain acc ↑ | retain FD ↓ | held-out forget ↓ | held-out retain ↑ | wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = results["base"]
    lines.append(f"| base (no erasure) | {100 * base['forget_acc']:.1f} | {100 * base['retain_acc']:.1f} | "
                 f"{base['retain_fd']:.2f} | {100 * (base['heldout_forget_acc'] or 0):.1f} | "
                 f"{100 * (base['heldout_retain_acc'] or 0):.1f} | – | – |")
    rows = dict(results["methods"])
    if results.get("retrain"):
        rows = {"retrain (never saw the digit)": results["retrain"], **rows}
    for m, agg in rows.items():
        lines.append(f"| {m} | {_fmt(agg.get('forget_acc'), True)} | {_fmt(agg.get('retain_acc'), True)} | "
                     f"{_fmt(agg.get('retain_fd'), False)} | {_fmt(agg.get('heldout_forget_acc'), True)} | "
                     f"{_fmt(agg.get('heldout_retain_acc'), True)} | {_fmt(agg.get('wall_seconds'), False)} | "
                     f"{_fmt(agg.get('peak_rss_mb'), False)} |")
    lines += robustness_markdown(results, rows, unit="digit")
    lines += ["", "## Targets", ""]
    for t in results["targets"]:
        lines.append(f"- {'met' if t['met'] else 'MISSED'}: {t['target']} ({t['value']})")
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[dict]:
    """Issue 8's targets for Scissorhands, checked on this run's numbers (means over seeds)."""
    base, methods = results["base"], results["methods"]
    per = base["per_digit_acc"]
    several = len(results.get("digits") or [0]) > 1
    out = [{"target": "base draws each digit correctly >= 90%", "met": min(per.values()) >= 0.9,
            "value": f"min per-digit {100 * min(per.values()):.1f}%"}]
    sh = methods.get("scissorhands")
    if not sh:
        return out
    f, r, fd = sh["forget_acc"]["mean"], sh["retain_acc"]["mean"], sh["retain_fd"]["mean"]
    hf = sh.get("heldout_forget_acc", {}).get("mean")
    worst = max(sh.get("forget_acc_max", {}).get("mean", f), f)
    out.append({"target": "Scissorhands forget_acc <= 2%" + (" for each erased digit" if several else ""),
                "met": worst <= 0.02, "value": f"{100 * worst:.1f}%"})
    if hf is not None:
        out.append({"target": "Scissorhands forget_acc <= 2% under held-out phrasings", "met": hf <= 0.02, "value": f"{100 * hf:.1f}%"})
    slack = 0.02 if several else 0.01
    out.append({"target": f"Scissorhands retain_acc >= base - {100 * slack:.0f} point(s)", "met": r >= base["retain_acc"] - slack,
                "value": f"{100 * r:.1f}% vs base {100 * base['retain_acc']:.1f}%"})
    out.append({"target": "Scissorhands retain FD <= 1.3 x base", "met": fd <= 1.3 * base["retain_fd"],
                "value": f"{fd:.1f} vs base {base['retain_fd']:.1f} ({fd / base['retain_fd']:.2f}x)"})
    erasers = {m: a for m, a in methods.items() if a["forget_acc"]["mean"] <= 0.02}
    if len(methods) > 1:
        best = min(erasers, key=lambda m: (-erasers[m]["retain_acc"]["mean"], erasers[m]["retain_fd"]["mean"])) if erasers else None
        out.append({"target": "Scissorhands best of all methods (forget <= 2%, highest retain, ties by lower FD)",
                    "met": best == "scissorhands",
                    "value": f"best: {best or 'none erases'}" + (f" (retain {100 * erasers[best]['retain_acc']['mean']:.1f}, "
                                                               f"FD {erasers[best]['retain_fd']['mean']:.1f})" if best else "")})
    rel = {m: a.get("relearn_25", {}).get("mean") for m, a in methods.items()}
    refs = [rel[m] for m in ("esd", "salun") if rel.get(m) is not None]
    if rel.get("scissorhands") is not None and refs:
        out.append({"target": "Scissorhands relearning hit rate at 25 steps <= min(ESD, SalUn) + 10 points",
                    "met": rel["scissorhands"] <= min(refs) + 0.10,
                    "value": f"{100 * rel['scissorhands']:.1f}% vs " + ", ".join(f"{m} {100 * rel[m]:.1f}%" for m in ("esd", "salun") if rel.get(m) is not None)})
    out += gap_targets(sh)
    bad = sh.get("update_violations", {}).get("mean")
    if bad is not None:
        out.append({"target": "no projected step whose applied update lowers the memory forget loss (first order)",
                    "met": bad == 0, "value": f"{bad:g} violating steps per run"})
    return out


def chart(results: dict, path: Path) -> None:
    """Forget / retain / FD bars, and below them each attack's budget curve (hit rate against attack steps) for every
    method, the base and the retrain reference (dashed black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ({"retrain": results["retrain"]} if results.get("retrain") else {}) | results["methods"]
    names = ["base"] + list(rows)
    budget = curves(results.get("attack_columns") or [])
    ncols = max(3, len(budget))
    fig, grid_axes = plt.subplots(2 if budget else 1, ncols, figsize=(4.4 * ncols, 7.0 if budget else 3.4), squeeze=False)
    axes = grid_axes[0]
    for ax in axes[3:]:
        ax.axis("off")
    panels = (("forget_acc", "forget acc % (lower is better)", 100, (0, 100)), ("retain_acc", "retain acc %", 100, (0, 100)),
              ("retain_fd", "retain FD (lower is better)", 1, None))
    for ax, (key, title, scale, ylim) in zip(axes, panels):
        vals = [results["base"][key]] + [rows[m][key]["mean"] for m in rows]
        errs = [0.0] + [rows[m][key]["std"] for m in rows]
        colors = ["grey"] + (["C2"] if "retrain" in rows else []) + ["C0"] * len(results["methods"])
        ax.bar(names, [scale * v for v in vals], yerr=[scale * e for e in errs], color=colors)
        if key == "retain_fd":
            ax.axhline(1.3 * results["base"][key], color="C3", ls="--", lw=1, label="1.3 x base")
            ax.legend(fontsize=8)
        ax.set_title(title)
        if ylim:
            ax.set_ylim(*ylim)
        ax.tick_params(axis="x", rotation=30)
    if budget:
        plot_curves(grid_axes[1], results, rows)
    fig.suptitle(f"erasing {results['concept']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid(score_dir: Path, path: Path, per_digit: int = 8) -> None:
    """Sample images of the main audit, one row per digit labelled with the digit it was prompted for (erased
    digits marked), upscaled 4x (nearest)."""
    from PIL import Image, ImageDraw

    summary = json.loads((score_dir / "summary.json").read_text())
    erased = set(summary.get("digits") or [summary.get("digit")])
    preds = [json.loads(ln) for ln in (score_dir / "predictions.jsonl").read_text().splitlines()]
    preds = [p for p in preds if p["audit"] == "main"]
    cell = None
    rows = {}
    for p in preds:
        rows.setdefault(p["digit"], [])
        if len(rows[p["digit"]]) < per_digit:
            im = Image.open(score_dir / "images" / "main" / p["file"]).convert("L")
            cell = im.size[0] * 4
            rows[p["digit"]].append(im.resize((cell, cell), Image.NEAREST))
    digits = sorted(rows)
    label = 84
    canvas = Image.new("L", (label + per_digit * (cell + 2), len(digits) * (cell + 2)), 128)
    draw = ImageDraw.Draw(canvas)
    for i, d in enumerate(digits):
        draw.text((4, i * (cell + 2) + cell // 2 - 6), f"{d} {DIGIT_WORDS[d]}" + (" (x)" if d in erased else ""), fill=255)
        for j, im in enumerate(rows[d]):
            canvas.paste(im, (label + j * (cell + 2), i * (cell + 2)))
    canvas.save(path)
