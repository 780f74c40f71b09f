"""A tiny Stable-Diffusion-format text-to-image model of scikit-learn's handwritten digits.

Same parts as SD v1.4 (AutoencoderKL, UNet2DConditionModel with cross-attention, CLIPTextModel + CLIPTokenizer,
a DDIM scheduler with SD's beta schedule), saved with ``StableDiffusionPipeline.save_pretrained`` so every
tool that loads SD v1.4 loads it too, only small enough to train on a laptop CPU in a few minutes.

``--denoiser sd3`` trains the SD3 kind instead: an MMDiT transformer with CLIP-L, CLIP-G and T5 and the 16-channel VAE,
with the rectified-flow objective, saved with ``StableDiffusion3Pipeline.save_pretrained`` (eval/digits/transformer.py).

Data: the 1,797 8x8 digits (ink 0..16) upscaled bilinearly to 16 px, grey copied to 3 channels, in [-1, 1].
Training: the autoencoder alone first (reconstruction + tiny KL), then the UNet and the text encoder jointly on
the frozen autoencoder's latents with the epsilon objective of Ho et al. (2020, eq. 14) and 10% of prompts
dropped to ``""`` so classifier-free guidance works (Ho & Salimans, 2022).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erase.utils.files import build_once
from eval.digits.training import (TrainingState, autoencoder_state, fit_latent_scale, resume_autoencoder,
                                  sd_scheduler_config, train_autoencoder_steps, train_denoiser)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when training code changes what a given config produces
MODEL_CARD = "digits_model.json"
DENOISERS = ("unet", "sd3")  # the digits model's denoiser kinds (DigitsModelConfig.denoiser)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Phrasings the model is trained on (and that the presets' forget / retain prompts use) ...
TRAIN_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num}",
    "a picture of a {word}",
    "the digit {num}",
    "a handwritten {word}",
    "an image of the number {word}",
)
# ... and phrasings kept out of training and erasure, built from the same words in new combinations, to test
# whether an erasure generalises beyond the exact prompts it saw.
HELDOUT_TEMPLATES = (
    "a picture of the number {num}",
    "an image of a handwritten {num}",
    "the handwritten number {word}",
    "a digit {word}",
)


def digit_prompts(digit: int, templates=TRAIN_TEMPLATES) -> list[str]:
    """The prompts for one digit, one per template."""
    return [t.format(word=DIGIT_WORDS[digit], num=digit) for t in templates]


def parse_digit(name: str) -> int:
    """``"three"`` / ``"3"`` -> 3; anything else raises ``ValueError`` naming the allowed values."""
    key = str(name).strip().lower()
    if key in DIGIT_WORDS:
        return DIGIT_WORDS.index(key)
    if key.isdigit() and len(key) == 1:
        return int(key)
    raise ValueError(f"unknown digit {name!r}; expected one of {', '.join(DIGIT_WORDS)} or 0-9")


def parse_digits(names: str) -> list[int]:
    """``"three,five"`` -> [3, 5] (order kept); an empty item, an unknown digit or a repeat raises ``ValueError``."""
    items = [n.strip() for n in str(names).split(",")]
    if not items or any(not n for n in items):
        raise ValueError(f"--concept {names!r}: expected digit names separated by commas (three,five,eight)")
    digits = [parse_digit(n) for n in items]
    if len(set(digits)) != len(digits):
        raise ValueError(f"--concept {names!r} names a digit twice")
    if len(digits) > 9:
        raise ValueError(f"--concept {names!r} erases every digit: at least one must be retained")
    return digits


def prompt_digit(prompt: str) -> int | None:
    """The one digit a prompt names (as a word or a numeral), or None if it names none or several."""
    found = set()
    for tok in re.findall(r"[a-z]+|\d", prompt.lower()):
        if tok in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(tok))
        elif tok.isdigit():
            found.add(int(tok))
    return found.pop() if len(found) == 1 else None


def vocabulary_words() -> list[str]:
    """Every word the training and held-out templates use, digit names included."""
    text = " ".join(t.format(word=w, num="") for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES for w in DIGIT_WORDS)
    return sorted(set(re.findall(r"[a-z]+", text)))


# ----------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(max_length: int = 16):
    """The digits tokenizer: :func:`eval.tiny.build_tokenizer` over every word of the templates, so each is one
    token. Numerals are single characters in CLIP's pre-tokenizer; unknown words fall back to characters."""
    from eval.tiny import build_tokenizer as build

    return build(vocabulary_words(), max_length)


