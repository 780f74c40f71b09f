"""``sd2``: Stable Diffusion v2.x. One OpenCLIP-ViT-H text encoder converted to ``CLIPTextModel`` (its config already
stops at the penultimate OpenCLIP layer); its last hidden state, as ``StableDiffusionPipeline`` encodes them. UNet with
linear projections and 1024-wide cross-attention: that is how it is detected. Epsilon (2.x base) or v-prediction (2.x
768) comes from each model's scheduler config, not from the family."""

from erase.diffusion.families.base import UNET_PRESETS, Family


def _matches(unet: dict) -> bool:
    return unet.get("cross_attention_dim") == 1024 or bool(unet.get("use_linear_projection"))


FAMILY = Family("sd2", "Stable Diffusion 2.x", "StableDiffusionPipeline", (("tokenizer", "text_encoder", "CLIPTextModel"),),
                "last", False, 768, UNET_PRESETS, matches=_matches)
