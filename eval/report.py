"""Side-by-side reports of nudity audits (base vs. erased models, like Figure 3 of the Scissorhands paper).

    python -m eval.report DIR [DIR ...] --output_dir OUT [--names base,erased] [--grid_images 8] [--no_pixelate]

Each DIR holds an eval.nudity / eval.i2p output (summary.json, detections.jsonl). One table holds audits of one
protocol only (``eval.i2p --protocol``, recorded in summary.json), named in its title; audits of different protocols,
or a protocol audit beside one without a protocol, are an error naming both. Writes OUT/report.md (per-class
detection counts, flagged images and rates, and the settings of every audit), OUT/report.json (the same
numbers), OUT/counts.png (grouped bar chart) and OUT/grid.png (the same prompt rows for every audit, counted
regions pixelated unless --no_pixelate).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from erase.utils.images import MAX_PIXELS
from erase.utils.checks import check_int
from erase.utils.folders import hold_output_dir
from erase.utils.text import md_text
from erase.utils.errors import cli_errors, OneLineParser, UserError
from erase.utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from erase.utils.launch import setup_logging

logger = logging.getLogger(__name__)

SETTING_KEYS = ("nudenet_version", "model_sha256", "threshold", "class_set")
GENERATION_KEYS = ("model", "prompt_source", "subset", "limit", "steps", "guidance", "scheduler", "resolution",
                   "images_per_prompt", "seed_offset")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bad(path: Path, field: str, value, allowed: str) -> UserError:
    shown = repr(value)
    return UserError(f"{path} has {field} = {shown[:60] + ('…' if len(shown) > 60 else '')}; expected {allowed}: "
                     "the file is damaged or not an eval.nudity output")


def check_summary(path: Path, summary) -> dict:
    """``summary.json`` as the report may use it, or one :class:`UserError` line naming the field: counts are
    non-negative integers (never strings, booleans, floats, NaN or infinity), flagged images at most the images,
    the protocol record a dict whose numbers are numbers. Text fields are not trusted either: every one is escaped
    where it enters report.md (``md_text``)."""
    if not isinstance(summary, dict):
        raise _bad(path, "its top level", summary, "a JSON object")
    for key in ("images", "flagged_images", "counts", "settings"):
        if key not in summary:
            raise UserError(f"{path} has no {key!r}; is it an eval.nudity output?")
    for key in ("images", "flagged_images", "blank_images"):
        if key in summary and not _count(summary[key]):
            raise _bad(path, key, summary[key], "a non-negative integer")
    if summary["flagged_images"] > summary["images"]:
        raise _bad(path, "flagged_images", summary["flagged_images"], f"at most images ({summary['images']})")
    counts = summary["counts"]
    if not isinstance(counts, dict):
        raise _bad(path, "counts", counts, "an object of class -> count")
    for name, n in counts.items():
        if not _count(n):
            raise _bad(path, f"counts[{str(name)[:40]!r}]", n, "a non-negative integer")
    if not isinstance(summary.get("skipped", []), list):
        raise _bad(path, "skipped", summary["skipped"], "a list")
    settings = summary["settings"]
    if not isinstance(settings, dict):
        raise _bad(path, "settings", settings, "an object")
    if not isinstance(settings.get("generation") or {}, dict):
        raise _bad(path, "settings.generation", settings["generation"], "an object or null")
    protocol = settings.get("protocol")
    if protocol is not None:
        if not (isinstance(protocol, dict) and isinstance(protocol.get("name"), str)):
            raise _bad(path, "settings.protocol", protocol, "null or an object with a name")
        if not _count(protocol.get("table_rows")):
            raise _bad(path, "settings.protocol.table_rows", protocol.get("table_rows"), "a non-negative integer")
        threshold = protocol.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise _bad(path, "settings.protocol.threshold", threshold, "a number in [0, 1]")
    return summary


def rate(audit) -> str:
    """The flagged-image rate as a percentage, or '–' for an audit of no image (never 'inf%' or a made-up 0 %)."""
    s = audit["summary"]
    return f"{100 * s['flagged_images'] / s['images']:.2f}%" if s["images"] else "–"


def load_audit(directory) -> dict:
    directory = Path(directory)
    summary = check_summary(directory / "summary.json", read_json(directory / "summary.json", "audit summary"))
    records = []
    path = directory / "detections.jsonl"
    if path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; is it an eval.nudity output?") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number} is not valid JSON ({e.msg}): the file is cut or damaged; "
                                "rerun the audit") from None
            if not isinstance(record, dict) or not isinstance(record.get("file"), str):
                raise UserError(f"{path} line {number} is not a detection record (no 'file')")
            records.append(record)
    return {"dir": directory, "summary": summary, "records": records}


def _inside(directory: Path, relative) -> Path | None:
    """``directory / relative`` when it stays inside ``directory`` (symlinks resolved), else None: paths read
    from an audit's own files never lead out of the audit folder."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        return None
    root = directory.resolve()
    target = (directory / relative).resolve()
    return target if target == root or root in target.parents else None


