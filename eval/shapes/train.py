"""Train the shapes model (``python -m eval.shapes train``; ``retrain`` = the same without some concepts' scenes).

Data: ``num_scenes`` scenes drawn from the world (scene i from ``(seed, i)``), rendered once and cached; the
model trains on the scenes that :func:`eval.shapes.world.training_indices` keeps (all of them unless concepts are
held out). Each time a scene is drawn, one of its training captions is picked at random.
Training: the autoencoder alone first (reconstruction + tiny KL), then the UNet and the text encoder jointly on the
frozen autoencoder's latents with the epsilon objective of Ho et al. (2020, eq. 14) and ``cond_dropout`` of the
prompts dropped to ``""`` so classifier-free guidance works (Ho & Salimans, 2022); EMA weights are saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erase.utils.files import build_once
from eval.digits.model import world_pipeline
from eval.digits.training import (TrainingState, autoencoder_state, fit_latent_scale, resume_autoencoder,
                                  train_autoencoder_steps, train_denoiser)
from eval.shapes import world
from eval.shapes.model import (FORMAT_VERSION, KIND, MODEL_CARD, ShapesModelConfig, build_flow_models, build_models,
                               cache_root, is_trained, read_model_card, world_signature)
from eval.shapes.render import cached_renders, render_many
from eval.shapes.tokenizer import build_clip_tokenizer, vocab_sha256

logger = logging.getLogger(__name__)


def scene_images(num_scenes: int, seed: int, resolution: int) -> tuple[list, np.ndarray]:
    """The training scenes and their renders ``(N, R, R, 3)`` uint8, cached in ``$ERASE_CACHE/shapes/scenes-<hash>.npy``
    (a retrain model reuses the base's renders)."""
    scenes = world.training_scenes(num_scenes, seed)
    key = hashlib.sha256(json.dumps({"n": num_scenes, "seed": seed, "resolution": resolution, "world": world_signature()},
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / "shapes" / f"scenes-{key}.npy"
    return scenes, cached_renders(path, num_scenes, lambda: render_many(scenes, resolution))


def caption_table(scenes, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(token ids of every distinct training caption + ``""`` last, per scene the caption rows (padded -1), per
    scene the number of captions, the caption texts)."""
    per_scene = [world.captions(s, "train") for s in scenes]
    texts = list(dict.fromkeys(c for cs in per_scene for c in cs))
    row = {c: i for i, c in enumerate(texts)}
    texts.append("")
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    width = max(len(cs) for cs in per_scene)
    table = torch.full((len(scenes), width), -1, dtype=torch.long)
    for i, cs in enumerate(per_scene):
        table[i, : len(cs)] = torch.tensor([row[c] for c in cs])
    return ids, table, torch.tensor([len(cs) for cs in per_scene]), texts


def _cosine(opt, steps: int):
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))


def train_autoencoder(vae, images: torch.Tensor, cfg: ShapesModelConfig, gen: torch.Generator, bar, shift: bool = False) -> dict:
    """Phase 1 on uint8 images ``(N, 3, R, R)``; fits the latent scaling factor (unit std) and, with ``shift`` (SD3's
    VAE: latents are ``(z - shift) * scale``), the shift factor (the latents' mean); returns stats, ``mean`` shifted."""
    train_autoencoder_steps(vae, len(images), lambda idx: images[idx].float() / 127.5 - 1, cfg, gen, bar,
                            lambda opt: _cosine(opt, cfg.vae_steps))
    mean, std, mse = latent_stats(vae, images)
    mean, scaling, shift_factor = fit_latent_scale(vae, mean, std, gen, shift)
    return {"mean": mean, "std": std, "scaling_factor": scaling, "shift_factor": shift_factor, "reconstruction_mse": mse}


def latent_stats(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The frozen autoencoder's posterior mean and std of every image, and its reconstruction error (first 2048)."""
    means, stds, mse = [], [], 0.0
    with torch.no_grad():
        for i in range(0, len(images), 512):
            x = images[i : i + 512].float() / 127.5 - 1
            post = vae.encode(x).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            if i < 2048:
                mse += F.mse_loss(vae.decode(post.mean).sample, x, reduction="sum").item()
    return torch.cat(means), torch.cat(stds), mse / (min(2048, len(images)) * images[0].numel())


def train_shapes_model(cfg: ShapesModelConfig, output_dir: str | Path, progress: bool = True, force: bool = False) -> Path:
    """Train (or find cached) a shapes pipeline in ``output_dir``; returns the folder.

    Cached: a folder whose ``shapes_model.json`` has this config's fingerprint is returned as it is. The folder is
    written to ``<output_dir>.tmp-<pid>`` and renamed at the end, so it is never half-written; one process trains a
    folder at a time (``build_once``): another that asks for it meanwhile waits, then finds it cached."""
    output_dir = Path(output_dir)
    return build_once(output_dir, lambda: not force and is_trained(output_dir, cfg),
                      lambda: _train_shapes_model(cfg, output_dir, progress, force),
                      f"shapes model with fingerprint {cfg.fingerprint()}")


def _train_shapes_model(cfg: ShapesModelConfig, output_dir: Path, progress: bool, force: bool = False) -> Path:
    if output_dir.exists() and any(output_dir.iterdir()) and read_model_card(output_dir) is None:
        raise FileExistsError(f"{str(output_dir)!r} exists and is not a shapes model folder; choose an empty path")
    from tqdm.auto import tqdm

    start, cpu_start, times_start = time.time(), time.process_time(), os.times()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    scenes, images = scene_images(cfg.num_scenes, cfg.seed, cfg.resolution)
    keep = world.training_indices(scenes, cfg.held_out)  # both phases see only these scenes
    if len(keep) == 0:
        raise ValueError(f"held_out {list(cfg.held_out)} leaves no training scene")
    scenes = [scenes[i] for i in keep]
    images = torch.from_numpy(images[keep]).permute(0, 3, 1, 2).contiguous()
    render_seconds = time.time() - start
    tokenizer = build_clip_tokenizer(cfg.max_length)
    flow = cfg.denoiser == "sd3"
    if flow:  # an SD3-kind transformer, trained with rectified flow
        vae, unet, encoders, t5_tokenizer = build_flow_models(cfg, tokenizer)
    else:
        vae, unet, text_encoder = build_models(cfg, tokenizer)
        encoders = [text_encoder]
    bar = tqdm(total=cfg.vae_steps + cfg.unet_steps, desc="train shapes model", disable=not progress, unit="step")

    state = TrainingState(output_dir, cfg.fingerprint(), fresh=force)  # an interrupted training resumes (training.py)
    record = state.load()
    if record is None:
        ae = train_autoencoder(vae, images, cfg, gen, bar, shift=flow)
        autoencoder_state(state, vae, gen, {k: ae[k] for k in ("scaling_factor", "shift_factor", "reconstruction_mse")})
    else:
        ae = resume_autoencoder(state, record, vae, gen)
        ae["mean"], ae["std"], _ = latent_stats(vae, images)
        ae["mean"] = ae["mean"] - ae["shift_factor"] if ae["shift_factor"] is not None else ae["mean"]
        bar.update(cfg.vae_steps)
    mean, std, scaling = ae["mean"], ae["std"], ae["scaling_factor"]

    # Phase 2: UNet + text encoder on scaled latents; each draw of a scene picks one of its training captions.
    ids, table, n_caps, texts = caption_table(scenes, tokenizer)
    empty_row = len(texts) - 1
    def draw_rows(idx):  # one of each drawn scene's training captions
        pick = (torch.rand(cfg.batch_size, generator=gen) * n_caps[idx]).long()
        return table[idx, pick]

    loss_fn = None
    if flow:
        from eval.digits.transformer import flow_loss, token_ids

        loss_fn = flow_loss(unet, encoders, *token_ids(tokenizer, t5_tokenizer, texts), gen)
    loss = train_denoiser(unet, encoders, ids, (mean, std, scaling), draw_rows, empty_row, cfg, gen,
                          lambda opt: _cosine(opt, cfg.unet_steps), bar, loss_fn=loss_fn, state=state, record=record)

    pipe = world_pipeline("shapes", vae, unet, encoders, tokenizer, t5_tokenizer if flow else None)
    tmp = output_dir.parent / f"{output_dir.name}.tmp-{os.getpid()}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    times_end = os.times()
    kinds = [s.kind for s in scenes]
    card = {
        "kind": KIND, "format_version": FORMAT_VERSION, "fingerprint": cfg.fingerprint(), "config": cfg.to_dict(),
        "world": world_signature(), "vocab_sha256": vocab_sha256(), "vocab_size": len(tokenizer),
        "denoiser": cfg.denoiser, "vae_scaling_factor": scaling, "vae_reconstruction_mse": ae["reconstruction_mse"],
        **({"vae_shift_factor": ae["shift_factor"], "objective": "rectified flow (velocity), logit-normal sigma, shift 1.0"}
           if flow else {}),
        "final_unet_loss": loss, "train_seconds": round(time.time() - start, 1),
        "render_seconds": round(render_seconds, 1),
        **({"resumed_from": {"phase": record["phase"], "step": record["step"],
                             "seconds": "train_seconds and the CPU seconds are the resumed process's only"}}
           if record is not None else {}),
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "train_user_cpu_seconds": round(times_end.user - times_start.user, 1), "torch_threads": torch.get_num_threads(),
        "training_data": {
            "held_out": list(cfg.held_out), "num_scenes": cfg.num_scenes, "num_trained": int(len(keep)),
            "scenes_per_kind": {k: kinds.count(k) for k in ("single", "count", "pair")},
            "num_captions": len(texts) - 1,
            "indices_sha256": hashlib.sha256(keep.astype(np.int64).tobytes()).hexdigest(),
            "rule": "scene i = world.sample_scene(world.scene_seed(seed, i)); kept unless an object has a held-out "
                    "shape, colour or texture (world.training_indices)"},
    }
    (tmp / MODEL_CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    state.clear()
    logger.info("shapes model trained in %.0f s (%.0f CPU s) -> %s", card["train_seconds"], card["train_cpu_seconds"], output_dir)
    return output_dir
