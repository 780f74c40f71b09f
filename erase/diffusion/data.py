"""Forget / retain images for erasing a concept from Stable Diffusion, and their cached VAE latents.

Stage 2 of a run (:func:`prepare_data`): the forget images (generated per concept, or the user's folder), the retain
images when the retain term needs them, and their VAE latents, encoded once.

Generated sets: image i of a split is drawn by the *base* model from prompt ``prompts[i % len(prompts)]`` with
seed ``seed + i`` (concept j of several: ``seed + 100000·j + i`` in ``data/concept-j-<name>``; retain images
``seed + 1000000 + i``) (``erase.diffusion.generate``: one generator per image, sharded over processes, resumable: finished images
with identical settings are skipped). ``manifest.json`` in the data folder lists every image with its prompt and
seed. User folders (``--forget_images`` / ``--retain_images``) are taken as they are; a ``<name>.txt`` beside an
image gives its prompt (a forget image's caption conditions that image; one without a caption is conditioned on
a random forget prompt of its concept). With several concepts the forget folder holds one subfolder per concept,
named like it: every image belongs to exactly one concept. Latents are encoded once and cached as safetensors keyed by the images and
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
    concepts: list[int] = field(default_factory=list)  # forget sets: the concept each image belongs to (default 0)

    def concept_of(self) -> list[int]:
        return list(self.concepts) if self.concepts else [0] * len(self.files)

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


def merge_splits(split: str, parts: list[ImageSet], source: str = "generated") -> ImageSet:
    """One set from several (part j: concept j), in order; a single part is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    return ImageSet(split, [f for p in parts for f in p.files], [q for p in parts for q in p.prompts],
                    [s for p in parts for s in p.seeds], source=source, captioned=[c for p in parts for c in p.captioned],
                    concepts=[j for j, p in enumerate(parts) for _ in p.files])


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


def caption_index(images: ImageSet) -> tuple[list[tuple[str, int]], torch.Tensor]:
    """The distinct (caption, concept) pairs of a set (sorted) and each image's index into them, −1 for an image
    without a caption."""
    flags = images.captioned or [False] * len(images.files)
    keys = sorted({(p, k) for p, c, k in zip(images.prompts, flags, images.concept_of()) if c})
    index = [keys.index((p, k)) if c else -1 for p, c, k in zip(images.prompts, flags, images.concept_of())]
    return keys, torch.tensor(index, dtype=torch.long)


def user_forget_images(folder: str | Path, concept_names: list[str]) -> ImageSet:
    """The user's forget images: the folder itself for one concept; for several, one subfolder per concept (named like
    it), every image of ``<folder>/<name>/`` belonging to that concept. Images outside them would belong to no concept
    and are refused in one line, as is a missing subfolder."""
    if len(concept_names) == 1:
        return folder_split("forget", folder, None)  # uncaptioned: the concept's prompts
    root = Path(folder)
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".txt")
    if loose:
        raise UserError(f"--forget_images {folder}: with several concepts each image goes into the subfolder of its concept "
                        f"({', '.join(n + '/' for n in concept_names)}); {len(loose)} file(s) lie at the top (first: {loose[0]})")
    parts = []
    for name in concept_names:
        sub = root / name
        if not sub.is_dir():
            raise UserError(f"--forget_images {folder}: no subfolder {name}/ for concept {name!r} (with several concepts, one "
                            f"subfolder per concept: {', '.join(n + '/' for n in concept_names)})")
        parts.append(folder_split("forget", sub, None))
    return merge_splits("forget", parts, source=str(root.resolve()))


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


def _read_cache(path: Path, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (mean, std) of ``count`` images, or None (then they are encoded again) when the file is missing or
    is not a whole cache of them: cut by a full disk or a kill, garbled, another tensor layout."""
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        mean, std = t["mean"], t["std"]
        if mean.shape != std.shape or mean.shape[0] != count or not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError(f"{tuple(mean.shape)} / {tuple(std.shape)} for {count} images, or not finite")
    except Exception as e:  # safetensors raises its own error types for a cut header or data
        logger.warning("the latents cache %s is unusable (%s); encoding the images again", path, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return None
    return mean, std


@torch.no_grad()
def encode_latents(images: ImageSet, vae, resolution: int, cache_dir: Path, device, dtype, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of every image, float32 on CPU; cached in ``cache_dir``."""
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in images.files]
    key = settings_hash({"files": stats, "source": images.source, "resolution": resolution, "vae": _vae_fingerprint(vae)})
    path = cache_dir / f"latents-{images.split}-{key}.safetensors"
    cached = _read_cache(path, len(images.files))
    if cached is not None:
        return cached
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


