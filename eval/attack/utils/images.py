"""The images of the concept an attack learns from: drawn by the base model (or read from a folder), judged, and
encoded to latents once (cached under ``out/target``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from eval.attack.utils.checks import PASS_RATE, image_pixels, judge_images

logger = logging.getLogger(__name__)


@dataclass
class ConceptImages:
    """Images of the concept an attack learns from, with their latents and the judge's verdict on them."""

    images: object  # erase.diffusion.data.ImageSet
    generation: dict  # how they were drawn (steps, guidance, scheduler, resolution, batch_size)
    judged: dict
    mean: object  # VAE posterior mean / std of each image's latents
    std: object


def concept_images(cfg, run, pipe, judge, resolution: int, accelerator=None) -> ConceptImages:
    """``cfg.target_images`` (a folder), or ``cfg.num_target_images`` drawn by the **base** model (the pipeline must
    still hold the base UNet) from the preset's generation prompts with seeds ``cfg.target_seed + i``; judged, and
    encoded once (cached under ``out/target``)."""
    from contextlib import nullcontext

    import torch

    from erase.diffusion import data as erase_data

    gen_kw = dict(steps=cfg.steps, guidance=float(cfg.guidance), scheduler=cfg.scheduler, resolution=resolution,
                  batch_size=cfg.generation_batch_size)
    if cfg.target_images:
        images = erase_data.folder_split("target", cfg.target_images, run.prompts.forget[0])
    else:
        images = erase_data.generate_split("target", run.prompts.generation, cfg.num_target_images, run.out, pipe=pipe,
                                           model_id=run.info.base, seed=cfg.target_seed, accelerator=accelerator, **gen_kw)
    judged = judge_images(judge, np.stack([image_pixels(f, resolution) for f in images.files]), images.prompts)
    if judged["hit_rate"] < PASS_RATE:
        logger.warning("the judge calls only %d of %d images of %s the attack learns from: its figures will understate it",
                       judged["hits"], judged["n"], cfg.concept)
    with accelerator.main_process_first() if accelerator is not None else nullcontext():  # one writer of the cache
        mean, std = erase_data.encode_latents(images, pipe.vae, resolution, run.out / "target", run.device, torch.float32,
                                              cfg.generation_batch_size)
    return ConceptImages(images, gen_kw, judged, mean, std)


def describe_images(cfg, images, gen_kw: dict, captions: list[str] | None = None) -> dict:
    """What the settings record about the images an attack learned from."""
    drawn = not cfg.target_images
    out = {"source": images.source, "count": len(images.files), "files": [f.name for f in images.files],
           "prompts": images.prompts, "seeds": images.seeds, "drawn_by": "base model" if drawn else None,
           "seed_rule": "target_seed + i, prompt i mod len(generation_prompts)" if drawn else None,
           "generation": {k: v for k, v in gen_kw.items() if k != "batch_size"} if drawn else None}
    if captions is not None:
        out["captions"] = captions
    return out
