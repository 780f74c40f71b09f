"""The shapes text-to-image model: its settings, its cache folder, its parts. Training is in :mod:`eval.shapes.train`.

Same parts as SD v1.4 (AutoencoderKL, UNet2DConditionModel with self- and cross-attention, CLIPTextModel over CLIP's
full 49,408-token vocabulary with SD's own tokenizer, a DDIM scheduler with SD's beta schedule), saved with
``StableDiffusionPipeline.save_pretrained`` so every tool that loads SD v1.4 loads it, small enough to train on
one CPU core in about 45 minutes (3,000 UNet steps; 1,200 fit 20 minutes but drew the right shape 23-29 % of the
time). 32-px images and a 2x autoencoder (16x16x4 latents): a texture's 2-px stripe is one latent pixel, and a 2x
autoencoder learns the world's colours and textures in a few hundred steps where a 4x one did not (test MSE 0.031
after 250 steps against 0.056; benchmarks/RESULTS.md, "Shapes world"). The UNet has three levels (16, 8, 4) with
self- and cross-attention below the top one, as SD has none at its coarsest: the 8x8 cross-attention is where an
object's place and colour are decided.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eval.digits.model import DENOISERS, cache_root  # one cache for every world: $ERASE_CACHE or ~/.cache/scissorhands
from eval.shapes import world
from eval.shapes.render import RENDER_VERSION
from eval.shapes.tokenizer import vocab_sha256

FORMAT_VERSION = 1  # bump when training code or the world changes what a given config produces
MODEL_CARD = "shapes_model.json"
KIND = "shapes"


@dataclass
class ShapesModelConfig:
    resolution: int = field(default=32, metadata={"help": "image side in pixels"})
    seed: int = field(default=0, metadata={"help": "seed of the training scenes, initialisation and batches"})
    num_scenes: int = field(default=30000, metadata={"help": "rendered training scenes (scene i from seed and i)"})
    vae_steps: int = field(default=1000, metadata={"help": "autoencoder training steps"})
    vae_batch_size: int = field(default=32, metadata={"help": "autoencoder batch size"})
    vae_lr: float = field(default=3e-3, metadata={"help": "autoencoder learning rate (cosine decay)"})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "weight of the KL term of the autoencoder"})
    unet_steps: int = field(default=3000, metadata={"help": "UNet + text encoder training steps"})
    lr: float = field(default=1e-3, metadata={"help": "UNet + text encoder peak learning rate (cosine decay)"})
    batch_size: int = field(default=64, metadata={"help": "UNet + text encoder batch size"})
    cond_dropout: float = field(default=0.1, metadata={"help": "share of prompts replaced by '' (for CFG)"})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the saved UNet / text encoder"})
    unet_channels: tuple = field(default=(32, 64, 128), metadata={"help": "UNet block widths (attention below the first)"})
    vae_channels: tuple = field(default=(16, 32), metadata={"help": "autoencoder block widths (n blocks: 2^(n-1)x)"})
    text_width: int = field(default=128, metadata={"help": "CLIP text encoder hidden size = cross-attention dim"})
    text_layers: int = field(default=2, metadata={"help": "CLIP text encoder layers"})
    max_length: int = field(default=24, metadata={"help": "tokenizer model_max_length (longest caption: 20 tokens)"})
    held_out: tuple = field(default=(), metadata={
        "help": "concepts whose scenes are left out of training (the benchmark's retrain reference); none by default"})
    denoiser: str = field(default="unet", metadata={
        "help": "unet: SD v1.4's kind (noise prediction); sd3: an SD3-kind MMDiT transformer with CLIP-L, CLIP-G and T5 and "
                "the 16-channel VAE, trained with rectified flow (eval/digits/transformer.py, the digits model's)"})
    dit_layers: int = field(default=3, metadata={"help": "sd3 denoiser only: joint blocks (as many heads of 64)"})

    def __post_init__(self):
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        self.vae_channels = tuple(int(c) for c in self.vae_channels)
        self.held_out = tuple(sorted(str(c) for c in self.held_out))
        if self.held_out:
            world.parse_concepts(",".join(self.held_out), "held_out")  # ValueError naming the bad one
        if self.resolution % 8 or self.resolution < 16:
            raise ValueError(f"resolution must be a multiple of 8 and >= 16, got {self.resolution}")
        if self.resolution % 2 ** (len(self.vae_channels) - 1):
            raise ValueError(f"resolution {self.resolution} is not divisible by the autoencoder's downsampling")
        if min(self.vae_steps, self.unet_steps, self.batch_size, self.vae_batch_size, self.num_scenes) < 1:
            raise ValueError("step counts, batch sizes and num_scenes must be positive")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.text_width % 4:
            raise ValueError(f"text_width must be a multiple of 4 (attention heads), got {self.text_width}")
        if self.denoiser not in DENOISERS:
            raise ValueError(f"denoiser {self.denoiser!r} is not one of {', '.join(DENOISERS)}")
        if not 1 <= int(self.dit_layers) <= 24:
            raise ValueError(f"dit_layers must lie in 1..24, got {self.dit_layers}")

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet_channels"], d["vae_channels"], d["held_out"] = list(self.unet_channels), list(self.vae_channels), list(self.held_out)
        if self.denoiser == "unet":  # a UNet model keeps the fingerprint (and cache folder) it had before these fields
            d.pop("denoiser"), d.pop("dit_layers")
        return d

    def fingerprint(self) -> str:
        """Hash of everything that decides the trained weights (settings, the world, the vocabulary, the version)."""
        blob = json.dumps({"config": self.to_dict(), "world": world_signature(), "vocab": vocab_sha256(),
                           "version": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def world_signature() -> dict:
    """What the world is made of (values, phrasings): part of every model's and judge's fingerprint."""
    return {"shapes": world.SHAPES, "colours": world.COLOURS, "textures": world.TEXTURES,
            "backgrounds": world.BACKGROUNDS, "train_templates": world.TRAIN_TEMPLATES,
            "heldout_templates": world.HELDOUT_TEMPLATES, "relations": world.RELATION_WORDS, "render": RENDER_VERSION}


def default_model_dir(cfg: ShapesModelConfig | None = None) -> Path:
    cfg = cfg or ShapesModelConfig()
    return cache_root() / "shapes" / f"model-{cfg.fingerprint()}"


def read_model_card(model_dir: str | Path) -> dict | None:
    """The ``shapes_model.json`` of a shapes pipeline folder, or None if the folder is not one."""
    path = Path(model_dir) / MODEL_CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return card if isinstance(card, dict) and card.get("kind") == KIND else None


def is_trained(model_dir: str | Path, cfg: ShapesModelConfig) -> bool:
    card = read_model_card(model_dir)
    return bool(card) and card.get("fingerprint") == cfg.fingerprint() and (Path(model_dir) / "model_index.json").is_file()


def build_flow_models(cfg: ShapesModelConfig, tokenizer):
    """(vae, transformer, [clip_l, clip_g, t5], t5 tokenizer) of the ``sd3`` denoiser: the digits model's MMDiT parts
    (:func:`eval.digits.transformer.build_mmdit_models`) over SD's CLIP vocabulary and a T5 tokenizer of the world's
    words, the posterior's log-variance started at -6 as the UNet model's."""
    import torch

    from eval.digits.transformer import build_mmdit_models
    from eval.tiny import build_t5_tokenizer

    t5_tokenizer = build_t5_tokenizer(world.vocabulary_words(), cfg.max_length)
    vae, transformer, encoders = build_mmdit_models(cfg, tokenizer, t5_tokenizer)
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels:].fill_(-6.0)
    return vae, transformer, encoders, t5_tokenizer


def build_models(cfg: ShapesModelConfig, tokenizer):
    """(vae, unet, text_encoder) with random weights (:func:`eval.tiny.build_components`: self- and cross-attention
    in every UNet block but the first), four attention heads, the posterior's log-variance started at -6 so early
    reconstructions are not drowned in sampling noise."""
    import torch

    from eval.tiny import build_components

    vae, unet, text = build_components(
        tokenizer, unet_channels=cfg.unet_channels, vae_channels=cfg.vae_channels, latent_size=cfg.latent_size,
        text_width=cfg.text_width, text_layers=cfg.text_layers, text_heads=4, max_length=cfg.max_length,
        norm_num_groups=min(32, math.gcd(*cfg.unet_channels, *cfg.vae_channels)),
        vae_mid_attention=False, unet_extra={"attention_head_dim": 4},
    )
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:].fill_(-6.0)
    return vae, unet, text