# ----------------------------------------------------------------------------------------------- data
def load_digit_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All sklearn digits as ``(N, 1, R, R)`` floats in [-1, 1] and their labels ``(N,)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1), torch.tensor(d.target, dtype=torch.long)


def training_indices(labels, held_out_digits=()) -> np.ndarray:
    """Indices of the images a digits model trains on: every image whose label is not a held-out digit (sorted).

    The ``retrain`` reference of the benchmark holds out the erased digit(s): it never sees their images, and so
    never their prompts either (a training prompt is built from its image's label)."""
    labels = np.asarray(labels)
    return np.flatnonzero(~np.isin(labels, list(held_out_digits)))


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train / test split of ``range(n)``."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * test_fraction))
    return np.sort(perm[k:]), np.sort(perm[:k])


# ----------------------------------------------------------------------------------------------- config
@dataclass
class DigitsModelConfig:
    resolution: int = field(default=16, metadata={"help": "image side in pixels (the 8x8 digits are upscaled)"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation and batches"})
    vae_steps: int = field(default=200, metadata={"help": "autoencoder training steps"})
    vae_batch_size: int = field(default=64, metadata={"help": "autoencoder batch size"})
    vae_lr: float = field(default=2e-3, metadata={"help": "autoencoder learning rate"})
    vae_kl_weight: float = field(default=1e-5, metadata={"help": "weight of the KL term of the autoencoder"})
    unet_steps: int = field(default=800, metadata={"help": "denoiser (UNet or transformer) + text encoder training steps"})
    lr: float = field(default=2e-3, metadata={"help": "denoiser + text encoder peak learning rate (cosine decay)"})
    batch_size: int = field(default=64, metadata={"help": "denoiser + text encoder batch size"})
    cond_dropout: float = field(default=0.1, metadata={"help": "share of prompts replaced by '' (for CFG)"})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the saved denoiser / text encoder(s)"})
    unet_channels: tuple = field(default=(32, 64), metadata={"help": "UNet block widths (unet denoiser)"})
    vae_channels: tuple = field(default=(16, 32), metadata={"help": "autoencoder block widths"})
    text_width: int = field(default=64, metadata={"help": "CLIP text encoder hidden size = cross-attention dim (sd3: CLIP-L's; CLIP-G twice, T5 four times)"})
    text_layers: int = field(default=2, metadata={"help": "CLIP text encoder layers"})
    max_length: int = field(default=16, metadata={"help": "tokenizer model_max_length"})
    held_out_digits: tuple = field(default=(), metadata={
        "help": "digits whose images are left out of training (the benchmark's retrain reference); none by default"})
    denoiser: str = field(default="unet", metadata={
        "help": "unet: SD v1.4's kind (noise prediction); sd3: an SD3-kind MMDiT transformer with CLIP-L, CLIP-G and T5, "
                "trained with rectified flow (eval/digits/transformer.py)"})
    dit_layers: int = field(default=3, metadata={"help": "sd3 denoiser only: joint blocks (as many heads of 64)"})

    def __post_init__(self):
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        self.vae_channels = tuple(int(c) for c in self.vae_channels)
        self.held_out_digits = tuple(sorted(int(d) for d in self.held_out_digits))
        if any(not 0 <= d <= 9 for d in self.held_out_digits) or len(set(self.held_out_digits)) != len(self.held_out_digits):
            raise ValueError(f"held_out_digits must be distinct digits 0-9, got {list(self.held_out_digits)}")
        if len(self.held_out_digits) > 9:
            raise ValueError("held_out_digits leaves no digit to train on")
        if self.resolution % 2 or self.resolution < 8:
            raise ValueError(f"resolution must be an even number >= 8, got {self.resolution}")
        if min(self.vae_steps, self.unet_steps, self.batch_size, self.vae_batch_size) < 1:
            raise ValueError("step counts and batch sizes must be positive")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
        if self.denoiser not in DENOISERS:
            raise ValueError(f"denoiser {self.denoiser!r} is not one of {', '.join(DENOISERS)}")
        if not 1 <= int(self.dit_layers) <= 24:
            raise ValueError(f"dit_layers must lie in 1..24, got {self.dit_layers}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet_channels"], d["vae_channels"] = list(self.unet_channels), list(self.vae_channels)
        if self.held_out_digits:
            d["held_out_digits"] = list(self.held_out_digits)
        else:  # a model trained on every digit keeps the fingerprint (and cache folder) it had before this field
            d.pop("held_out_digits")
        if self.denoiser == "unet":  # likewise a UNet model: the transformer's settings are not its
            d.pop("denoiser"), d.pop("dit_layers")
        return d

    def fingerprint(self) -> str:
        """Hash of everything that decides the trained weights (settings, templates, format version)."""
        blob = json.dumps({"config": self.to_dict(), "templates": TRAIN_TEMPLATES, "version": FORMAT_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root() -> Path:
    """``$ERASE_CACHE`` or ``~/.cache/scissorhands``."""
    return Path(os.environ.get("ERASE_CACHE") or Path.home() / ".cache" / "scissorhands")


def default_model_dir(cfg: DigitsModelConfig | None = None) -> Path:
    cfg = cfg or DigitsModelConfig()
    return cache_root() / "digits" / f"model-{cfg.fingerprint()}"


def read_model_card(model_dir: str | Path) -> dict | None:
    """The ``digits_model.json`` of a digits pipeline folder, or None if the folder is not one."""
    path = Path(model_dir) / MODEL_CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return card if isinstance(card, dict) and card.get("kind") == "digits" else None


def is_trained(model_dir: str | Path, cfg: DigitsModelConfig) -> bool:
    card = read_model_card(model_dir)
    return bool(card) and card.get("fingerprint") == cfg.fingerprint() and (Path(model_dir) / "model_index.json").is_file()


# ----------------------------------------------------------------------------------------------- models
def build_models(cfg: DigitsModelConfig, tokenizer):
    """(vae, unet, text_encoder) with random weights, from :func:`eval.tiny.build_components`. Attention (self +
    cross) only below the top resolution: at 8x8 it would cost more than the rest together."""
    from eval.tiny import build_components

    return build_components(
        tokenizer, unet_channels=cfg.unet_channels, vae_channels=cfg.vae_channels,
        latent_size=cfg.resolution // 2 ** (len(cfg.vae_channels) - 1), text_width=cfg.text_width,
        text_layers=cfg.text_layers, text_heads=2, max_length=cfg.max_length, norm_num_groups=8,
        vae_mid_attention=False,
    )


def world_pipeline(world: str, vae, denoiser, encoders, tokenizer, t5_tokenizer=None):
    """A trained world model's pipeline (``t5_tokenizer`` given: the SD3 kind, else SD v1.4's with DDIM), after
    checking that no weight is broken (a ``ValueError`` naming the part: nothing is saved)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from erase.utils.checks import check_weights

    flow = t5_tokenizer is not None
    names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3") if flow else ("unet", "text_encoder")
    for part, module in list(zip(names, [denoiser] + list(encoders))) + [("vae", vae)]:  # never save a broken model
        check_weights(module.state_dict().items(), f"the trained {world} {part}", "; nothing was saved (lower --lr / --vae_lr)")
    if flow:
        from eval.digits.transformer import flow_pipeline

        return flow_pipeline(vae, denoiser, encoders, tokenizer, t5_tokenizer)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=denoiser,
                                   scheduler=DDIMScheduler(**sd_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def train_digits_model(cfg: DigitsModelConfig, output_dir: str | Path, progress: bool = True,
                       force: bool = False) -> Path:
    """Train (or find cached) a digits pipeline in ``output_dir``; returns the folder.

    Cached: a folder whose ``digits_model.json`` has this config's fingerprint is returned as it is.
    The folder is written to ``<output_dir>.tmp-<pid>`` and renamed at the end, so it is never half-written; one
    process trains a folder at a time (``build_once``): another that asks for it meanwhile waits, then finds it cached.
    """
    output_dir = Path(output_dir)
    return build_once(output_dir, lambda: not force and is_trained(output_dir, cfg),
                      lambda: _train_digits_model(cfg, output_dir, progress, force),
                      f"digits model with fingerprint {cfg.fingerprint()}")


def _train_digits_model(cfg: DigitsModelConfig, output_dir: Path, progress: bool, force: bool = False) -> Path:
    from tqdm.auto import tqdm

    if output_dir.exists() and any(output_dir.iterdir()) and read_model_card(output_dir) is None:
        raise FileExistsError(f"{str(output_dir)!r} exists and is not a digits model folder; choose an empty path")

    start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = load_digit_images(cfg.resolution)
    keep = training_indices(labels.numpy(), cfg.held_out_digits)  # both phases see only these images
    images, labels = images[torch.from_numpy(keep)].repeat(1, 3, 1, 1), labels[torch.from_numpy(keep)]
    tokenizer = build_tokenizer(cfg.max_length)
    flow = cfg.denoiser == "sd3"
    if flow:  # an SD3-kind transformer (eval/digits/transformer.py)
        from eval.digits.transformer import build_mmdit_models
        from eval.tiny import build_t5_tokenizer

        t5_tokenizer = build_t5_tokenizer(vocabulary_words(), cfg.max_length)
        vae, unet, encoders = build_mmdit_models(cfg, tokenizer, t5_tokenizer)
    else:
        vae, unet, text_encoder = build_models(cfg, tokenizer)
        encoders = [text_encoder]
    total = cfg.vae_steps + cfg.unet_steps
    bar = tqdm(total=total, desc="train digits model", disable=not progress, unit="step")

    # Phase 1: the autoencoder (or the one a saved state holds: eval/digits/training.py).
    state = TrainingState(output_dir, cfg.fingerprint(), fresh=force)
    record = state.load()
    if record is None:
        train_autoencoder_steps(vae, len(images), lambda idx: images[idx], cfg, gen, bar)
    else:
        latent = resume_autoencoder(state, record, vae, gen)
        bar.update(cfg.vae_steps)
    with torch.no_grad():
        post = vae.encode(images).latent_dist
        mean, std = post.mean, post.std
        vae_mse = F.mse_loss(vae.decode(mean).sample, images).item()
    if record is None:
        mean, scaling_factor, shift_factor = fit_latent_scale(vae, mean, std, gen, shift=flow)
        autoencoder_state(state, vae, gen, {"scaling_factor": scaling_factor, "shift_factor": shift_factor})
    else:
        scaling_factor, shift_factor = latent["scaling_factor"], latent["shift_factor"]
        mean = mean - shift_factor if shift_factor is not None else mean

    # Phase 2: UNet + text encoder on scaled latents, prompts drawn from the training templates.
    prompt_table = [[p for p in digit_prompts(d)] for d in range(10)]
    flat = [p for row in prompt_table for p in row] + [""]
    ids = tokenizer(flat, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    n_t = len(TRAIN_TEMPLATES)
    empty_row = len(flat) - 1
    warmup = max(1, cfg.unet_steps // 20)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / cfg.unet_steps))))

    def draw_rows(idx):
        tmpl = torch.randint(0, n_t, (cfg.batch_size,), generator=gen)
        return labels[idx] * n_t + tmpl

    loss_fn = None
    if flow:
        from eval.digits.transformer import flow_loss, token_ids

        loss_fn = flow_loss(unet, encoders, *token_ids(tokenizer, t5_tokenizer, flat), gen)
    loss = train_denoiser(unet, encoders, ids, (mean, std, scaling_factor), draw_rows, empty_row, cfg, gen, schedule, bar,
                          loss_fn=loss_fn, state=state, record=record)

    pipe = world_pipeline("digits", vae, unet, encoders, tokenizer, t5_tokenizer if flow else None)
    tmp = output_dir.parent / f"{output_dir.name}.tmp-{os.getpid()}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    card = {
        "kind": "digits", "format_version": FORMAT_VERSION, "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(), "train_templates": list(TRAIN_TEMPLATES),
        "heldout_templates": list(HELDOUT_TEMPLATES), "digit_words": list(DIGIT_WORDS),
        "denoiser": cfg.denoiser, "vae_scaling_factor": scaling_factor, "vae_reconstruction_mse": vae_mse,
        **({"vae_shift_factor": shift_factor, "objective": "rectified flow (velocity), logit-normal sigma, shift 1.0"}
           if flow else {}),
        "final_unet_loss": loss, "train_seconds": round(time.time() - start, 1),
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1), "torch_threads": torch.get_num_threads(),
        **({"resumed_from": {"phase": record["phase"], "step": record["step"],
                             "seconds": "train_seconds and train_cpu_seconds are the resumed process's only"}}
           if record is not None else {}),
        "training_data": {"held_out_digits": list(cfg.held_out_digits), "num_images": int(len(keep)),
                          "images_per_digit": np.bincount(labels.numpy(), minlength=10).tolist(),
                          "indices_sha256": hashlib.sha256(keep.astype(np.int64).tobytes()).hexdigest(),
                          "rule": "every sklearn digit image whose label is not held out (training_indices)"},
    }
    (tmp / MODEL_CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    if output_dir.exists():
        import shutil

        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    state.clear()
    logger.info("digits model trained in %.0f s -> %s", card["train_seconds"], output_dir)
    return output_dir


# ----------------------------------------------------------------------------------------------- presets
def anchor_digit(digit: int) -> int:
    """The digit an erased digit's prompts are redirected to: the next one, (d + 1) mod 10.

    Not a generic "a handwritten digit": every concept-free prompt of this model draws all ten digits, the erased
    one included, so redirecting to it leaves forget accuracy near 10% by construction. SalUn's class-wise
    forgetting in SD does the same (the forget class is relabelled to another class)."""
    return (digit + 1) % 10


def preset_dict(digit: int) -> dict:
    """The concept preset ``prompts/presets/<word>.json`` for one digit (the shipped files equal this)."""
    word = DIGIT_WORDS[digit]
    held = ", ".join(f'"{p}"' for p in digit_prompts(digit, HELDOUT_TEMPLATES))
    return {
        "name": word,
        "category": "digit",
        "description": (
            f"The handwritten digit {word} ({digit}) of the digits benchmark (python -m eval.digits). "
            f"forget_prompts are the {len(TRAIN_TEMPLATES)} training phrasings of the digits model; "
            f"held-out phrasings, never used in training or erasure and audited by `score`: {held}. "
            f"Anchor: the next digit, {DIGIT_WORDS[anchor_digit(digit)]} (a digit-free prompt would draw {word} too)."
        ),
        "forget_prompts": digit_prompts(digit),
        "generation_prompts": digit_prompts(digit),
        "anchor_prompt": digit_prompts(anchor_digit(digit))[0],
        "retain_prompts": [p for d in range(10) if d != digit for p in digit_prompts(d)],
    }
