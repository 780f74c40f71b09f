"""How precise is a retain-FD ratio of ``eval.shapes bench``? The bootstrap spread of every row's FD / base FD.

``retain_fd`` (``eval.shapes score``) is the Fréchet distance between the judges' 192-d features of the 120 retain
generations and of renders of the scenes their prompts ask for; issue 19's bar is FD <= 1.15 x the base's. This
script reads the images a bench saved (``OUT/scores/<row>/images``, in ``predictions.jsonl`` order), rebuilds the
reference renders exactly as ``score`` does, and resamples the retain prompts with replacement (paired: the same
prompts for the row, the base and the reference, as the audits are paired by image seed), ``--bootstrap`` times, to
give each row's ratio with its 5th-95th percentile interval. Nothing is generated: CPU seconds per bench.

    python benchmarks/shapes_fd_interval.py OUT/bench-circle OUT/bench-orange ... [--bootstrap 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inputs import check_json_output, has_keys  # noqa: E402
from erase.utils.files import atomic_write_json  # noqa: E402
from erase.utils.checks import check_int  # noqa: E402
from erase.utils.errors import UserError, cli_errors  # noqa: E402


def audits(folder: Path) -> list[tuple[str, list[str], int, dict]]:
    """(concept, concepts, images per group, {row: score folder}) for a bench folder (``results.json``, ``scores/``)
    or a ``benchmarks/shapes_tune.py`` folder (``tune.json``; ``base/<concept>``, ``<point>/<concept>/scores/seed<s>``)."""
    if not ((folder / "results.json").is_file() or (folder / "tune.json").is_file()):
        raise SystemExit(f"{folder}: neither an eval.shapes bench folder (results.json) nor a shapes_tune.py one (tune.json)")
    if (folder / "results.json").is_file():
        r = json.loads((folder / "results.json").read_text())
        dirs = {p.name: p for p in sorted((folder / "scores").iterdir()) if (p / "predictions.jsonl").is_file()}
        return [(r["concept"], r["concepts"], r["settings"]["num_images"], dirs)]
    t = json.loads((folder / "tune.json").read_text())
    out = []
    for c in t["concepts"]:
        dirs = {"base": folder / "base" / c}
        for point in t["points"]:
            for seed_dir in sorted((folder / point / c / "scores").glob("seed*")):
                dirs[f"{point}-{seed_dir.name}"] = seed_dir
        out.append((c, [c], t["budget"]["audit"]["num_images"], dirs))
    return out


def retain_features(concepts: list[str], num_images: int, dirs: dict, judges) -> tuple[dict, np.ndarray, dict]:
    """({row: features of its retain images}, reference features, {row: the retain FD its summary.json recorded})."""
    from PIL import Image

    from eval.shapes.concepts import audit_items
    from eval.shapes.render import render_many
    from eval.shapes.score import rows_for

    items = audit_items(concepts, num_images)
    rows = rows_for(items, [0])
    retain = [i for i, it in enumerate(items) if it.group == "retain"]
    feats, recorded, side = {}, {}, None
    for name, score_dir in dirs.items():
        preds = [json.loads(ln) for ln in (score_dir / "predictions.jsonl").read_text().splitlines()]
        if [p["prompt"] for p in preds] != [it.prompt for it in items]:
            raise SystemExit(f"{score_dir}: its audit is not {num_images} images per group of {','.join(concepts)}")
        images = np.stack([np.asarray(Image.open(score_dir / "images" / preds[i]["file"]).convert("RGB")) for i in retain])
        side = images.shape[1]
        feats[name] = judges.features(images)
        recorded[name] = json.loads((score_dir / "summary.json").read_text())["retain_fd"]
    reference = render_many([dataclasses.replace(items[i].scene, seed=rows[i].seed) for i in retain], side)
    return feats, judges.features(reference), recorded


def intervals(feats: dict, ref: np.ndarray, point: dict, n: int, seed: int) -> dict:
    """Each row's FD ratio to the base (``point``: every row's FD on all prompts) and its paired bootstrap spread."""
    from eval.digits.judge import frechet_distance

    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(ref), len(ref)) for _ in range(n)]
    base_fd = [frechet_distance(feats["base"][d], ref[d]) for d in draws]
    out = {}
    for name, f in feats.items():
        ratio = point[name] / point["base"]
        boot = np.ones(n) if name == "base" else np.array([frechet_distance(f[d], ref[d]) / b for d, b in zip(draws, base_fd)])
        lo, hi = np.percentile(boot, [5, 95])
        out[name] = {"ratio": float(ratio), "p05": float(lo), "p95": float(hi), "sd": float(boot.std(ddof=1))}
    return out


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="eval.shapes bench output folders (results.json, scores/)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the retain prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    p.add_argument("--json", default=None, help="also write every interval to this file")
    a = p.parse_args(argv)
    if a.bootstrap < 2:
        p.error(f"--bootstrap must be >= 2 (a spread needs two resamples), got {a.bootstrap}")
    check_int("--seed", a.seed)
    for folder in a.folders:
        if not Path(folder).is_dir():
            raise UserError(f"{folder} is not a folder (give eval.shapes bench output folders)")
    check_json_output("--json", a.json, has_keys("bootstrap", "concepts"))  # never over a file this tool did not write
    from eval.digits.judge import frechet_distance
    from eval.shapes.judges import load_judges

    judges = load_judges()
    report = {"bootstrap": a.bootstrap, "seed": a.seed, "concepts": {},
              "note": "p05 / p95: percentiles of the resampled ratio; resampling with repeats changes FD's small-sample "
                      "bias, which pulls the resampled ratios toward 1, so the sd is the figure to read"}
    print("| concept | row | FD x base | bootstrap sd |\n|---|---|---:|---:|")
    for folder in map(Path, a.folders):
        for concept, concepts, num_images, dirs in audits(folder):
            feats, ref, recorded = retain_features(concepts, num_images, dirs, judges)
            point = {name: frechet_distance(f, ref) for name, f in feats.items()}
            for name, fd in point.items():  # the features reproduce the audit's own figure
                if not np.isclose(fd, recorded[name], rtol=1e-4):
                    raise SystemExit(f"{dirs[name]}: FD {fd:.3f} here, {recorded[name]:.3f} in its summary.json "
                                     "(other judges than the audit's?)")
            rows = intervals(feats, ref, point, a.bootstrap, a.seed)
            report["concepts"].setdefault(concept, {}).update(rows)
            for name, r in rows.items():
                if name != "base":
                    print(f"| {concept} | {name} | {r['ratio']:.2f} | {r['sd']:.2f} |", flush=True)
    if a.json:
        atomic_write_json(a.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
