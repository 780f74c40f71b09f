"""Tiny randomly initialised models for offline tests and benchmarks.

No weights are downloaded: every model is built from a config in code and saved with `save_pretrained`, so
the folders load through the same code paths as real hub models (`StableDiffusionPipeline.from_pretrained`,
`CLIPModel.from_pretrained`). The tokenizer is a CLIP BPE tokenizer over the 256 byte-level characters (each
also with the end-of-word marker) plus one merge chain per known word, so any text tokenizes without a
vocabulary download. The one builder of tokenizers and models for the tests and the digits model.
"""

from __future__ import annotations

import os

import torch

# Words the tiny test tokenizer keeps whole (each one BPE merge chain); anything else falls back to characters.
TINY_WORDS = ("the", "a", "an", "in", "on", "of", "photo")


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP ``bytes_to_unicode``), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_tokenizer(words=TINY_WORDS, max_length: int = 77):
    """A CLIP BPE tokenizer built in memory: the 256 byte symbols (alone and word-final), one merge chain per
    word of ``words`` so each is one token, and the two CLIP specials. Numerals are single characters in CLIP's
    pre-tokenizer, so they need no merges; any other text falls back to characters, so every text tokenizes."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for sym in symbols + [sym + "</w>" for sym in symbols]:
        vocab.setdefault(sym, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            pair = (left, right)
            left = left + right
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_tiny_tokenizer(model_max_length: int = 77):
    """The tests' tokenizer: :func:`build_tokenizer` over ``TINY_WORDS``."""
    return build_tokenizer(TINY_WORDS, model_max_length)


