"""Forget / retain images for erasing a concept from Stable Diffusion, and their cached VAE latents.

Generated sets: image i of a split is drawn by the *base* model from prompt ``prompts[i % len(prompts)]`` with
seed ``seed + i`` (``erase.diffusion.generate``: one generator per image, sharded over processes, resumable: finished images
with identical settings are skipped). ``manifest.json`` in the data folder lists every image with its prompt and
seed. User folders (``--forget_images`` / ``--retain_images``) are taken as they are; a ``<name>.txt`` beside an
image gives its prompt (a forget image's caption conditions that image; one without a caption is conditioned on
a random forget prompt of the concept). Latents are encoded once and cached as safetensors keyed by the images and
the VAE.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from erase.utils.images import read_caption, require_images
from erase.utils.folders import temp_name
from erase.utils.errors import UserError
from erase.utils.files import atomic_write_json, settings_hash

logger = logging.getLogger(__name__)


@dataclass
class ImageSet:
    split: str
    files: list[Path]
    prompts: list[str]
    seeds: list[int | None] = field(default_factory=list)
    source: str = "generated"
    captioned: list[bool] = field(default_factory=list)  # folder sets: the image has its own non-empty x.txt

    def records(self) -> list[dict]:
        rows = [{"file": f.name, "prompt": p, "seed": s} for f, p, s in zip(self.files, self.prompts, self.seeds)]
        for row, c in zip(rows, self.captioned):
            row["captioned"] = c
        return rows


def generate_split(split: str, prompts: list[str], count: int, out_dir: Path, *, pipe, model_id: str, seed: int,
                   steps: int, guidance: float, scheduler: str, resolution: int, batch_size: int, accelerator=None) -> ImageSet:
    """Generate (or reuse) ``count`` images of ``split`` from ``prompts`` with the base pipeline."""
    from erase.diffusion.generate import generate, GenerationConfig, image_name
    from erase.diffusion.prompt_table import PromptRow

    if count < 1:
        raise UserError(f"the number of {split} images must be >= 1 to generate the {split} set, got {count}")
    if not prompts:
        raise UserError(f"the concept has no {split} prompts to generate the {split} set from")
    rows = [PromptRow(index=i, prompt=prompts[i % len(prompts)], seed=seed + i) for i in range(count)]
    cfg = GenerationConfig(model=model_id, steps=steps, guidance=guidance, scheduler=scheduler, resolution=resolution,
                           batch_size=batch_size, dtype="fp32")
    if pipe is not None:
        import diffusers

        from erase.diffusion.generate import SCHEDULERS

        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    generate(rows, out_dir / split, cfg, accelerator=accelerator, pipe=pipe)
    return ImageSet(split, [out_dir / split / image_name(r.index, 0) for r in rows], [r.prompt for r in rows],
                    [r.seed for r in rows], source="generated")


def merge_splits(split: str, parts: list[ImageSet]) -> ImageSet:
    """One set from several (one per concept), in order; a single part is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    return ImageSet(split, [f for p in parts for f in p.files], [q for p in parts for q in p.prompts],
                    [s for p in parts for s in p.seeds], source="generated")


def folder_split(split: str, folder: str | Path, default_prompt: str | None = "") -> ImageSet:
    """Images of a user folder, every one checked up front (erase.utils.images: decodable, within the pixel limit, no
    symlink out of the folder); the prompt of ``x.png`` is ``x.txt`` (UTF-8) when present and not empty, else
    ``default_prompt``."""
    images = require_images(folder, f"--{split}_images")
    prompts, captioned = [], []
    for p in images:
        caption = (read_caption(p.with_suffix(".txt"), folder) or "").strip()
        prompts.append(caption if caption else default_prompt)
        captioned.append(bool(caption))
    return ImageSet(split, images, prompts, [None] * len(images), source=str(Path(folder).resolve()), captioned=captioned)


def caption_index(images: ImageSet) -> tuple[list[str], torch.Tensor]:
    """The distinct captions of a set (sorted) and each image's index into them, −1 for an image without one."""
    flags = images.captioned or [False] * len(images.files)
    captions = sorted({p for p, c in zip(images.prompts, flags) if c})
    index = [captions.index(p) if c else -1 for p, c in zip(images.prompts, flags)]
    return captions, torch.tensor(index, dtype=torch.long)


def write_manifest(data_dir: Path, sets: list[ImageSet], settings: dict) -> None:
    atomic_write_json(data_dir / "manifest.json", {
        "settings": settings,
        **{s.split: {"source": s.source, "count": len(s.files), "images": s.records()} for s in sets},
    })


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB in [-1, 1], shorter side resized to ``resolution`` then centre-cropped (3, r, r)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)


def _vae_fingerprint(vae) -> str:
    sd = vae.state_dict()
    probe = {k: [list(v.shape), float(v.float().sum())] for k, v in list(sd.items())[:4] + list(sd.items())[-4:]}
    return settings_hash({"config": {k: str(v) for k, v in dict(vae.config).items()}, "probe": probe})


@torch.no_grad()
def encode_latents(images: ImageSet, vae, resolution: int, cache_dir: Path, device, dtype, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of every image, float32 on CPU; cached in ``cache_dir``."""
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in images.files]
    key = settings_hash({"files": stats, "source": images.source, "resolution": resolution, "vae": _vae_fingerprint(vae)})
    path = cache_dir / f"latents-{images.split}-{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["mean"], t["std"]
    means, stds = [], []
    for i in range(0, len(images.files), batch_size):
        x = torch.stack([load_image(f, resolution) for f in images.files[i : i + batch_size]]).to(device, dtype)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    # contiguous, as a cached copy loads: the VAE's posterior is a strided view, and torch.cat keeps its layout, which
    # sends the first run's convolutions down another kernel than every later run (float-rounding differences)
    mean, std = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))  # per process: two runs sharing a data folder never share a temporary
    try:
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp),
                  metadata={"split": images.split, "resolution": str(resolution), "files": json.dumps([f.name for f in images.files])})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return mean, std
