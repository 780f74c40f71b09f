"""Tiny randomly initialised models for offline tests and benchmarks.

No weights are downloaded: every model is built from a config in code and saved with `save_pretrained`, so
the folders load through the same code paths as real hub models (`StableDiffusionPipeline.from_pretrained`,
`CLIPModel.from_pretrained`). The tokenizer is a CLIP BPE tokenizer over the 256 byte-level characters (each
also with the end-of-word marker) plus a few merges, so any text tokenizes without a vocabulary download.
"""

from __future__ import annotations

import os

import torch

_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>"), ("e", "r")]


def _byte_chars() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE maps bytes to (same table as `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tiny_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer built in memory: byte characters, their end-of-word forms, a few merges, 2 specials."""
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>"]
    chars = _byte_chars()
    tokens += chars + [c + "</w>" for c in chars]
    tokens += ["".join(pair) for pair in _MERGES]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES), model_max_length=model_max_length)


def _text_config(tokenizer, hidden_size: int, max_length: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_pipeline(
    path: str | os.PathLike,
    sample_size: int = 16,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    cross_attention_dim: int = 32,
    max_length: int = 77,
    seed: int = 0,
) -> str:
    """Write a StableDiffusionPipeline folder with random weights to `path` and return it.

    Images are `sample_size * 2 ** (len(block_out_channels) - 1)` pixels square (32 px by default). The
    folder has the layout of a real SD v1 checkpoint (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
    `scheduler/`, `model_index.json`) and no safety checker.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=min(32, block_out_channels[0]),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(32, block_out_channels[0]),
        sample_size=sample_size * 2 ** (n - 1),
    )
    tokenizer = build_tiny_tokenizer(max_length)
    text_encoder = CLIPTextModel(_text_config(tokenizer, cross_attention_dim, max_length))
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path))
    return str(path)


def build_tiny_clip(path: str | os.PathLike, image_size: int = 32, hidden_size: int = 32, seed: int = 0) -> str:
    """Write a CLIPModel + CLIPProcessor folder with random weights to `path` and return it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    config = CLIPConfig(
        text_config=_text_config(tokenizer, hidden_size, 77).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=hidden_size,
    )
    CLIPModel(config).save_pretrained(str(path))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(path))
    return str(path)
