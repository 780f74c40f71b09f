"""``flux``: FLUX.1 dev and schnell (``FluxPipeline``, ``FluxTransformer2DModel``). Text: CLIP-L's pooled output
(``pooled_projections``) and T5-XXL's tokens (``encoder_hidden_states``, text position ids zero). Latents are packed
into 2x2 patches (64 channels a token) with image position ids; dev has a guidance embedding (the distilled guidance,
3.5 as its pipeline's default), schnell none. Objective: rectified flow with the logit-normal density shifted by the
resolution-dependent ``mu`` (dev's scheduler: dynamic shifting) or the scheduler's ``shift`` (schnell: 1). Detected by
the transformer config's class."""

from __future__ import annotations

import torch

from erase.diffusion.families.base import Conditioner, Family
from erase.diffusion.families.mmdit import MMDIT_PRESETS, MMDIT_TEXT_LAYERS, PRESET_NOTES, PipelineTextStack

GUIDANCE = 3.5  # FluxPipeline.__call__'s default guidance_scale: the distilled guidance dev is queried at


class FluxTextStack(PipelineTextStack):
    max_sequence_length = 512  # FluxPipeline.__call__'s default

    def pooled_dim(self) -> int:
        return int(self.encoders[0].config.hidden_size)

    def token_segments(self) -> list:
        """T5's tokens alone (CLIP gives only the pooled vector)."""
        return [(self.tokenizers[1], self.sequence_length)]

    def _embed(self, prompts, device):
        hidden, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=device, max_sequence_length=self.sequence_length)
        return hidden, pooled


class FluxConditioner(Conditioner):
    """Packed conditioning -> the transformer's inputs; latents packed into 2x2 patches and back (as FluxPipeline's
    ``_pack_latents`` / ``_unpack_latents``), image / text position ids, the guidance embedding for dev."""

    def __init__(self, family, resolution: int, pooled_dim: int, denoiser=None):
        self.family, self.resolution, self.pooled_dim = family, int(resolution), int(pooled_dim)
        embeds = bool(getattr(getattr(denoiser, "config", None), "guidance_embeds", False))
        self.guidance = GUIDANCE if embeds else None

    def __call__(self, cond):
        return {"encoder_hidden_states": cond[:, :-1], "pooled_projections": cond[:, -1, : self.pooled_dim]}

    def predict(self, model, zt, t, cond):
        from diffusers import FluxPipeline

        b, c, h, w = zt.shape
        packed = zt.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, zt.device, zt.dtype)
        kw = self(cond)
        txt_ids = torch.zeros(kw["encoder_hidden_states"].shape[1], 3, device=zt.device, dtype=zt.dtype)
        guidance = torch.full((b,), self.guidance, device=zt.device, dtype=torch.float32) if self.guidance is not None else None
        timestep = (t.float() / 1000).to(zt.dtype).expand(b)  # the pipeline's scale: sigma in [0, 1], one per example
        out = model(hidden_states=packed, timestep=timestep, guidance=guidance, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
                    **kw)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def describe(self) -> dict:
        return {"model_family": self.family.name, "pooled_dim": self.pooled_dim, "guidance": self.guidance,
                "text": "CLIP-L pooled, T5 tokens", "latents": "2x2 packed"}


def _matches(config: dict) -> bool:
    return config.get("_class_name") == "FluxTransformer2DModel"


FAMILY = Family("flux", "FLUX.1 (dev, schnell)", "FluxPipeline",
                (("tokenizer", "text_encoder", "CLIPTextModel"), ("tokenizer_2", "text_encoder_2", "T5EncoderModel")),
                "last", True, 1024, MMDIT_PRESETS, matches=_matches, denoiser="transformer",
                denoiser_class="FluxTransformer2DModel", scheduler_class="FlowMatchEulerDiscreteScheduler", objective="flow",
                text_stack=FluxTextStack, conditioner=FluxConditioner, default_guidance=GUIDANCE, data_scheduler="flow_euler",
                latent_patch=2, preset_notes=PRESET_NOTES, text_layers=MMDIT_TEXT_LAYERS)
