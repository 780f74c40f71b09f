"""Throughput of the audit pieces against the naive loops of the reference scripts, in one run.

    python benchmarks/audit.py --output_dir /tmp/audit-bench                       # small CPU scale
    python benchmarks/audit.py --arch sd14 --resolution 512 --steps 50 --dtype fp16 \
        --gen_prompts 64 --gen_batch_size 16 --detect_images 512 --output_dir /tmp/audit-bench   # GPU

Generation: erase.diffusion.generate with `--gen_batch_size` vs. batch size 1, same prompts (I2P rows), random weights
(`--arch tiny`: eval.tiny; `--arch sd14`: the full SD v1.4 UNet/VAE/CLIP-L text encoder shapes).
Detection: eval.nudity (one ONNX session, stacked batches, vectorised post-processing, decoding in threads ahead of
the detector) and an audit's detection (eval.nudity_live: the images handed over by generation's writer as it
writes them, then the detection stage over the folder) vs. the loop ESD/SalUn/MACE-style scripts run
(`NudeDetector().detect(path)`, a new detector per image),
and the bound: the ONNX forward passes alone, inputs decoded beforehand (naive / bound is the most any implementation
can gain); also the decoding alone, one thread. Every timed method runs once per round, rounds interleaved, medians.
Plan: the pipeline calls generation makes for a whole I2P table with each row's guidance (a count, stub pipeline).
Writes OUTPUT_DIR/audit_bench.json and prints a markdown table.
"""

from __future__ import annotations

import itertools
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from erase.utils.errors import cli_errors, OneLineParser, UserError  # noqa: E402


