"""``sd1``: Stable Diffusion v1.x. One CLIP text encoder, its last hidden state (after the final layer norm), as
``StableDiffusionPipeline`` encodes prompts. Detected as the UNet that is neither SDXL's nor SD 2.x's."""

from erase.diffusion.families.base import UNET_PRESETS, Family

FAMILY = Family("sd1", "Stable Diffusion 1.x", "StableDiffusionPipeline", (("tokenizer", "text_encoder", "CLIPTextModel"),),
                "last", False, 512, UNET_PRESETS, matches=lambda unet: True)