def _names(audits, names):
    if names:
        if len(names) != len(audits):
            raise UserError(f"--names has {len(names)} name(s) for {len(audits)} folder(s)")
        return names
    short = [a["dir"].resolve().name for a in audits]
    return short if len(set(short)) == len(short) else [str(a["dir"]) for a in audits]


def audit_protocol(audit) -> dict | None:
    """The protocol an audit was run under (summary.json settings.protocol, checked by ``check_summary``), or None."""
    return audit["summary"]["settings"].get("protocol")


def common_protocol(audits) -> dict | None:
    """The one protocol every audit shares (or None when none has one); mixing is an error naming both sides."""
    first = audits[0]
    proto = audit_protocol(first)
    definition = {k: v for k, v in (proto or {}).items() if k not in ("limit", "complete")}

    def label(a, p):
        return f"{a['dir']} ({'protocol ' + p['name'] if p else 'no protocol'})"

    for other in audits[1:]:
        p = audit_protocol(other)
        if (p or {}).get("name") != (proto or {}).get("name"):
            raise UserError(f"cannot put audits of different protocols in one table: {label(first, proto)} and "
                            f"{label(other, p)}; report each protocol separately")
        if proto and {k: v for k, v in p.items() if k not in ("limit", "complete")} != definition:
            raise UserError(f"{first['dir']} and {other['dir']} recorded different definitions of protocol "
                            f"{proto['name']}; rerun one of them with this version")
    return proto


def markdown_table(audits, names) -> str:
    names = [md_text(n) for n in names]
    classes = list(dict.fromkeys(c for a in audits for c in a["summary"]["counts"]))
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for c in classes:
        lines.append(f"| {md_text(c)} | " + " | ".join(md_text(a["summary"]["counts"].get(c, "-")) for a in audits) + " |")
    totals = [sum(a["summary"]["counts"].values()) for a in audits]
    lines.append("| **total detections** | " + " | ".join(str(t) for t in totals) + " |")
    lines.append("| **flagged images** | " + " | ".join(
        f"{a['summary']['flagged_images']} / {a['summary']['images']}" for a in audits) + " |")
    lines.append("| **flagged rate** | " + " | ".join(rate(a) for a in audits) + " |")
    if any(a["summary"].get("skipped") for a in audits):
        lines.append("| **skipped files (not counted)** | " + " | ".join(
            f"{len(a['summary'].get('skipped') or [])} ({a['summary'].get('blank_images', 0)} blank)" for a in audits) + " |")
    return "\n".join(lines)


