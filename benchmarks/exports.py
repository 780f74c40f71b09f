"""Do the export formats keep the erasure? The digits model, 'three' erased by Scissorhands, scored per format.

One ``erase/sd.py`` run (the digits benchmark's budget and Scissorhands' digits setting, as ``eval.digits bench``
runs it) exports every format; the offline converter (``python -m erase.export``) adds LoRA variants to copies of
it. Each variant is loaded the way a user loads it and audited with ``eval.digits``' score machinery (same prompts,
seeds, sampler, judge; the main phrasings):

* ``full``: the erased ``unet/`` in the base pipeline (fp32), the reference;
* ``single_file``: ``erased.safetensors`` through ``StableDiffusionPipeline.from_single_file`` (fp16 weights, run
  in fp32 on the CPU);
* ``lora*``: the base pipeline with ``erased_lora.safetensors`` through ``load_lora_weights`` (fp16 factors).

    python benchmarks/exports.py --output_dir /tmp/exports

Writes ``OUT/results.json`` (every number and setting) and ``OUT/results.md``: forget / retain accuracy, retain FD,
differences to ``full`` (target: within 1 point), LoRA ranks, relative error of the change, size on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inputs import check_counts  # noqa: E402
from erase.utils.checks import check_int  # noqa: E402
from erase.utils.errors import cli_errors  # noqa: E402
from erase.utils.folders import check_output_dir, hold_output_dir  # noqa: E402
from erase.utils.files import atomic_write_json, atomic_write_text  # noqa: E402
from eval.digits.score import BENCH_DEFAULTS, SCORE_DEFAULTS  # noqa: E402

DIGIT = 3
#: LoRA variants beyond the run's default (energy 0.99): name -> converter flags
LORA_VARIANTS = {"lora_energy0.9": ["--lora_energy", "0.9"], "lora_rank4": ["--lora_rank", "4"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="benchmarks/exports.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="Where the run, the images and the results go.")
    p.add_argument("--num_images", type=int, default=SCORE_DEFAULTS["num_images"], help="Audit images per digit.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the erasure and of the audit rows.")
    p.add_argument("--overwrite", action="store_true", help="Write into a non-empty folder this tool did not create.")
    a = p.parse_args(argv)
    check_counts(a, num_images=1)  # before the folder is claimed or the model trained
    check_int("--seed", a.seed)
    check_output_dir(a.output_dir, overwrite=a.overwrite, by="benchmarks/exports.py")  # the claim's own rules, read-only
    return a


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def audit(pipe, name: str, out: Path, args, judge, real_retain) -> dict:
    """eval.digits score's main audit of one loaded pipeline: forget / retain accuracy and retain FD."""
    import diffusers

    from eval.digits.score import _audit, _prompt_sets, _rows
    from eval.digits.judge import frechet_distance
    from erase.diffusion.generate import GenerationConfig, SCHEDULERS

    ns = SimpleNamespace(digit=DIGIT, digits=[DIGIT], forget_prompts=None, retain_prompts=None)
    forget, retain, _ = _prompt_sets(ns)
    gen_cfg = GenerationConfig(model=f"exports-{name}", steps=SCORE_DEFAULTS["steps"], guidance=SCORE_DEFAULTS["guidance"],
                               scheduler="ddim", batch_size=SCORE_DEFAULTS["batch_size"])
    pipe.scheduler = getattr(diffusers, SCHEDULERS[gen_cfg.scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    image_dir = out / "images" / name
    shutil.rmtree(image_dir, ignore_errors=True)  # never reuse another variant's images
    start = time.time()
    metrics, _, retain_feats = _audit(pipe, judge, gen_cfg, _rows({**forget, **retain}, args.num_images, [args.seed]), image_dir, [DIGIT])
    return {"forget_acc": metrics["forget_acc"], "retain_acc": metrics["retain_acc"],
            "retain_fd": frechet_distance(retain_feats, real_retain), "per_digit_acc": metrics["per_digit_acc"],
            "audit_seconds": round(time.time() - start, 1)}


@cli_errors
def main(argv=None) -> dict:
    args = parse_args(argv)  # every check first: nothing is claimed, trained or run on a bad value
    import torch

    from erase import load_erased
    from erase.export.formats import LORA_NAME, SINGLE_FILE_NAME
    from erase.export.convert import main as convert
    from eval.digits.bench import run_erasure
    from eval.digits.judge import load_judge
    from eval.digits.model import DigitsModelConfig, default_model_dir, load_digit_images, train_digits_model

    torch.set_num_threads(1)
    out = Path(args.output_dir).absolute()
    with hold_output_dir(out, overwrite=args.overwrite, by="benchmarks/exports.py"):
        start = time.time()
        base = default_model_dir()
        train_digits_model(DigitsModelConfig(), base)  # cached
        bench = SimpleNamespace(launcher="python", steps=SCORE_DEFAULTS["steps"], guidance=SCORE_DEFAULTS["guidance"],
                                erase_args="--export_format diffusers,single_file,lora", **BENCH_DEFAULTS)
        run_dir = out / "run"
        info = run_erasure(str(base), DIGIT, "scissorhands", args.seed, run_dir, out / "data", bench)
        variants = {"full": (run_dir, "diffusers"), "single_file": (run_dir, "single_file"), "lora": (run_dir, "lora")}
        for name, flags in LORA_VARIANTS.items():  # the offline converter on a copy of the run
            copy = out / name
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("data", "checkpoint-*", ".*"))
            convert([str(copy), "--export_format", "lora", *flags])
            variants[name] = (copy, "lora")

        judge = load_judge()
        real_x, real_y = load_digit_images(judge.config.resolution)
        _, real_feats = judge.predict(real_x, grey=True)
        real_retain = real_feats[real_y.numpy() != DIGIT]
        rows = {}
        for name, (folder, fmt) in variants.items():
            kw = {"torch_dtype": torch.float32}
            pipe = load_erased(str(folder), format=fmt, **kw)
            if fmt == "lora":
                pipe.fuse_lora()  # what A1111 / ComfyUI compute: W + scale * up @ down
            row = audit(pipe, name, out, args, judge, real_retain)
            cfg = json.loads((folder / "erase_config.json").read_text())
            if fmt == "lora":
                lo = cfg["export"]["details"]["lora"]
                row.update(file=LORA_NAME, bytes=size(folder / LORA_NAME), rank_min=lo["rank_min"], rank_max=lo["rank_max"],
                           rule=f"rank {lo['rank']}" if lo["rank"] is not None else f"energy {lo['energy']}",
                           rel_error=lo["rel_error"], max_rel_error=lo["max_rel_error"], left_out=lo["left_out"],
                           lora_params=lo["params"], dense_params=lo["dense_params"])
            elif fmt == "single_file":
                row.update(file=SINGLE_FILE_NAME, bytes=size(folder / SINGLE_FILE_NAME), dtype=cfg["export"]["details"]["single_file"]["dtype"])
            else:
                row.update(file="unet/", bytes=size(folder / "unet"), delta_bytes=size(folder / "unet_delta.safetensors"))
            rows[name] = row
            del pipe
        ref = rows["full"]
        for row in rows.values():
            row["forget_diff_points"] = round(100 * (row["forget_acc"] - ref["forget_acc"]), 2)
            row["retain_diff_points"] = round(100 * (row["retain_acc"] - ref["retain_acc"]), 2)
            row["within_1_point"] = abs(row["forget_diff_points"]) <= 1 and abs(row["retain_diff_points"]) <= 1
        results = {"digit": DIGIT, "base_model": str(base), "erasure": info, "variants": rows,
                   "settings": {"num_images": args.num_images, "seed": args.seed, "audit": SCORE_DEFAULTS, "erase": BENCH_DEFAULTS,
                                "lora_variants": LORA_VARIANTS, "erase_args": bench.erase_args},
                   "seconds": round(time.time() - start, 1)}
        md = markdown(results)
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", md)
        print(md)
    return results


def markdown(results: dict) -> str:
    lines = ["| export | loaded by | forget ↓ | retain ↑ | retain FD | Δ forget / Δ retain (points vs full) | within 1 point | LoRA ranks | rel. error of the change | size |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    how = {"full": "`unet/` into the base pipeline", "single_file": "`from_single_file` (fp16 weights)"}
    for name, r in results["variants"].items():
        ranks = (f"{r['rank_min']}-{r['rank_max']} ({r['rule']})" if "rank_min" in r else "-")
        err = (f"{100 * r['rel_error']:.1f} % (worst tensor {100 * r['max_rel_error']:.1f} %)" if "rel_error" in r else "0")
        lines.append(f"| {name} | {how.get(name, '`load_lora_weights` on the base, fused')} | {100 * r['forget_acc']:.1f} | "
                     f"{100 * r['retain_acc']:.1f} | {r['retain_fd']:.1f} | {r['forget_diff_points']:+.1f} / {r['retain_diff_points']:+.1f} | "
                     f"{'yes' if r['within_1_point'] else 'no'} | {ranks} | {err} | {r['bytes'] / 2**20:.2f} MiB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