def text_config(tokenizer, hidden_size: int, max_length: int, num_layers: int = 2, num_heads: int = 4, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_act=hidden_act,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_length,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_components(
    tokenizer,
    unet_channels: tuple[int, ...] = (32, 64),
    vae_channels: tuple[int, ...] = (32, 64),
    latent_size: int = 16,
    text_width: int = 32,
    text_layers: int = 2,
    text_heads: int = 4,
    max_length: int = 77,
    norm_num_groups: int | None = None,
    layers_per_block: int = 1,
    vae_mid_attention: bool = True,
    unet_extra: dict | None = None,
    text_act: str = "quick_gelu",
    build_text: bool = True,
):
    """(vae, unet, text_encoder) of an SD v1-layout model with random weights, built in that order.

    The UNet has cross-attention below its top resolution only (``DownBlock2D`` first), two heads per attention
    (diffusers' legacy ``attention_head_dim`` is the number of heads), ``cross_attention_dim = text_width``.
    ``norm_num_groups`` defaults to ``min(32, first channel count)``. ``unet_extra`` overrides UNet config entries
    (the SD 2.x / SDXL differences, see :func:`build_tiny_pipeline`); ``build_text=False`` returns no text encoder.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    nv, nu = len(vae_channels), len(unet_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=tuple(vae_channels), norm_num_groups=norm_num_groups or min(32, vae_channels[0]),
        mid_block_add_attention=vae_mid_attention, sample_size=latent_size * 2 ** (nv - 1),
        down_block_types=("DownEncoderBlock2D",) * nv, up_block_types=("UpDecoderBlock2D",) * nv,
    )
    unet = UNet2DConditionModel(**{
        "sample_size": latent_size, "in_channels": 4, "out_channels": 4, "layers_per_block": layers_per_block,
        "block_out_channels": tuple(unet_channels), "norm_num_groups": norm_num_groups or min(32, unet_channels[0]),
        "cross_attention_dim": text_width, "attention_head_dim": 2,
        "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (nu - 1),
        "up_block_types": ("CrossAttnUpBlock2D",) * (nu - 1) + ("UpBlock2D",),
        **(unet_extra or {}),
    })
    text_encoder = CLIPTextModel(text_config(tokenizer, text_width, max_length, text_layers, text_heads, text_act)) if build_text else None
    return vae, unet, text_encoder


#: The families :func:`build_tiny_pipeline` builds: the UNet families and the transformer (MMDiT) families.
TINY_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "sd35", "flux_dev", "flux_schnell")


def build_tiny_pipeline(
    path: str | os.PathLike,
    sample_size: int = 16,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    cross_attention_dim: int = 32,
    max_length: int = 77,
    seed: int = 0,
    family: str = "sd1",
    sdxl_first_width: int | None = None,
) -> str:
    """Write a pipeline folder of model family ``family`` (one of :data:`TINY_FAMILIES`) with random weights to `path`;
    return it.

    Images are `sample_size * 2 ** (len(block_out_channels) - 1)` pixels square (32 px by default). The folder
    has the layout of a real checkpoint of the family (`unet/` or `transformer/`, `vae/`, `text_encoder*/`,
    `tokenizer*/`, `scheduler/`, `model_index.json`) and no safety checker.

    * ``sd1``: SD v1 layout, PNDM scheduler (epsilon), CLIP text encoder with quick-gelu.
    * ``sd2``: SD v2 (768) layout: v-prediction DDIM scheduler, per-block ``attention_head_dim`` list, linear
      projections in the transformer blocks, text encoder with gelu (OpenCLIP's activation).
    * ``sdxl``: SDXL base layout: ``addition_embed_type="text_time"`` (size ``time_ids`` + pooled text embedding,
      ``projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + pooled width``), a per-block
      transformer depth, two text encoders (``CLIPTextModel`` a quarter and
      ``CLIPTextModelWithProjection`` three quarters of ``cross_attention_dim`` wide, concatenated), two tokenizers, Euler scheduler (epsilon),
      ``force_zeros_for_empty_prompt``. ``sdxl_first_width`` sets the first encoder's width (the fixtures made before the
      two widths differed used half: tests/data/make_legacy_reference.py).
    * ``sd3`` / ``sd35`` / ``flux_dev`` / ``flux_schnell``: the MMDiT families, see :func:`build_tiny_dit` (the VAE
      has ``block_out_channels``, the latent is ``sample_size`` square, the CLIP encoders are ``cross_attention_dim``
      wide; ``layers_per_block`` does not apply).
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    if family not in ("sd1", "sd2", "sdxl"):
        return build_tiny_dit(path, family, sample_size, block_out_channels, cross_attention_dim, max_length)
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = build_tiny_tokenizer(max_length)
    if family == "sdxl":
        return _tiny_sdxl(path, tokenizer, sample_size, block_out_channels, layers_per_block, cross_attention_dim, max_length,
                          sdxl_first_width)
    vae, unet, text_encoder = build_components(
        tokenizer, unet_channels=block_out_channels, vae_channels=block_out_channels, latent_size=sample_size,
        text_width=cross_attention_dim, max_length=max_length, layers_per_block=layers_per_block,
        unet_extra=_sd2_unet(len(block_out_channels)) if family == "sd2" else None,
        text_act="gelu" if family == "sd2" else "quick_gelu",
    )
    if family == "sd2":
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    else:
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


def _sd2_unet(n_blocks: int) -> dict:
    """What SD 2.x's UNet config sets beyond SD v1's: heads per block as a list, linear projections."""
    return {"attention_head_dim": tuple(2 * (i + 1) for i in range(n_blocks)), "use_linear_projection": True}


def _tiny_sdxl(path, tokenizer, sample_size, block_out_channels, layers_per_block, cross_attention_dim, max_length,
               first_width: int | None = None) -> str:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # two widths, as SDXL's CLIP-L (768) and bigG (1280): with equal ones, diffusers' from_single_file takes CLIP-L's
    # weights for text_encoder_2 (it tells the encoders apart by width) and leaves its text_projection unloaded
    time_dim, width_1 = 8, first_width or cross_attention_dim // 4
    width = cross_attention_dim - width_1
    n = len(block_out_channels)
    vae, unet, _ = build_components(
        tokenizer, unet_channels=block_out_channels, vae_channels=block_out_channels, latent_size=sample_size,
        text_width=cross_attention_dim, max_length=max_length, layers_per_block=layers_per_block, build_text=False,
        unet_extra={**_sd2_unet(n), "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
                    "projection_class_embeddings_input_dim": 6 * time_dim + width,
                    "transformer_layers_per_block": tuple(range(1, n + 1))},
    )
    text_encoder = CLIPTextModel(text_config(tokenizer, width_1, max_length))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, width, max_length, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=build_tiny_tokenizer(max_length), unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
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
        text_config=text_config(tokenizer, hidden_size, 77).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=hidden_size,
    )
    CLIPModel(config).save_pretrained(str(path))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------ MMDiT families
def build_t5_tokenizer(words=TINY_WORDS, max_length: int = 77):
    """A T5 tokenizer built in memory: a ``tokenizers`` Unigram model over T5's three specials (``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, as its sentencepiece vocabulary numbers them), one piece per word of ``words`` and every printable
    ASCII character, alone and word-initial (``▁``), with T5's Metaspace pre-tokenizer and ``</s>`` appended; wrapped
    as ``T5TokenizerFast``. Any text tokenizes (other characters map to ``<unk>``)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for word in words:
        pieces.setdefault("▁" + word, -1.0)
    for ch in sorted(set(string.printable) - set(string.whitespace)):
        pieces.setdefault(ch, -5.0)
        pieces.setdefault("▁" + ch, -5.5)
    model = Tokenizer(models.Unigram(list(pieces.items()), unk_id=2, byte_fallback=False))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, extra_ids=0, model_max_length=max_length)


def t5_encoder(tokenizer, d_model: int, num_layers: int = 2, num_heads: int = 4):
    """A T5 v1.1 encoder (gated-gelu feed-forward, untied, relative position buckets), as T5-XXL is, ``d_model`` wide."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model,
                                   num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   decoder_start_token_id=tokenizer.pad_token_id))


