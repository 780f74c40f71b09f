"""diffusers -> Black Forest Labs' Flux layout: the inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
(``diffusers/loaders/single_file_utils.py``).

The transformer goes under ``model.diffusion_model.`` in BFL's names: ``double_blocks.i`` (``img_mod`` / ``txt_mod``,
``img_attn`` / ``txt_attn`` with q, k, v fused into ``qkv`` and the RMS norms as ``norm.query_norm.scale`` /
``key_norm.scale``, ``img_mlp`` / ``txt_mlp``), ``single_blocks.i`` (q, k, v and the MLP input fused into
``linear1``, ``linear2``, ``modulation.lin``), ``img_in`` / ``txt_in`` / ``time_in`` / ``vector_in`` /
``guidance_in`` (dev only) and ``final_layer`` with its adaLN halves in BFL's order. This is ComfyUI's Flux checkpoint
layout: the VAE under ``vae.`` (LDM names), CLIP-L and T5 under ``text_encoders.{clip_l,t5xxl}.transformer.``
(transformers names). ComfyUI's "Load Checkpoint" reads all of it, its "Load Diffusion Model" and Forge the
transformer part. Every key is mapped or refused (:class:`LayoutError`).
"""

from __future__ import annotations

import re

import torch

from erase.export.layouts.ldm import LayoutError, text_keys, vae_to_ldm
from erase.export.layouts.sd3 import fuse, swap_halves, t5

PREFIX = "model.diffusion_model."
VAE_PREFIX = "vae."
TEXT_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer.")

_FIXED = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer", "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
          "time_text_embed.text_embedder.linear_1": "vector_in.in_layer", "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
          "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
          "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer", "context_embedder": "txt_in", "x_embedder": "img_in",
          "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
           "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
           "ff_context.net.2": "txt_mlp.2"}
_DOUBLE_NORM = {"attn.norm_q": "img_attn.norm.query_norm.scale", "attn.norm_k": "img_attn.norm.key_norm.scale",
                "attn.norm_added_q": "txt_attn.norm.query_norm.scale", "attn.norm_added_k": "txt_attn.norm.key_norm.scale"}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORM = {"attn.norm_q": "norm.query_norm.scale", "attn.norm_k": "norm.key_norm.scale"}
_IMG, _TXT, _LINEAR1 = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"), ("to_q", "to_k", "to_v", "proj_mlp")


def transformer_to_flux(state: dict[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL's layout (without ``model.diffusion_model.``)."""
    out, fused = {}, {}
    for key, t in state.items():
        mod, _, param = key.rpartition(".")
        if mod in _FIXED:
            out[f"{_FIXED[mod]}.{param}"] = swap_halves(t) if mod == "norm_out.linear" else t
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.(weight|bias)", key):
            stream = "img_attn.qkv" if m[2] in _IMG else "txt_attn.qkv"
            fused.setdefault((f"double_blocks.{m[1]}.{stream}", _IMG if m[2] in _IMG else _TXT, m[3]), {})[m[2]] = t
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(?:attn\.)?(to_q|to_k|to_v|proj_mlp)\.(weight|bias)", key):
            fused.setdefault((f"single_blocks.{m[1]}.linear1", _LINEAR1, m[3]), {})[m[2]] = t
        elif (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", mod)) and m[2] in _DOUBLE:
            out[f"double_blocks.{m[1]}.{_DOUBLE[m[2]]}.{param}"] = t
        elif (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", mod)) and m[2] in _DOUBLE_NORM and param == "weight":
            out[f"double_blocks.{m[1]}.{_DOUBLE_NORM[m[2]]}"] = t
        elif (m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", mod)) and m[2] in _SINGLE:
            out[f"single_blocks.{m[1]}.{_SINGLE[m[2]]}.{param}"] = t
        elif (m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", mod)) and m[2] in _SINGLE_NORM and param == "weight":
            out[f"single_blocks.{m[1]}.{_SINGLE_NORM[m[2]]}"] = t
        else:
            raise LayoutError(f"transformer tensor {key!r}: no place in Black Forest Labs' Flux layout")
    for (name, order, param), parts in sorted(fused.items()):
        out[f"{name}.{param}"] = fuse(parts, order, f"{name} {param}")
    return out


def pipeline_to_flux(transformer: tuple[dict, dict], vae: tuple[dict, dict], text_states: list[dict]) -> dict[str, torch.Tensor]:
    """The whole Flux pipeline as one flat state dict: (state, config) of the transformer and the VAE, the text
    encoders' state dicts in pipeline order (CLIP-L, T5)."""
    if len(text_states) != 2:
        raise LayoutError(f"Flux has 2 text encoders (CLIP-L, T5), got {len(text_states)}")
    flat = {PREFIX + k: v for k, v in transformer_to_flux(*transformer).items()}
    flat.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(*vae).items()})
    clip = text_keys(text_states[0])
    if "text_projection.weight" in clip:
        raise LayoutError("Flux's CLIP-L is a CLIPTextModel (pooled output, no projection); this one has a text_projection")
    flat.update({TEXT_PREFIXES[0] + k: v for k, v in clip.items()})
    flat.update({TEXT_PREFIXES[1] + k: v for k, v in t5(text_states[1]).items()})
    return flat


def detect(config: dict) -> tuple[str, str] | None:
    """(family, why) for a ``FluxTransformer2DModel`` config, else None: ``flux_dev`` with the guidance embedding,
    ``flux_schnell`` without."""
    if config.get("_class_name") != "FluxTransformer2DModel" and "axes_dims_rope" not in config:
        return None
    if config.get("guidance_embeds"):
        return "flux_dev", "FluxTransformer2DModel with guidance_embeds (FLUX.1-dev)"
    return "flux_schnell", "FluxTransformer2DModel without guidance_embeds (FLUX.1-schnell)"
