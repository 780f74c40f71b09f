"""``sd3``: Stable Diffusion 3 and 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``; SD3.5's dual-attention
and qk-norm blocks are the same family). Text: CLIP-L and CLIP-G (``CLIPTextModelWithProjection``; penultimate hidden
states concatenated and zero-padded to T5's width, then joined to T5-XXL's tokens) and the two projected pooled
vectors concatenated into ``pooled_projections``; the empty prompt is encoded, not zeroed. Objective: rectified flow
with the logit-normal density shifted by the scheduler's ``shift`` (3.0 in the released configs). Detected by the
transformer config's class."""

from __future__ import annotations

from erase.diffusion.families.base import Conditioner, Family
from erase.diffusion.families.mmdit import MMDIT_PRESETS, MMDIT_TEXT_LAYERS, PRESET_NOTES, PipelineTextStack


class SD3TextStack(PipelineTextStack):
    max_sequence_length = 256  # StableDiffusion3Pipeline.__call__'s default

    def pooled_dim(self) -> int:
        return int(self.encoders[0].config.projection_dim) + int(self.encoders[1].config.projection_dim)

    def token_segments(self) -> list:
        """CLIP's window (L and G joined feature-wise, padded to T5's width), then T5's tokens."""
        return [(self.tokenizers[0], int(self.tokenizers[0].model_max_length)), (self.tokenizers[2], self.sequence_length)]

    def _embed(self, prompts, device):
        hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=device, do_classifier_free_guidance=False,
                                                       max_sequence_length=self.sequence_length)
        return hidden, pooled


class SD3Conditioner(Conditioner):
    """Packed conditioning -> ``encoder_hidden_states`` (CLIP + T5 tokens) and ``pooled_projections``."""

    def __init__(self, family, resolution: int, pooled_dim: int, denoiser=None):
        self.family, self.resolution, self.pooled_dim = family, int(resolution), int(pooled_dim)

    def __call__(self, cond):
        return {"encoder_hidden_states": cond[:, :-1], "pooled_projections": cond[:, -1, : self.pooled_dim]}

    def predict(self, model, zt, t, cond):
        timestep = t.expand(zt.shape[0]) if t.dim() == 0 else t  # the transformer takes one timestep per example
        return model(hidden_states=zt, timestep=timestep, **self(cond), return_dict=False)[0]

    def describe(self) -> dict:
        return {"model_family": self.family.name, "pooled_dim": self.pooled_dim, "text": "CLIP-L + CLIP-G penultimate, T5 tokens"}


def _matches(config: dict) -> bool:
    return config.get("_class_name") == "SD3Transformer2DModel"


FAMILY = Family("sd3", "Stable Diffusion 3 / 3.5", "StableDiffusion3Pipeline",
                (("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
                 ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
                 ("tokenizer_3", "text_encoder_3", "T5EncoderModel")),
                "penultimate", True, 1024, MMDIT_PRESETS, matches=_matches, denoiser="transformer",
                denoiser_class="SD3Transformer2DModel", scheduler_class="FlowMatchEulerDiscreteScheduler", objective="flow",
                text_stack=SD3TextStack, conditioner=SD3Conditioner, default_guidance=7.0, data_scheduler="flow_euler",
                preset_notes=PRESET_NOTES, text_layers=MMDIT_TEXT_LAYERS)
