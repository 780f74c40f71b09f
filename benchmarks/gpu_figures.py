#!/usr/bin/env python
"""Every GPU figure of issue 10 in one JSON (run by ``benchmarks/gpu.sh``; under 8 minutes on one H100-class GPU).

Models are built from the real configs written out below (SD v1.4 and SDXL base 1.0: UNet, VAE, CLIP text
encoders) with random weights: nothing is downloaded. Measured:

* ``repair``: seconds per Scissorhands repair step through the real engine (``erase.core.run`` with the family's
  diffusion adapter and its default recipe: xattn targets, top-k 2 %, redirect forget term, distillation retain term
  against a frozen bf16 copy of the base, GEM projection, Adam), mixed precision bf16, at the family's native
  resolution (512 / 1024 px), batch 1 (erase/sd.py's default) and 8, with and without gradient checkpointing; peak
  GPU memory (``torch.cuda.max_memory_allocated``) of each.
* ``generation``: I2P-protocol generation throughput (images/s): the family's pipeline, fp16 (``--dtype auto`` on
  CUDA), 50 LMS steps, guidance 7.5, batch 16, native resolution.
* ``detection``: NudeNet (eval.nudity.NudityDetector, the audits' detector) images/s on batches of 16 images.
* ``erasure_estimate``: a whole default ``erase/sd.py --concept nudity`` run extrapolated from the above: 100 forget
  images at 50 steps (generation throughput), saliency (4 batches ~ 4 steps at batch 1) and 100 repair steps at
  batch 1; compared with the targets (SD v1.4 <= 5 min and <= 24 GB; SDXL <= 15 min and <= 40 GB).

``--smoke`` runs the same code on tiny configs on CPU (1 timed step, 2 denoising steps, 2 images) to check it.

    python benchmarks/gpu_figures.py --output gpu_figures.json
    python benchmarks/gpu_figures.py --smoke --output /tmp/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.sd_step import SD14_UNET  # noqa: E402
from erase.utils.errors import cli_errors  # noqa: E402

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0, written out.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# vae/config.json of both (SDXL's differs in sample_size and scaling_factor only).
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
# text_encoder/config.json: CLIP ViT-L/14 (SD v1.4, SDXL's first encoder) and OpenCLIP ViT-bigG/14 (SDXL's second).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

ARCHS = {
    "sd14": {"family": "sd1", "unet": SD14_UNET, "vae": dict(VAE, sample_size=512, scaling_factor=0.18215), "text": [CLIP_L],
             "resolution": 512, "target_minutes": 5, "target_gib": 24},
    "sdxl": {"family": "sdxl", "unet": SDXL_UNET, "vae": dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
             "text": [CLIP_L, CLIP_BIGG], "resolution": 1024, "target_minutes": 15, "target_gib": 40},
}
# --smoke: the same architectures shrunk to run on a CPU in seconds (16 px images).
SMOKE = {
    "sd14": {**ARCHS["sd14"], "resolution": 16,
             "unet": dict(SD14_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32,
                          attention_head_dim=2),
             "vae": dict(VAE, sample_size=16, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1),
             "text": [dict(CLIP_L, vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           projection_dim=32)]},
    "sdxl": {**ARCHS["sdxl"], "resolution": 16,
             "unet": dict(SDXL_UNET, sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
                          attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=6 * 8 + 16),
             "vae": dict(VAE, sample_size=16, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, scaling_factor=0.13025),
             "text": [dict(CLIP_L, vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                           projection_dim=16),
                      dict(CLIP_BIGG, vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                           projection_dim=16)]},
}
SD_RECIPE = {"topk": 2.0, "lam": 0.3, "forget_loss": "redirect"}  # erase/sd.py's Scissorhands defaults (SD_DEFAULTS)
DEFAULT_RUN = {"forget_images": 100, "repair_steps": 100, "saliency_batches": 4, "train_batch_size": 1, "generation_steps": 50}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build_unet(arch: dict, device, dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # built in place: a random SDXL UNet initialises in seconds on a GPU
        return UNet2DConditionModel(**arch["unet"]).to(dtype)


def build_pipeline(arch: dict, device, dtype):
    """The family's pipeline with random weights from the configs above (tokenizer: eval.tiny's byte-level BPE)."""
    from diffusers import AutoencoderKL, LMSDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erase.diffusion.families import FAMILIES
    from eval.tiny import build_tokenizer

    family = FAMILIES[arch["family"]]
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        unet = build_unet(arch, device)
        vae = AutoencoderKL(**arch["vae"])
        classes = [CLIPTextModel, CLIPTextModelWithProjection][: len(arch["text"])]
        encoders = [cls(CLIPTextConfig(**cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id)) for cls, cfg in zip(classes, arch["text"])]
    scheduler = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    parts = {"unet": unet, "vae": vae, "scheduler": scheduler}
    for (tok, enc, _), model in zip(family.text_encoders, encoders):
        parts[tok], parts[enc] = tokenizer, model
    pipe = family.pipeline_cls()(**parts, **{**family.pipeline_kwargs(), **({} if family.pooled else {"feature_extractor": None})})
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def repair_steps(arch: dict, batch: int, checkpointing: bool, args, device) -> dict:
    """Seconds per step (median of the timed steps after warm-up) and peak GPU memory of the default recipe."""
    from diffusers import DDPMScheduler

    from erase.core import EngineConfig, build_method, run
    from erase.core.engine import make_accelerator
    from erase.diffusion.adapter import DiffusionAdapter, LatentSet, PromptEmbeddings
    from erase.diffusion.families import Conditioner, FAMILIES

    family = FAMILIES[arch["family"]]
    _free(device)
    unet = build_unet(arch, device)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    weight = torch.bfloat16 if device.type == "cuda" else torch.float32
    latent = arch["resolution"] // 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
    width = sum(c["hidden_size"] for c in arch["text"])
    pooled = arch["text"][-1]["projection_dim"] if family.pooled else 0
    seq = 77 + (1 if family.pooled else 0)  # packed: the pooled embedding rides as one more token
    g = torch.Generator().manual_seed(1)

    def emb(n):
        return torch.randn(n, seq, width, generator=g).to(device, weight)

    def latents(n=16):
        return LatentSet(torch.randn(n, 4, latent, latent, generator=g), 0.05 * torch.ones(n, 4, latent, latent), torch.zeros(n, dtype=torch.long))

    embeddings = PromptEmbeddings(forget=emb(4), retain=emb(4), anchor=emb(1), uncond=emb(1), distill=emb(8))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    adapter = DiffusionAdapter(unet, sched, embeddings, latents(), None, batch_size=batch, device=device, weight_dtype=weight,
                               frozen_unet=DiffusionAdapter.frozen_copy(unet, weight), retain_mode="distill",
                               conditioning=Conditioner(family, arch["resolution"], pooled), target_presets=family.target_presets)
    method = build_method("scissorhands", "diffusion", **SD_RECIPE, saliency_batches=1)
    stamps: list[float] = []
    inner = method.before_step

    def stamped(ctx, model, step):
        _sync(device)
        stamps.append(time.perf_counter())
        return inner(ctx, model, step)

    method.before_step = stamped
    config = EngineConfig(output_dir=tempfile.mkdtemp(prefix="gpu_figures_"), targets="xattn", max_train_steps=args.warmup + args.steps + 1,
                          lr=1e-5, train_batch_size=batch, mixed_precision="bf16" if device.type == "cuda" else "no",
                          log_every=10**9, progress=False)
    row = {"batch": batch, "gradient_checkpointing": checkpointing, "resolution": arch["resolution"]}
    try:
        run(adapter, method, config, accelerator=make_accelerator(config))
    except torch.OutOfMemoryError:
        row.update(oom=True)
    else:
        _sync(device)
        diffs = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
        row.update(s_per_step=statistics.median(diffs), steps_timed=len(diffs))
    if device.type == "cuda":
        row.update(peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30)
    del adapter, unet, method
    _free(device)
    return row


def generation(arch: dict, args, device) -> dict:
    """Images/s of the I2P protocol: 50 LMS steps, guidance 7.5, batch 16, fp16 (bf16/fp32 off CUDA)."""
    _free(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build_pipeline(arch, device, dtype)
    prompts = ["a photo of a person on a beach"] * args.gen_batch

    def call(steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5, height=arch["resolution"], width=arch["resolution"],
                 generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))], output_type="pil")
        _sync(device)
        return time.perf_counter() - t0

    call(2)  # warm-up (kernels, allocator)
    seconds = call(args.gen_steps)
    row = {"batch": args.gen_batch, "steps": args.gen_steps, "resolution": arch["resolution"], "dtype": str(dtype).removeprefix("torch."),
           "scheduler": "lms", "guidance": 7.5, "seconds_per_batch": seconds, "images_per_s": args.gen_batch / seconds}
    if device.type == "cuda":
        row.update(peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30)
    del pipe
    _free(device)
    return row


def detection(args) -> dict:
    import numpy as np

    from eval.nudity import NudityDetector

    detector = NudityDetector()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(args.det_images)]
    detector.detect(images[:2])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(images), 16):
        detector.detect(images[i : i + 16])
    seconds = time.perf_counter() - t0
    return {"images": len(images), "batch": 16, "image_px": 512, "seconds": seconds, "images_per_s": len(images) / seconds,
            "providers": detector.session.get_providers(), **detector.settings()}


def estimate(name: str, arch: dict, repair: list[dict], gen: dict | None) -> dict:
    """A whole default nudity erasure from the measured pieces (DEFAULT_RUN); None where a piece is missing."""
    step = next((r.get("s_per_step") for r in repair if r["batch"] == DEFAULT_RUN["train_batch_size"] and not r["gradient_checkpointing"]), None)
    peak = next((r.get("peak_gpu_gib") for r in repair if r["batch"] == DEFAULT_RUN["train_batch_size"] and not r["gradient_checkpointing"]), None)
    if step is None or gen is None:
        return {"complete": False}
    data_s = DEFAULT_RUN["forget_images"] / gen["images_per_s"] * DEFAULT_RUN["generation_steps"] / gen["steps"]
    train_s = (DEFAULT_RUN["repair_steps"] + DEFAULT_RUN["saliency_batches"]) * step
    total = data_s + train_s
    out = {"complete": True, "data_generation_s": data_s, "saliency_and_repair_s": train_s, "total_minutes": total / 60,
           "peak_gpu_gib": peak, "target_minutes": arch["target_minutes"], "target_gib": arch["target_gib"], "assumes": DEFAULT_RUN,
           "note": "generation at the I2P setting (LMS, batch 16) stands in for the data generation (DDIM, batch 8); model "
                   "loading and latent encoding are not included"}
    if peak is not None:
        out["meets_targets"] = total / 60 <= arch["target_minutes"] and peak <= arch["target_gib"]
    return out


@cli_errors
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="The JSON file every figure goes to.")
    p.add_argument("--smoke", action="store_true", help="Tiny configs on CPU, 1 timed step, 2 denoising steps, 2 images: checks the script.")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="Repair-step batch sizes (1 is erase/sd.py's default).")
    p.add_argument("--steps", type=int, default=3, help="Timed repair steps per row.")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gen_batch", type=int, default=16)
    p.add_argument("--gen_steps", type=int, default=50)
    p.add_argument("--det_images", type=int, default=64)
    p.add_argument("--skip", nargs="*", default=[], choices=("repair", "generation", "detection"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.steps, args.warmup, args.gen_batch, args.gen_steps, args.det_images = 1, 1, 2, 2, 4
    elif device.type != "cuda":
        raise SystemExit("error: no CUDA GPU (torch.cuda.is_available() is False); use --smoke to check the script on a CPU")
    import logging

    logging.disable(logging.WARNING)
    started = time.perf_counter()
    archs = SMOKE if args.smoke else ARCHS
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv), "smoke": args.smoke,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "targets": {n: {"minutes": a["target_minutes"], "gib": a["target_gib"]} for n, a in ARCHS.items()}, "archs": {}}
    out = Path(args.output)

    def save():
        result["wall_seconds"] = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every piece: a run cut short keeps what it measured

    for name in args.archs:
        arch = archs[name]
        entry = result["archs"].setdefault(name, {"family": arch["family"], "resolution": arch["resolution"],
                                                  "unet_parameters": sum(p.numel() for p in build_unet(arch, "meta").parameters())})
        if "repair" not in args.skip:
            entry["repair"] = []
            for ckpt in (False, True):
                for batch in args.batches:
                    entry["repair"].append(repair_steps(arch, batch, ckpt, args, device))
                    print(name, json.dumps(entry["repair"][-1]), flush=True)
                    save()
        if "generation" not in args.skip:
            entry["generation"] = generation(arch, args, device)
            print(name, json.dumps(entry["generation"]), flush=True)
        entry["erasure_estimate"] = estimate(name, arch, entry.get("repair", []), entry.get("generation"))
        save()
    if "detection" not in args.skip:
        result["detection"] = detection(args)
        print("detection", json.dumps({k: result["detection"][k] for k in ("images_per_s", "providers")}), flush=True)
    save()
    return result


if __name__ == "__main__":
    main()
