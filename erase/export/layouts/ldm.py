"""diffusers -> original LDM / SGM key layout: the inverse of diffusers' single-file converters.

One function per part, each the inverse of its diffusers counterpart in ``diffusers/loaders/single_file_utils.py``:
:func:`unet_to_ldm` of ``convert_ldm_unet_checkpoint``, :func:`vae_to_ldm` of ``convert_ldm_vae_checkpoint``,
:func:`clip_to_ldm` of ``convert_ldm_clip_checkpoint`` and :func:`open_clip_to_ldm` of
``convert_open_clip_checkpoint`` (q, k, v fused into ``in_proj``). :data:`FAMILIES` says, per model family, which
prefix and text-encoder layout each part gets; :func:`detect_family` picks the family from the component configs
(as diffusers does from ``model_index.json``). Every converter maps every key it is given or raises: a UNet with
parts this layout has no place for (a class embedding, an image projection) is refused, never half written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


class LayoutError(ValueError):
    """A model whose keys have no place in the original layout."""


@dataclass(frozen=True)
class Family:
    """Where each part of a pipeline goes in the family's single file. ``text`` is one (prefix, layout) per text
    encoder, in pipeline order; layout ``clip`` (OpenAI CLIP, HF names) or ``open_clip`` (fused in_proj)."""
    name: str
    unet: str
    vae: str
    text: tuple[tuple[str, str], ...]


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "model.diffusion_model.", "first_stage_model.", (("cond_stage_model.transformer.", "clip"),)),
    "sd2": Family("sd2", "model.diffusion_model.", "first_stage_model.", (("cond_stage_model.model.", "open_clip"),)),
    "sdxl": Family("sdxl", "model.diffusion_model.", "first_stage_model.",
                   (("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "open_clip"))),
}


def detect_family(unet_config: dict, text_configs: list[dict]) -> tuple[str, str]:
    """(family, why) from the UNet config and the text encoders' configs, in pipeline order.

    SDXL: ``addition_embed_type == "text_time"`` with two text encoders. SD 2.x: an OpenCLIP text encoder (its
    ``hidden_act`` is ``gelu``, OpenAI CLIP's ``quick_gelu``; hidden size 1024 in the released models). Else SD 1.x.
    """
    get = unet_config.get
    if get("addition_embed_type") == "text_time":
        if len(text_configs) != 2:
            raise LayoutError(f"a text_time UNet (SDXL) with {len(text_configs)} text encoder(s); the SDXL layout has two "
                              "(a refiner's single OpenCLIP encoder is not supported)")
        return "sdxl", "UNet addition_embed_type 'text_time' and two text encoders"
    if len(text_configs) != 1:
        raise LayoutError(f"{len(text_configs)} text encoders without an SDXL UNet; supported: SD 1.x, SD 2.x, SDXL")
    te = text_configs[0]
    if te.get("hidden_act") == "gelu" or te.get("hidden_size") == 1024:
        return "sd2", f"OpenCLIP text encoder (hidden_act {te.get('hidden_act')!r}, hidden size {te.get('hidden_size')})"
    return "sd1", f"OpenAI CLIP text encoder (hidden_act {te.get('hidden_act')!r}, hidden size {te.get('hidden_size')})"


# ------------------------------------------------------------------------------------------------ UNet
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET:
        raise LayoutError(f"resnet part {head!r}")
    return f"{_RESNET[head]}.{tail}"


def unet_key_to_ldm(key: str, config: dict) -> str:
    """One diffusers ``UNet2DConditionModel`` key (``module.param``) in the LDM / SGM layout (without the
    ``model.diffusion_model.`` prefix); :class:`LayoutError` when the layout has no place for it."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise LayoutError(f"layers_per_block {lpb!r} per block; the LDM layout numbers blocks with one value")
    mod, _, param = key.rpartition(".")
    try:
        if mod in _UNET_FIXED:
            return f"{_UNET_FIXED[mod]}.{param}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = 1 + b * (lpb + 1) + j
            return f"input_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
            return f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
        if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            return f"middle_block.1.{m[1]}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = b * (lpb + 1) + j
            return f"output_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
            b, up_types = int(m[1]), config["up_block_types"]
            if b >= len(up_types) - 1:
                raise LayoutError("an upsampler in the last up block")
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if 'CrossAttn' in up_types[b] else 1}.conv.{m[2]}"
        raise LayoutError("no place in the LDM UNet layout")
    except LayoutError as e:
        raise LayoutError(f"UNet tensor {key!r}: {e}") from None


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the LDM / SGM layout (without the ``model.diffusion_model.``
    prefix): ``input_blocks.i.j``, ``middle_block.j``, ``output_blocks.i.j``; transformer blocks keep their names."""
    return {unet_key_to_ldm(key, config): t for key, t in state.items()}


# ------------------------------------------------------------------------------------------------ VAE
_VAE_FIXED = {"conv_in", "conv_out", "quant_conv", "post_quant_conv"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the LDM layout (without ``first_stage_model.``): ``encoder.down.i``,
    ``decoder.up.(n-1-i)``, ``mid.block_1|attn_1|block_2``; attention projections as 1x1 convolutions."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, t in state.items():
        part, _, rest = key.partition(".")
        new = None
        if part in _VAE_FIXED:
            new = key
        elif part in ("encoder", "decoder"):
            if (m := re.fullmatch(r"(conv_in|conv_out)\.(.+)", rest)):
                new = key
            elif (m := re.fullmatch(r"conv_norm_out\.(.+)", rest)):
                new = f"{part}.norm_out.{m[1]}"
            elif part == "encoder" and (m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)):
                new = f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
            elif part == "encoder" and (m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest)):
                new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
            elif part == "decoder" and (m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)):
                new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
            elif part == "decoder" and (m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest)):
                new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
            elif (m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest)):
                new = f"{part}.mid.block_{int(m[1]) + 1}.{_vae_resnet(m[2])}"
            elif (m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", rest)):
                new = f"{part}.mid.attn_1.{_VAE_ATTN[m[1]]}.{m[2]}"
                if m[2] == "weight" and m[1] != "group_norm" and t.ndim == 2:
                    t = t[:, :, None, None]  # the original attention projections are 1x1 convolutions
        if new is None:
            raise LayoutError(f"VAE tensor {key!r}: no place in the LDM VAE layout")
        out[new] = t
    return out


# ------------------------------------------------------------------------------------------------ text encoders
def text_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text keys with the ``text_model.`` wrapper (transformers >= 5.6 flattens ``CLIPTextModel``)."""
    out = {}
    for k, t in state.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"] = t
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder): HF names under ``text_model.`` (the prefix is added by the caller)."""
    keys = text_keys(state)
    if "text_projection.weight" in keys:
        raise LayoutError("a projected OpenAI CLIP text encoder has no place in this layout")
    return keys


_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD 2.x, SDXL's second encoder): ``transformer.resblocks.i`` with q, k, v fused into
    ``attn.in_proj_weight`` / ``in_proj_bias``, ``token_embedding``, ``positional_embedding``, ``ln_final`` and the
    ``text_projection`` matrix (transposed: OpenCLIP multiplies ``x @ P``)."""
    keys = text_keys(state)
    out, qkv = {}, {}
    for key, t in keys.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = t
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif (m := re.fullmatch(r"text_model\.final_layer_norm\.(weight|bias)", key)):
            out[f"ln_final.{m[1]}"] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.T.contiguous()
        elif (m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = t
        elif (m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.out_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)", key)):
            out[f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = t
        else:
            raise LayoutError(f"text encoder tensor {key!r}: no place in the OpenCLIP layout")
    for (layer, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise LayoutError(f"text encoder layer {layer}: {param} of {sorted(parts)} only; in_proj needs q, k and v")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


_TEXT_LAYOUTS = {"clip": clip_to_ldm, "open_clip": open_clip_to_ldm}


def pipeline_keys(family: str, unet: tuple[dict, dict], vae: tuple[dict, dict], text_states: list[dict]) -> dict[str, torch.Tensor]:
    """The whole pipeline as one flat state dict in ``family``'s layout, tensors as given: ``unet`` and ``vae`` are
    (state, config), ``text_states`` the text encoders' state dicts in pipeline order."""
    fam = FAMILIES[family]
    if len(text_states) != len(fam.text):
        raise LayoutError(f"{family} has {len(fam.text)} text encoder(s), got {len(text_states)}")
    flat = {fam.unet + k: v for k, v in unet_to_ldm(*unet).items()}
    flat.update({fam.vae + k: v for k, v in vae_to_ldm(*vae).items()})
    for (prefix, layout), state in zip(fam.text, text_states):
        flat.update({prefix + k: v for k, v in _TEXT_LAYOUTS[layout](state).items()})
    return flat


def pipeline_to_ldm(family: str, unet: tuple[dict, dict], vae: tuple[dict, dict], text_states: list[dict],
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """:func:`pipeline_keys` as tensors to write (:func:`materialize`)."""
    return materialize(pipeline_keys(family, unet, vae, text_states), dtype)


def materialize(flat: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype``; every tensor a contiguous CPU tensor that owns its memory (safetensors
    refuses shared storage). Any layout's flat state dict (meta tensors are for keys and shapes only)."""
    out = {}
    for k, t in flat.items():
        src = t.detach()
        t = src.to("cpu", dtype=dtype if dtype is not None and src.is_floating_point() else src.dtype).contiguous()
        out[k] = t.clone() if t.data_ptr() == src.data_ptr() or t.untyped_storage().nbytes() != t.nbytes else t
    return out
