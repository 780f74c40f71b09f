"""``sdxl``: SDXL base. Two encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``); the penultimate hidden
states of both, concatenated, condition the cross-attention; the second encoder's pooled (projected) embedding and the
size ``time_ids`` (original size, crop top-left, target size) go in through ``added_cond_kwargs``
(``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids``). With ``force_zeros_for_empty_prompt`` (the base's
setting) the unconditional branch of guidance is zeros, not the encoded empty prompt: so is ours. Detected by the UNet's
``addition_embed_type == "text_time"``."""

from erase.diffusion.families.base import UNET_PRESETS, Family

#: SDXL: ``xattn`` is every ``attn2`` of every transformer block (10 deep in its inner blocks); ``noxattn`` also
#: leaves out ``add_embedding``, the pooled-text + size embedding that plays the time embedding's part.
SDXL_PRESETS: dict[str, str] = {
    **UNET_PRESETS,
    "noxattn": r"(?!.*\.attn2\.|time_embedding\.|add_embedding\.|conv_norm_out\.|conv_out\.).*",
}

FAMILY = Family("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline",
                (("tokenizer", "text_encoder", "CLIPTextModel"), ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection")),
                "penultimate", True, 1024, SDXL_PRESETS, matches=lambda unet: unet.get("addition_embed_type") == "text_time")