def flow_vae(channels: tuple[int, ...], latent_size: int, scaling_factor: float, shift_factor: float):
    """The 16-channel VAE of SD3 and Flux: no quant convolutions, a scaling and a shift factor."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, block_out_channels=tuple(channels),
                         norm_num_groups=min(32, channels[0]), sample_size=latent_size * 2 ** (n - 1),
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor)


def build_tiny_dit(path, family: str, sample_size: int = 16, vae_channels: tuple[int, ...] = (32, 64), clip_width: int = 32,
                   max_length: int = 77) -> str:
    """Write a tiny MMDiT pipeline folder (``transformer/``, ``vae/``, text encoders, tokenizers, ``scheduler/``) with
    random weights (seed before calling) and return it. Every component has the real family's type and structure, at
    widths of tens:

    * ``sd3`` (SD3-medium's structure): ``SD3Transformer2DModel`` with 2 joint blocks of 2 heads x 64 (the hidden width
      is 64 x depth, as in every released SD3 / SD3.5, which ComfyUI relies on), the last block context-pre-only;
      text: CLIP-L (``clip_width``) and CLIP-G (twice as wide; distinct widths are how single-file loaders tell them
      apart), each ``CLIPTextModelWithProjection`` (CLIP-L's projection is the identity, as in Stability's release),
      the pooled projections concatenated (``pooled_projection_dim``), the hidden states concatenated and padded to
      the T5 v1.1 width (four times ``clip_width``) and joined to its tokens; flow-matching Euler scheduler with shift 3; 16-channel VAE with shift factor.
    * ``sd35`` (SD3.5-medium's structure): the same with RMS qk-norm in every block and a dual-attention first block.
    * ``flux_dev`` / ``flux_schnell``: ``FluxTransformer2DModel`` with 1 double-stream and 2 single-stream blocks of
      2 heads x 16 (RoPE axes 4 + 6 + 6), packed 2x2 latents (64 input channels), CLIP-L pooled (``CLIPTextModel``)
      and T5 tokens; dev has the guidance embedding and a dynamically shifted scheduler, schnell neither (shift 1).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer(max_length)
    t5_tok = build_t5_tokenizer(max_length=max_length)
    if family in ("sd3", "sd35"):
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        clip_l = CLIPTextModelWithProjection(text_config(tokenizer, clip_width, max_length))
        with torch.no_grad():  # Stability's SD3 takes CLIP-L's pooled output unprojected
            clip_l.text_projection.weight.copy_(torch.eye(clip_width))
        clip_g = CLIPTextModelWithProjection(text_config(tokenizer, 2 * clip_width, max_length, hidden_act="gelu"))
        t5 = t5_encoder(t5_tok, 4 * clip_width)
        extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if family == "sd35" else {}
        transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                            attention_head_dim=64, num_attention_heads=2, joint_attention_dim=4 * clip_width,
                                            caption_projection_dim=128, pooled_projection_dim=3 * clip_width,
                                            pos_embed_max_size=sample_size, **extra)
        vae = flow_vae(vae_channels, sample_size, 1.5305, 0.0609)
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g,
                                        tokenizer_2=build_tiny_tokenizer(max_length), text_encoder_3=t5, tokenizer_3=t5_tok)
    elif family in ("flux_dev", "flux_schnell"):
        from diffusers import FluxPipeline, FluxTransformer2DModel

        dev = family == "flux_dev"
        clip = CLIPTextModel(text_config(tokenizer, clip_width, max_length))
        t5 = t5_encoder(t5_tok, 2 * clip_width)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                             num_attention_heads=2, joint_attention_dim=2 * clip_width, pooled_projection_dim=clip_width,
                                             guidance_embeds=dev, axes_dims_rope=(4, 6, 6))
        scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                     base_image_seq_len=256, max_image_seq_len=4096) if dev else
                     FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False))
        vae = flow_vae(vae_channels, sample_size, 0.3611, 0.1159)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                            tokenizer_2=t5_tok, transformer=transformer)
    else:
        raise ValueError(f"unknown MMDiT family {family!r}; choose sd3, sd35, flux_dev or flux_schnell")
    pipe.save_pretrained(str(path))
    return str(path)
