"""diffusers -> Stability's SD3 / SD3.5 single-file layout: the inverse of diffusers'
``convert_sd3_transformer_checkpoint_to_diffusers`` (``diffusers/loaders/single_file_utils.py``).

The MMDiT goes under ``model.diffusion_model.`` as ``joint_blocks.i.{x_block,context_block}`` with q, k, v fused into
``attn.qkv`` (SD3.5's dual-attention ``x_block.attn2.qkv`` too), RMS qk-norm as ``attn.ln_q`` / ``ln_k``, the
embedders as ``x_embedder`` / ``t_embedder`` / ``y_embedder`` / ``context_embedder``, and the adaLN of the final
layer and of the last (context-pre-only) block with its shift and scale halves in Stability's order (diffusers swaps
them on load). Text encoders go under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` in their transformers
names, as Stability's ``sd3_medium_incl_clips_t5xxl*`` files have them (CLIP-L without a projection: Stability's SD3
takes its pooled output unprojected, so a CLIP-L projection that is not the identity has no place); the VAE under
``first_stage_model.`` in the LDM layout. Every key is mapped or refused (:class:`LayoutError`).
"""

from __future__ import annotations

import re

import torch

from erase.export.layouts.ldm import LayoutError, text_keys, vae_to_ldm

PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.", "text_encoders.t5xxl.transformer.")

_FIXED = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
          "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
          "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0", "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
          "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_BLOCK = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k", "attn.norm_added_q": "context_block.attn.ln_q",
          "attn.norm_added_k": "context_block.attn.ln_k", "attn.to_out.0": "x_block.attn.proj",
          "attn.to_add_out": "context_block.attn.proj", "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
          "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
          "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
          "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
#: (diffusers attention, projection names q/k/v) -> the fused original ``qkv``
_QKV = {("attn", ("to_q", "to_k", "to_v")): "x_block.attn.qkv", ("attn", ("add_q_proj", "add_k_proj", "add_v_proj")): "context_block.attn.qkv",
        ("attn2", ("to_q", "to_k", "to_v")): "x_block.attn2.qkv"}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along dim 0: diffusers' ``swap_scale_shift`` is its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def fuse(parts: dict[str, torch.Tensor], order: tuple[str, ...], what: str) -> torch.Tensor:
    """The original layout's fused projection: ``parts`` concatenated along dim 0 in ``order``; every part needed."""
    missing = [p for p in order if p not in parts]
    if missing:
        raise LayoutError(f"{what}: {', '.join(missing)} missing; the fused projection needs {', '.join(order)}")
    return torch.cat([parts[p] for p in order], dim=0)


def transformer_to_sd3(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict in Stability's MMDiT layout (without ``model.diffusion_model.``)."""
    last = int(config["num_layers"]) - 1
    out, qkv = {}, {}
    for key, t in state.items():
        mod, _, param = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = t
        elif mod in _FIXED:
            out[f"{_FIXED[mod]}.{param}"] = swap_halves(t) if mod == "norm_out.linear" else t
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(attn2?)\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.(weight|bias)", key):
            order = next(o for (a, o) in _QKV if a == m[2] and m[3] in o)
            qkv.setdefault((int(m[1]), m[2], order, m[4]), {})[m[3]] = t
        elif (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", mod)) and m[2] in _BLOCK:
            i = int(m[1])
            swap = m[2] == "norm1_context.linear" and i == last  # the context-pre-only block's adaLN has 2 chunks
            out[f"joint_blocks.{i}.{_BLOCK[m[2]]}.{param}"] = swap_halves(t) if swap else t
        else:
            raise LayoutError(f"transformer tensor {key!r}: no place in Stability's SD3 layout")
    for (i, attn, order, param), parts in sorted(qkv.items()):
        out[f"joint_blocks.{i}.{_QKV[(attn, order)]}.{param}"] = fuse(parts, order, f"block {i} {attn} {param}")
    return out


def clip_l(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L in transformers names, its projection dropped when it is the identity (else refused)."""
    keys = text_keys(state)
    proj = keys.pop("text_projection.weight", None)
    if proj is not None and not (proj.shape[0] == proj.shape[1] and (proj.is_meta or torch.equal(proj, torch.eye(proj.shape[0], dtype=proj.dtype)))):
        raise LayoutError("CLIP-L's text_projection is not the identity; Stability's SD3 layout takes its pooled output unprojected")
    return keys


def clip_g(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-G (OpenCLIP bigG as ``CLIPTextModelWithProjection``) in transformers names, projection included."""
    keys = text_keys(state)
    if "text_projection.weight" not in keys:
        raise LayoutError("CLIP-G has no text_projection; SD3's second encoder is CLIPTextModelWithProjection")
    return keys


def t5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """T5 encoder in transformers names. ``encoder.embed_tokens`` (tied to ``shared``) is written as well: diffusers'
    single-file T5 loader fills parameters by name and leaves an absent one empty (ComfyUI ignores the extra key)."""
    out = dict(state)
    if "shared.weight" in out:
        out.setdefault("encoder.embed_tokens.weight", out["shared.weight"])
    return out


def pipeline_to_sd3(transformer: tuple[dict, dict], vae: tuple[dict, dict], text_states: list[dict]) -> dict[str, torch.Tensor]:
    """The whole SD3 / SD3.5 pipeline as one flat state dict: (state, config) of the transformer and the VAE, the
    three text encoders' state dicts in pipeline order (CLIP-L, CLIP-G, T5)."""
    if len(text_states) != 3:
        raise LayoutError(f"SD3 has 3 text encoders (CLIP-L, CLIP-G, T5), got {len(text_states)}")
    flat = {PREFIX + k: v for k, v in transformer_to_sd3(*transformer).items()}
    flat.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(*vae).items()})
    for prefix, convert, state in zip(TEXT_PREFIXES, (clip_l, clip_g, t5), text_states):
        flat.update({prefix + k: v for k, v in convert(state).items()})
    return flat


def detect(config: dict) -> tuple[str, str] | None:
    """(family, why) for an ``SD3Transformer2DModel`` config, else None: ``sd35`` with qk-norm (SD3.5 large and medium),
    ``sd3`` without (SD3 medium)."""
    if config.get("_class_name") != "SD3Transformer2DModel" and "caption_projection_dim" not in config:
        return None
    dual = list(config.get("dual_attention_layers") or ())
    if config.get("qk_norm"):
        return "sd35", f"SD3Transformer2DModel with qk_norm {config['qk_norm']!r}" + (f" and dual attention in blocks {dual}" if dual else "")
    return "sd3", "SD3Transformer2DModel without qk-norm"