# ------------------------------------------------------------------------------------------------ the stage
@dataclass
class EraseData:
    """What stage 2 hands on: the image sets, their cached VAE posteriors (split -> (mean, std)), where they live, and
    the resolution they were encoded at."""

    data_dir: Path
    forget: ImageSet
    retain: ImageSet | None
    latents: dict[str, tuple[torch.Tensor, torch.Tensor]]
    resolution: int
    concepts: list[str] = field(default_factory=list)  # the concept names of ``forget.concepts``, in order

    def for_concepts(self, names: list[str], needs_retain: bool) -> "EraseData":
        """The part of this data an erasure of ``names`` uses: the forget images of those concepts (re-indexed in that
        order) and the retain set. A concept it has no images of, or retain images it lacks, is one line."""
        if names == self.concepts:
            picked = self
        else:
            missing = [n for n in names if n not in self.concepts]
            if missing:
                raise UserError(f"the prepared data has no forget images of concept {missing[0]!r}; it holds "
                                f"{', '.join(self.concepts)} (prepare the data for every concept you erase)")
            owner = self.forget.concept_of()
            rows = [i for i, k in enumerate(owner) if self.concepts[k] in names]
            f = self.forget
            forget = ImageSet("forget", [f.files[i] for i in rows], [f.prompts[i] for i in rows], [f.seeds[i] for i in rows],
                              source=f.source, captioned=[f.captioned[i] for i in rows] if f.captioned else [],
                              concepts=[names.index(self.concepts[owner[i]]) for i in rows])
            index = torch.tensor(rows, dtype=torch.long)
            latents = {**self.latents, "forget": tuple(t[index] for t in self.latents["forget"])}
            picked = EraseData(self.data_dir, forget, self.retain, latents, self.resolution, list(names))
        if needs_retain and picked.retain is None:
            raise UserError("the prepared data has no retain images, which this run's retain term needs (prepare it with the same "
                            "--method and --retain_loss)")
        return picked

    @property
    def sets(self) -> list[ImageSet]:
        return [s for s in (self.forget, self.retain) if s is not None]

    def describe(self) -> dict:
        """The record's ``data`` entry (less the retain term, which the adapter owns)."""
        return {"dir": str(self.data_dir), "resolution": self.resolution,
                **{s.split: {"count": len(s.files), "source": s.source, "captioned": sum(s.captioned)} for s in self.sets}}


def data_dir_of(config) -> Path:
    return Path(config.data.data_dir) if config.data.data_dir else Path(config.output.output_dir) / "data"


def needs_retain_images(config) -> bool:
    """Whether the retain term of the run trains on retain images (not for distillation alone)."""
    from erase.core.registry import get_method_class

    return get_method_class(config.method, "diffusion").uses_retain and config.objective.retain_loss != "distill"


def needs_no_images(config) -> bool:
    """A closed-form editor (uce, speed) edits from prompts alone: no forget or retain images."""
    from erase.core.registry import get_method_class

    return get_method_class(config.method, "diffusion").closed_form


def draws_images(config) -> bool:
    """Whether the data stage generates images with the base pipeline (no user folder for a split it needs)."""
    d = config.data
    return not needs_no_images(config) and (not d.forget_images or (needs_retain_images(config) and not d.retain_images))


def no_images(config, parts, resolution: int) -> EraseData:
    """The data of a run that needs no images: an empty forget set (its latents hold the latent shape the objective reads)."""
    vae = parts.vae.config
    side = resolution // 2 ** (len(vae.block_out_channels) - 1)
    empty = torch.zeros(0, int(vae.latent_channels), side, side)
    forget = ImageSet("forget", [], [], [], source="none (a closed-form edit reads prompts only)")
    return EraseData(data_dir_of(config), forget, None, {"forget": (empty, empty.clone())}, resolution,
                     [c.name for c in config.concept_set.concepts])


def prepare_data(config, parts, placement, accelerator, user_images: dict) -> EraseData:
    """Forget images (generated by the base model per concept, or the user's folder), retain images when the retain
    term needs them, then latents encoded once (main process first; the others read the cache) and the manifest."""
    from erase.diffusion.families import build_pipeline

    d, concepts = config.data, config.concept_set
    data_dir = data_dir_of(config)
    if needs_no_images(config):
        return no_images(config, parts, placement.resolution)
    retain_images = needs_retain_images(config)
    gen = dict(model_id=config.model.pretrained_model_name_or_path, steps=d.num_inference_steps, guidance=d.guidance_scale,
               scheduler=d.data_scheduler, resolution=placement.resolution, batch_size=d.generation_batch_size, accelerator=accelerator)
    pipe = build_pipeline(parts.family, parts.text, parts.vae, parts.denoiser, parts.noise_scheduler) if draws_images(config) else None
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)
    with accelerator.autocast():
        if d.forget_images:
            forget = user_images["forget"]
        else:  # one generated block per concept; a single concept keeps the historical layout data/forget, seeds seed + i
            forget = merge_splits("forget", [
                generate_split("forget", c.generation_prompts, d.num_forget_images,
                               data_dir if len(concepts) == 1 else data_dir / f"concept-{j}-{c.name}", pipe=pipe,
                               seed=config.train.seed + 100_000 * j, **gen)
                for j, c in enumerate(concepts.concepts)])
        retain = None
        if retain_images:
            retain = (user_images["retain"] if d.retain_images else
                      generate_split("retain", concepts.retain_prompts, d.num_retain_images, data_dir, pipe=pipe,
                                     seed=config.train.seed + 1_000_000, **gen))
    del pipe
    sets = [s for s in (forget, retain) if s is not None]
    with accelerator.main_process_first():
        latents = {s.split: encode_latents(s, parts.vae, placement.resolution, data_dir, placement.device, placement.vae_dtype,
                                           d.generation_batch_size) for s in sets}
    if accelerator.is_main_process:
        write_manifest(data_dir, sets, {"model": config.model.pretrained_model_name_or_path, "resolution": placement.resolution,
                                        "num_inference_steps": d.num_inference_steps, "guidance_scale": d.guidance_scale,
                                        "scheduler": d.data_scheduler, "seed": config.train.seed, "concepts": concepts.name})
    return EraseData(data_dir, forget, retain, latents, placement.resolution, [c.name for c in concepts.concepts])