def build_sd14_random(path: Path) -> str:
    """SD v1.4 architecture with random weights: UNet (859.5M parameters), VAE (83.7M), CLIP ViT-L/14 text
    encoder shapes with the in-memory 520-token vocabulary (85.5M instead of 123M: only the embedding table is
    smaller, the compute per token is the same)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from eval.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    tokenizer = build_tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return str(path)


def bench_generation(args, work: Path) -> dict:
    """erase.diffusion.generate at batch size 1 and at ``--gen_batch_size`` on the same prompts, interleaved over
    ``--rounds`` rounds into fresh folders (medians); then how far the images of the two batch sizes are apart."""
    import statistics

    import torch

    from erase.diffusion.generate import generate, GenerationConfig, load_pipeline
    from erase.diffusion.prompt_table import load_prompts
    from eval.tiny import build_tiny_pipeline

    if args.arch == "sd14":
        model = build_sd14_random(work / "sd14-random")
    else:
        model = build_tiny_pipeline(work / "tiny-sd", sample_size=32, block_out_channels=(32, 64))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(model, "lms", args.dtype, device)
    rows = load_prompts(args.prompts_csv, args.gen_subset, args.gen_prompts, need_guidance=args.gen_guidance == "row").rows
    generate(rows[:2], work / "warmup", GenerationConfig(model=model, steps=2, batch_size=2, dtype=args.dtype,
                                                           resolution=args.resolution), pipe=pipe)
    sizes = (1, args.gen_batch_size)
    seconds = {bs: [] for bs in sizes}
    for r in range(args.rounds):
        for bs in sizes if r % 2 == 0 else sizes[::-1]:
            cfg = GenerationConfig(model=model, steps=args.steps, batch_size=bs, dtype=args.dtype,
                                   resolution=args.resolution, guidance=args.gen_guidance)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate(rows, work / f"gen-bs{bs}-{r}", cfg, pipe=pipe)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[bs].append(time.perf_counter() - start)
    rate = {f"batch_{bs}": len(rows) / statistics.median(seconds[bs]) for bs in sizes}
    import numpy as np
    from PIL import Image

    diffs = [np.abs(np.asarray(Image.open(p), dtype=int) - np.asarray(Image.open(work / "gen-bs1-0" / p.name), dtype=int))
             for p in sorted((work / f"gen-bs{args.gen_batch_size}-0").glob("*.png"))]
    return {"images": len(rows), "images_per_s": rate, "seconds_all": {str(k): v for k, v in seconds.items()},
            "speedup": rate[f"batch_{args.gen_batch_size}"] / rate["batch_1"], "rounds": args.rounds,
            "guidance": args.gen_guidance, "subset": args.gen_subset, "guidance_values": len({r.guidance for r in rows}),
            "max_pixel_diff_across_batch_sizes": int(max(d.max() for d in diffs)),
            "fraction_of_values_differing": float(np.mean([(d != 0).mean() for d in diffs])), "steps": args.steps,
            "resolution": pipe.unet.config.sample_size * pipe.vae_scale_factor if args.resolution is None else args.resolution,
            "arch": args.arch, "dtype": str(pipe.unet.dtype), "device": str(device)}


def bench_plan(args, work: Path) -> dict:
    """How many pipeline calls erase.diffusion.generate makes for a whole I2P table at ``--plan_batch_size`` with each
    row's guidance, and how full they are: a count, not a timing (the pipeline is replaced by a stub that returns
    tiny blank images), so it holds on any machine. On a GPU a call costs about the same up to the batch size, so the
    number of calls is what generation time scales with."""
    import contextlib

    from PIL import Image

    from erase.diffusion.generate import generate, GenerationConfig, load_pipeline
    from erase.diffusion.prompt_table import load_prompts
    from eval.tiny import build_tiny_pipeline

    model = build_tiny_pipeline(work / "tiny-sd", sample_size=32, block_out_channels=(32, 64)) \
        if not (work / "tiny-sd").exists() else str(work / "tiny-sd")
    pipe = load_pipeline(model, "lms", "fp32", "cpu")
    rows = load_prompts(args.prompts_csv, args.plan_subset, None, need_guidance=True).rows
    sizes = []

    class Stub:
        def __init__(self, n):
            self.images = [Image.new("RGB", (8, 8))] * n

    @contextlib.contextmanager
    def stubbed():
        cls = type(pipe)
        original = cls.__call__
        cls.__call__ = lambda self, **kw: sizes.append(len(kw["prompt"])) or Stub(len(kw["prompt"]))
        try:
            yield
        finally:
            cls.__call__ = original

    with stubbed():
        generate(rows, work / "plan", GenerationConfig(model=model, steps=1, guidance="row",
                                                       batch_size=args.plan_batch_size), pipe=pipe)
    return {"subset": args.plan_subset, "rows": len(rows), "batch_size": args.plan_batch_size, "calls": len(sizes),
            "mean_images_per_call": sum(sizes) / len(sizes), "guidance_values": len({r.guidance for r in rows}),
            "fewest_calls_possible": -(-len(rows) // args.plan_batch_size)}


def make_detection_images(folder: Path, n: int, size: int) -> list[Path]:
    """n PNGs: the drawn torso NudeNet flags and a face, with different noise so none are identical."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from eval_fixtures import draw_torso, safe_images

    folder.mkdir(parents=True, exist_ok=True)
    base = [draw_torso(size), np.asarray(Image.fromarray(safe_images()["face"]).resize((size, size)))]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        noisy = np.clip(base[i % 2].astype(np.int16) + rng.integers(-6, 7, base[0].shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:05d}_0.png")
        Image.fromarray(noisy).save(paths[-1])
    return paths


def bench_detection(args, work: Path) -> dict:
    """Four ways to score the same images, interleaved over ``--rounds`` rounds (medians of the per-image times):
    the naive loop of the reference scripts (a new ``NudeDetector`` per image, ``detect(path)``), ``eval.nudity``'s
    ``score_images`` (reads, hashes, decodes and scores, writes its cache), an audit's detection (the images handed
    over as generation's writer holds them, ``eval.nudity_live``, then ``score_images`` over the folder, which finds
    them scored), and the bound: the ONNX forward passes
    alone on inputs decoded beforehand, in eval.nudity's own session and batches. The naive loop pays the passes too,
    so naive / bound is the most any implementation can gain on this machine."""
    import statistics

    import cv2
    import numpy as np
    from nudenet import NudeDetector

    from PIL import Image

    from eval.nudity import _decode, _read, NudityDetector, score_images
    from eval.nudity_live import LiveDetection

    paths = make_detection_images(work / "det-images", args.detect_images, args.detect_size)
    handed = [(p.name, p.read_bytes(), Image.open(p).convert("RGB")) for p in paths]  # what generation's writer holds
    NudeDetector().detect(str(paths[0]))  # warm the file cache and onnxruntime
    detector = NudityDetector()  # as score_images builds it
    bs = args.detect_batch_size
    inputs = [np.concatenate([detector.preprocess(cv2.imread(str(p)))[0] for p in paths[i : i + bs]])
              for i in range(0, len(paths), bs)]

    def naive():
        return [NudeDetector().detect(str(p)) for p in paths[: args.naive_images]]

    runs = itertools.count()

    def ours():  # a fresh output folder each time: nothing cached
        return score_images(paths, work / "det-out" / str(next(runs)), batch_size=bs)[0]

    def live():  # an audit: each generated batch handed over as written (eval.nudity_live), nothing decoded
        out = work / "det-out" / str(next(runs))
        with LiveDetection(out, batch_size=bs, detector=detector) as scorer:  # an audit builds it once, beside the denoising
            for i in range(0, len(handed), bs):
                scorer(handed[i : i + bs])
        return score_images(paths, out, batch_size=bs)[0]  # the audit's detection stage: every image found scored

    def bound():
        for batch in inputs:
            detector.session.run(None, {detector.input_name: batch})

    def decode():  # the work eval.nudity does besides the passes: read, hash, check, decode, letterbox (one thread)
        for p in paths:
            detector.preprocess(_decode(_read(p)[1])[0])

    methods = {"naive": naive, "ours": ours, "live": live, "bound": bound, "decode": decode}
    per_image = {name: [] for name in methods}
    counts = {name: args.naive_images if name == "naive" else len(paths) for name in methods}
    results = {}
    for r in range(args.rounds):
        order = list(methods)[r % len(methods):] + list(methods)[: r % len(methods)]  # no method always runs first
        for name in order:
            start = time.perf_counter()
            results[name] = methods[name]()
            per_image[name].append((time.perf_counter() - start) / counts[name])
    med = {k: statistics.median(v) for k, v in per_image.items()}
    agree = all(results["ours"][p.name] == d for p, d in zip(paths, results["naive"]))
    return {"images": len(paths), "naive_images": args.naive_images, "image_size": args.detect_size, "rounds": args.rounds,
            "seconds_per_image_median": med, "seconds_per_image_all": per_image,
            "speedup": med["naive"] / med["ours"], "bound": med["naive"] / med["bound"],
            "share_of_bound": med["bound"] / med["ours"], "decode_over_bound": med["decode"] / med["bound"],
            "live_speedup": med["naive"] / med["live"], "live_share_of_bound": med["bound"] / med["live"],
            "same_detections_as_naive": agree, "live_same_as_files": results["live"] == results["ours"],
            "batch_size": bs, "providers": detector.session.get_providers()}


@cli_errors
def parse_args(input_args=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", required=True, help="Scratch folder; audit_bench.json is written here.")
    p.add_argument("--prompts_csv", default=str(REPO.parent / "shared" / "data" / "i2p.csv"), help="Prompt table.")
    p.add_argument("--arch", default="tiny", choices=("tiny", "sd14"), help="Random-weight model for generation.")
    p.add_argument("--gen_prompts", type=int, default=16, help="Prompts generated per batch-size setting.")
    p.add_argument("--gen_batch_size", type=int, default=8, help="Batched generation size compared with 1.")
    p.add_argument("--gen_guidance", default="row", help="Guidance: 'row' (each I2P row's own, as i2p-sexual) or a number.")
    p.add_argument("--gen_subset", default="sexual", help="I2P subset the prompts come from (all, sexual, nudity).")
    p.add_argument("--plan_subset", default="sexual", help="I2P subset whose pipeline calls are counted (bench_plan).")
    p.add_argument("--plan_batch_size", type=int, default=16, help="Batch size of the counted plan.")
    p.add_argument("--steps", type=int, default=10, help="Denoising steps.")
    p.add_argument("--resolution", type=int, default=None, help="Image size (default: the model's).")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16.")
    p.add_argument("--detect_images", type=int, default=96, help="Images scored by eval.nudity.")
    p.add_argument("--naive_images", type=int, default=32, help="Images scored by the naive loop (its rate is per image).")
    p.add_argument("--detect_size", type=int, default=512, help="Side of the detection images in px.")
    p.add_argument("--detect_batch_size", type=int, default=16, help="eval.nudity batch size.")
    p.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of every timed method (medians reported).")
    p.add_argument("--skip_generation", action="store_true", help="Only time detection (no generation, no call count).")
    p.add_argument("--overwrite", action="store_true", help="Write into a non-empty --output_dir this tool did not create.")
    a = p.parse_args(input_args)
    from benchmarks.inputs import check_counts, check_number, name_list
    from erase.utils.checks import OPTION_RANGES

    check_counts(a, gen_prompts=1, gen_batch_size=1, plan_batch_size=1, steps=1, detect_images=1, naive_images=1,
                 detect_size=1, detect_batch_size=1, rounds=1)  # every check before the folder is claimed
    if a.resolution is not None and (a.resolution < 8 or a.resolution % 8):
        raise UserError(f"--resolution {a.resolution} is not allowed: give a positive multiple of 8")
    name_list("--dtype", a.dtype, ("auto", "fp32", "fp16", "bf16"), what="dtype")
    name_list("--gen_subset", a.gen_subset, ("all", "sexual", "nudity"), what="subset")
    name_list("--plan_subset", a.plan_subset, ("all", "sexual", "nudity"), what="subset")
    if a.gen_guidance != "row":
        check_number("--gen_guidance", a.gen_guidance, OPTION_RANGES["guidance"])
    return a


#: What a run writes into --output_dir; a rerun removes these (and only these) for a cold measurement.
OUTPUTS = ("det-images", "det-out", "warmup", "tiny-sd", "sd14-random", "plan", "audit_bench.json")


@cli_errors
def main(args):
    from erase.utils.folders import claim_output_dir

    with claim_output_dir(args.output_dir, overwrite=args.overwrite, by="benchmarks/audit.py") as claim:
        return _bench(args, claim.path)


def _bench(args, work: Path) -> dict:
    """Both measurements from a cold start: earlier outputs of this script (and only those) are removed first."""
    import torch

    for entry in work.iterdir():
        if entry.name in OUTPUTS or entry.name.startswith("gen-bs"):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} torch threads, cuda={torch.cuda.is_available()}",
              "command": " ".join(sys.argv)}
    result["detection"] = bench_detection(args, work)
    if not args.skip_generation:
        result["generation"] = bench_generation(args, work)
        result["plan"] = bench_plan(args, work)
    from erase.utils.files import atomic_write_json

    atomic_write_json(work / "audit_bench.json", result)
    d = result["detection"]
    m = d["seconds_per_image_median"]
    print(f"| detection ({d['images']} x {d['image_size']} px, {d['rounds']} rounds) | naive {1 / m['naive']:.2f} img/s "
          f"| eval.nudity {1 / m['ours']:.2f} img/s | {d['speedup']:.2f}x | bound (ONNX passes alone) {d['bound']:.2f}x, "
          f"ours at {100 * d['share_of_bound']:.0f}% of it; decoding alone {100 * d['decode_over_bound']:.0f}% of the passes "
          f"| same detections: {d['same_detections_as_naive']} |")
    print(f"| detection in an audit (handed over by generation's writer, eval.nudity_live, then the detection stage) "
          f"| naive {1 / m['naive']:.2f} img/s | {1 / m['live']:.2f} img/s | {d['live_speedup']:.2f}x | at "
          f"{100 * d['live_share_of_bound']:.0f}% of the bound | same detections as scoring the files: "
          f"{d['live_same_as_files']} |")
    if "generation" in result:
        g = result["generation"]
        rates = list(g["images_per_s"].values())
        print(f"| generation ({g['arch']}, {g['resolution']} px, {g['steps']} steps, {g['images']} prompts, guidance "
              f"{g['guidance']} ({g['guidance_values']} values), {g['rounds']} rounds) "
              f"| batch 1 {rates[0]:.2f} img/s | batch {args.gen_batch_size} {rates[-1]:.2f} img/s | {g['speedup']:.2f}x "
              f"| batch 1 vs {args.gen_batch_size}: max pixel diff {g['max_pixel_diff_across_batch_sizes']}, "
              f"{100 * g['fraction_of_values_differing']:.3f}% of values differ |")
    if "plan" in result:
        c = result["plan"]
        print(f"| pipeline calls, I2P {c['subset']} ({c['rows']} rows, {c['guidance_values']} guidance values), batch "
              f"{c['batch_size']} | {c['calls']} calls, {c['mean_images_per_call']:.1f} images per call | fewest possible "
              f"{c['fewest_calls_possible']} |")
    return result


if __name__ == "__main__":
    main(parse_args())
