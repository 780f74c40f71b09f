"""The digits model's transformer denoiser (``python -m eval.digits train --denoiser sd3``): an SD3-kind MMDiT trained
with rectified flow, saved as a ``StableDiffusion3Pipeline`` folder, so every SD3 code path of the toolkit (erase/sd.py,
the exports, the audits and attacks) runs on a model that draws real digits.

Parts, as SD3 has them, at widths of tens: ``SD3Transformer2DModel`` (``dit_layers`` joint blocks of as many heads of
64, the hidden width 64 x depth as in every released SD3; 2x2 patches; the last block context-pre-only), CLIP-L and
CLIP-G (``CLIPTextModelWithProjection``, ``text_width`` and twice that wide; CLIP-L's projection the identity), a T5 v1.1
encoder four times ``text_width`` wide, and the 16-channel VAE with a shift factor. The prompt enters as SD3's two text
paths: the token stream (CLIP-L and CLIP-G penultimate states joined feature-wise, zero-padded to T5's width, then T5's
tokens) and the pooled vector (both CLIP projections joined) in the adaLN embedding.

Training (Esser et al., 2024): ``x_t = (1 - σ) x_0 + σ ε``, the transformer predicts the velocity ``ε - x_0``, σ drawn
logit-normal(0, 1) and shifted by the scheduler's ``shift``. SD3 chooses its shift by resolution (3.0 at 1024 px, §5.3.2
of the paper: more noise for more pixels); the digits are 16 px, so the shift is 1.0. The text encoders train with the
transformer from scratch, 10 % of prompts dropped to ``""`` (encoded, not zeroed, as SD3's empty prompt) for CFG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: SD3's velocity-prediction sampler at the digits resolution (see the module docstring for the shift)
FLOW_SHIFT = 1.0
HEAD_DIM = 64  # SD3's attention head width: the hidden width is 64 x depth in every released SD3 / SD3.5


def build_mmdit_models(cfg, clip_tokenizer, t5_tokenizer):
    """(vae, transformer, [clip_l, clip_g, t5]) with random weights, in that order (seed before calling)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from eval.tiny import flow_vae, t5_encoder, text_config

    width = cfg.text_width
    latent = cfg.resolution // 2 ** (len(cfg.vae_channels) - 1)
    vae = flow_vae(cfg.vae_channels, latent, 1.0, 0.0)  # scaling and shift set from the trained latents
    clip_l = CLIPTextModelWithProjection(text_config(clip_tokenizer, width, cfg.max_length, cfg.text_layers, 2))
    with torch.no_grad():  # Stability's SD3 takes CLIP-L's pooled output unprojected
        clip_l.text_projection.weight.copy_(torch.eye(width))
    clip_g = CLIPTextModelWithProjection(text_config(clip_tokenizer, 2 * width, cfg.max_length, cfg.text_layers, 2, "gelu"))
    t5 = t5_encoder(t5_tokenizer, 4 * width, num_layers=cfg.text_layers, num_heads=4)
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=cfg.dit_layers,
        attention_head_dim=HEAD_DIM, num_attention_heads=cfg.dit_layers, joint_attention_dim=4 * width,
        caption_projection_dim=HEAD_DIM * cfg.dit_layers, pooled_projection_dim=3 * width, pos_embed_max_size=latent)
    return vae, transformer, [clip_l, clip_g, t5]


def token_ids(clip_tokenizer, t5_tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP ids (both CLIP encoders share the tokenizer) and T5 ids, each padded to its ``model_max_length``."""
    kw = dict(padding="max_length", truncation=True, return_tensors="pt")
    clip = clip_tokenizer(prompts, max_length=clip_tokenizer.model_max_length, **kw).input_ids
    t5 = t5_tokenizer(prompts, max_length=t5_tokenizer.model_max_length, **kw).input_ids
    return clip, t5


def sd3_condition(encoders, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token stream, pooled vector) as ``StableDiffusion3Pipeline.encode_prompt`` builds them, with gradients:
    CLIP-L and CLIP-G penultimate hidden states joined feature-wise, zero-padded to T5's width, then T5's tokens; the
    two projected pooled outputs joined."""
    clip_l, clip_g, t5 = encoders
    out_l = clip_l(clip_ids, output_hidden_states=True)
    out_g = clip_g(clip_ids, output_hidden_states=True)
    clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    t5_hidden = t5(t5_ids)[0]
    clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5_hidden], dim=-2), torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)


def flow_loss(transformer, encoders, clip_ids, t5_ids, gen: torch.Generator, shift: float = FLOW_SHIFT):
    """``loss(z, rows)`` of :func:`eval.digits.training.train_denoiser`: the rectified-flow velocity loss of one batch of
    scaled latents ``z`` under the prompt rows ``rows``; noise, then σ, drawn from ``gen`` in that order. σ is shifted
    as the erasure's objective shifts it (``erase.diffusion.objectives.FlowObjective.shifted``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from erase.diffusion.objectives import FlowObjective

    objective = FlowObjective(FlowMatchEulerDiscreteScheduler(shift=shift), ())

    def loss(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        hidden, pooled = sd3_condition(encoders, clip_ids[rows], t5_ids[rows])
        noise = torch.randn(z.shape, generator=gen)
        sigma = objective.shifted(torch.sigmoid(torch.randn(z.shape[0], generator=gen)))  # logit-normal, shifted
        s = sigma.view(-1, 1, 1, 1)
        pred = transformer(hidden_states=(1 - s) * z + s * noise, timestep=sigma * 1000, encoder_hidden_states=hidden,
                           pooled_projections=pooled, return_dict=False)[0]
        return F.mse_loss(pred, noise - z)

    return loss


def flow_pipeline(vae, transformer, encoders, clip_tokenizer, t5_tokenizer):
    """The trained parts as a ``StableDiffusion3Pipeline`` with SD3's flow-matching Euler sampler (shift 1.0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    clip_l, clip_g, t5 = encoders
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT), vae=vae,
                                    text_encoder=clip_l, tokenizer=clip_tokenizer, text_encoder_2=clip_g,
                                    tokenizer_2=clip_tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)
