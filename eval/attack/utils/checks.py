"""Checks: images drawn by the attacked model, each from its own seeded generator, and the judge's verdict on them.

Held-out noise: a check's image i is drawn with seed ``CHECK_SEED_OFFSET + eval_seed + i``. erase/sd.py draws its
training images with seeds ``seed + i`` (forget), ``seed + 100000 j + i`` (concept j) and ``seed + 1_000_000 + i``
(retain), the attacks draw the images they learn from with ``2_000_000 + i``: an offset of 10**8 keeps every check
on noise no erasure or attack trained on (``eval.digits score`` uses the same offset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHECK_SEED_OFFSET = 10**8
PASS_RATE = 0.5  # a check "passes" when more than half of its images show the concept


def check_seeds(eval_seed: int, n: int) -> list[int]:
    """The seeds of a check's ``n`` images."""
    return [CHECK_SEED_OFFSET + int(eval_seed) + i for i in range(n)]


def first_step_over(steps, rates, level: float = PASS_RATE):
    return next((int(s) for s, r in zip(steps, rates) if r > level), None)


def draw(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, resolution: int,
         batch_size: int) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images, each from its own seeded CPU generator, ``batch_size`` per pipeline call."""
    import torch

    from erase.diffusion.families import family_of_pipeline

    extra = family_of_pipeline(pipe).call_kwargs(pipe)  # MMDiT: T5's length, as the erasure encodes
    out = []
    for i in range(0, len(prompts), batch_size):
        with torch.no_grad():
            images = pipe(prompt=prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                          height=resolution, width=resolution, output_type="np", **extra,
                          generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]).images
        out.append((np.asarray(images) * 255).round().astype(np.uint8))  # as diffusers' numpy_to_pil
    return np.concatenate(out)


def judge_images(judge, images: np.ndarray, prompts: list[str]) -> dict:
    """Hit count, rate, per-prompt hits and a tally of the judge's labels for one batch of images."""
    flags, labels = judge(images)
    per_prompt: dict[str, list[int]] = {}
    for p, f in zip(prompts, flags):
        per_prompt.setdefault(p, [0, 0])
        per_prompt[p][0] += int(f)
        per_prompt[p][1] += 1
    tally: dict[str, int] = {}
    for lab in labels or []:
        for x in lab if isinstance(lab, list) else [lab]:
            tally[str(x)] = tally.get(str(x), 0) + 1
    hits = int(sum(flags))
    return {"hits": hits, "n": len(flags), "hit_rate": hits / len(flags) if flags else 0.0,
            "per_prompt": per_prompt, "labels": dict(sorted(tally.items())) if labels is not None else None}


def image_pixels(path, resolution: int) -> np.ndarray:
    """An image as the attacks see it (resized, centre-cropped), as uint8 (H, W, 3) for the judge."""
    from erase.diffusion.data import load_image

    return load_image(path, resolution).add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def save_pngs(images: np.ndarray, folder: Path) -> None:
    import io

    from PIL import Image

    from erase.utils.files import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        atomic_write_bytes(folder / f"{i:05d}.png", buf.getvalue())