def settings_table(audits, names) -> tuple[str, list[str]]:
    rows, differ = [], []
    for key in SETTING_KEYS + GENERATION_KEYS:
        values = []
        for a in audits:
            s = a["summary"]["settings"]
            g = s.get("generation")
            v = s.get(key) if key in SETTING_KEYS else (g if isinstance(g, dict) else {}).get(key)
            values.append("-" if v is None else str(v)[:16] if key == "model_sha256" else str(v))
        rows.append(f"| {key} | " + " | ".join(md_text(v) for v in values) + " |")
        if key != "model" and len(set(values)) > 1:
            differ.append(key)
    header = ["| setting | " + " | ".join(md_text(n) for n in names) + " |", "|---|" + "---|" * len(names)]
    return "\n".join(header + rows), differ


def bar_chart(audits, names) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = list(dict.fromkeys(c for a in audits for c in a["summary"]["counts"]))
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(audits))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(classes)), 4))
    for i, (a, name) in enumerate(zip(audits, names)):
        counts = [a["summary"]["counts"].get(c, 0) for c in classes]
        bars = ax.bar(x + (i - (len(audits) - 1) / 2) * width, counts, width, label=name)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, [c.replace("_EXPOSED", "").replace("_", " ").lower() for c in classes], rotation=30, ha="right")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("detections")
    ax.set_title("NudeNet detections per class")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def pixelate(image, boxes, block: int = 8):
    """Coarsen each [x, y, w, h] box of a PIL image to blocks of `block` px."""
    from PIL import Image

    image = image.copy()
    for box in boxes:
        try:  # boxes come from an audit file: clamp them to the image
            x, y, w, h = (int(v) for v in box)
        except (TypeError, ValueError):
            continue
        x, y = max(0, min(x, image.width)), max(0, min(y, image.height))
        w, h = min(w, image.width - x), min(h, image.height - y)
        if w < 1 or h < 1:
            continue
        region = image.crop((x, y, x + w, y + h))
        small = region.resize((max(1, w // block), max(1, h // block)), Image.BILINEAR)
        image.paste(small.resize((w, h), Image.NEAREST), (x, y))
    return image


def image_grid(audits, names, n_images: int = 8, tile: int = 128, do_pixelate: bool = True) -> bytes | None:
    """Rows = audits, columns = the first `n_images` files flagged in any audit (then unflagged ones)."""
    from PIL import Image, ImageDraw

    flagged = sorted({r["file"] for a in audits for r in a["records"] if r.get("flagged")})
    others = sorted({r["file"] for a in audits for r in a["records"]} - set(flagged))
    files = (flagged + others)[:n_images]
    if not files:
        return None
    label_w = 120
    grid = Image.new("RGB", (label_w + tile * len(files), tile * len(audits)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (a, name) in enumerate(zip(audits, names)):
        draw.text((4, i * tile + tile // 2), name[:18], fill="black")
        images_dir = _inside(a["dir"], a["summary"].get("images_dir", "images"))
        if images_dir is None:
            logger.warning("%s: images_dir %r leads out of the audit folder; its images are not shown",
                           a["dir"], a["summary"].get("images_dir"))
            continue
        by_file = {r["file"]: r for r in a["records"]}
        for j, f in enumerate(files):
            path = _inside(images_dir, f)
            if path is None or path.parent != images_dir:  # a file name, never a path
                logger.warning("%s: %r is not a file of the audit's image folder; not shown", a["dir"], f)
                continue
            try:
                with Image.open(path) as im:
                    if im.width * im.height > MAX_PIXELS:
                        continue
                    im = im.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
            record = by_file.get(f, {})
            if do_pixelate:
                im = pixelate(im, [d.get("box") for d in record.get("detections") or [] if isinstance(d, dict)], block=max(4, im.width // 32))
            grid.paste(im.resize((tile, tile)), (label_w + j * tile, i * tile))
            if record.get("flagged"):
                draw.rectangle([label_w + j * tile, i * tile, label_w + (j + 1) * tile - 1, (i + 1) * tile - 1],
                               outline="red", width=2)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def write_report(dirs, output_dir, names=None, grid_images: int = 8, do_pixelate: bool = True) -> dict:
    audits = [load_audit(d) for d in dirs]
    protocol = common_protocol(audits)
    names = _names(audits, names)
    output_dir = Path(output_dir)
    settings, differ = settings_table(audits, names)
    title = f"# Nudity audit report: protocol {md_text(protocol['name'])}" if protocol else "# Nudity audit report (no protocol)"
    md = [title, ""]
    if protocol:
        md += [f"Protocol {md_text(protocol['name'])}: {md_text(protocol.get('description'))}. Metric: "
               f"{md_text(protocol.get('metric'))}. Threshold {protocol['threshold']}, classes "
               f"{md_text(protocol.get('class_set'))}, {protocol['table_rows']} rows of {md_text(protocol.get('prompts_file'))} "
               f"(subset {md_text(protocol.get('subset'))}); comparable with: {md_text(protocol.get('reference'))} "
               "(docs/PROTOCOLS.md).", ""]
        partial = [n for n, a in zip(names, audits) if not audit_protocol(a).get("complete", True)]
        if partial:
            md += [f"**Warning:** {', '.join(md_text(n) for n in partial)} covered only the first rows (--limit): "
                   "not the protocol's full number.", ""]
    md += [markdown_table(audits, names), "", "## Settings", "", settings]
    if differ:
        md += ["", f"**Warning:** settings differ between audits: {', '.join(differ)}; the counts are not comparable."]
    if any(a["summary"].get("blank_images") for a in audits):
        md += ["", "**Warning:** some audits hold blank images (a broken model draws them); they are not counted."]
    md += ["", "![detections per class](counts.png)", "", "![image grid](grid.png)", ""]
    numbers = {  # each audit's settings hold its protocol
        name: {k: a["summary"][k] for k in ("images", "flagged_images", "counts")} | {
            "flagged_rate": a["summary"]["flagged_images"] / a["summary"]["images"] if a["summary"]["images"] else None,
            "total_detections": sum(a["summary"]["counts"].values()),
            "settings": a["summary"]["settings"],
        }
        for name, a in zip(names, audits)
    }
    atomic_write_bytes(output_dir / "counts.png", bar_chart(audits, names))
    grid = image_grid(audits, names, grid_images, do_pixelate=do_pixelate)
    if grid is not None:
        atomic_write_bytes(output_dir / "grid.png", grid)
    atomic_write_json(output_dir / "report.json", numbers)
    atomic_write_text(output_dir / "report.md", "\n".join(md))
    logger.info("wrote %s", output_dir / "report.md")
    return numbers


@cli_errors
def parse_args(input_args=None):
    parser = OneLineParser(description="Compare nudity audits side by side.")
    parser.add_argument("dirs", nargs="+", help="Audit folders (each with summary.json and detections.jsonl).")
    parser.add_argument("--output_dir", required=True, help="Where report.md, report.json, counts.png, grid.png go.")
    parser.add_argument("--names", default=None, help="Comma-separated column names, one per folder.")
    parser.add_argument("--grid_images", type=int, default=8, help="Images per row of the grid.")
    parser.add_argument("--no_pixelate", action="store_true", help="Show detected regions unpixelated in the grid.")
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty --output_dir this tool did not create.")
    args = parser.parse_args(input_args)
    args.names = [n.strip() for n in args.names.split(",")] if args.names else None
    check_int("--grid_images", args.grid_images, 0, 64)
    return args


@cli_errors
def main(args):
    setup_logging()
    common_protocol([load_audit(d) for d in args.dirs])  # inputs before outputs
    with hold_output_dir(args.output_dir, overwrite=args.overwrite, by="eval.report"):
        return write_report(args.dirs, args.output_dir, args.names, args.grid_images, not args.no_pixelate)


if __name__ == "__main__":
    main(parse_args())
