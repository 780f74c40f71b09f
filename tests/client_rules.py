"""How real clients decide about a checkpoint or a LoRA file: InvokeAI's LoRA base probe, A1111's LoRA name map and
version detection, ComfyUI's model detection and LoRA key maps. Each function is our own code, written by reading the
client's (the source named above it: repository, path, function) and deciding exactly as it does on keys, shapes,
file order and metadata (``sd``: a state dict in file order, as ``safetensors.torch.load_file`` gives it; meta
tensors do where only shapes count). tests/test_client_rules.py runs every family's exports through them: diffusers'
tolerant loaders accept files these clients misfile or silently drop keys of.
"""

from __future__ import annotations

import re

import torch


class NotAMatch(ValueError):  # InvokeAI's NotAMatchError: the client does not recognise the file
    pass


# ================================================================================================ InvokeAI
# invoke-ai/InvokeAI invokeai/backend/model_manager/util/model_util.py: lora_token_vector_length
def invokeai_token_vector_length(sd) -> int | None:
    """The text width of a kohya LoRA: the first key in file order holding ``_attn2_to_k.`` / ``_attn2_to_v.`` or
    ``time_emb_proj.lora_down`` (``lora_down`` width), or the text encoders' ``_self_attn_`` widths."""
    def shape_1(key, tensor):  # lora / loha / diff: in-width of the down factor; ia3 (text encoder): shape[0]
        lora_key = key.split(".", 1)[1] if "." in key else None
        if lora_key in ("lora_down.weight", "hada_w1_b", "hada_w2_b", "diff"):
            return tensor.shape[1]
        return tensor.shape[0] if lora_key == "weight" and "lora_unet_" not in key else None

    length = te1 = te2 = None
    for key, tensor in sd.items():
        if key.startswith("lora_unet_") and ("_attn2_to_k." in key or "_attn2_to_v." in key or "time_emb_proj.lora_down" in key):
            length = shape_1(key, tensor)
        elif key.startswith("lora_te") and "_self_attn_" in key:
            width = shape_1(key, tensor)
            if key.startswith("lora_te_"):
                length = width
            elif key.startswith("lora_te1_"):
                te1 = width
            elif key.startswith("lora_te2_"):
                te2 = width
        if te1 is not None and te2 is not None:
            length = te1 + te2
        if length is not None:
            break
    return length


# invoke-ai/InvokeAI invokeai/backend/model_manager/configs/lora.py: _SDXL_UNET_ATTENTION_RE, _state_dict_looks_like_sdxl_unet_lora
_SDXL_UNET_ATTENTION = re.compile(r"^lora_unet_(?:(?:down_blocks|up_blocks)_\d+_attentions_\d+|mid_block_attentions_\d+"
                                  r"|(?:input_blocks|output_blocks)_\d+_\d+|middle_block_\d+)_transformer_blocks_(\d+)_")


def invokeai_looks_like_sdxl_unet(sd) -> bool:
    return any((m := _SDXL_UNET_ATTENTION.match(k)) is not None and int(m[1]) >= 2 for k in sd)

# invoke-ai/InvokeAI invokeai/backend/patches/lora_conversions/flux_diffusers_lora_conversion_utils.py:
# is_state_dict_likely_in_flux_diffusers_format (Flux.1 naming; the kohya / OneTrainer detectors it is tried after
# match only lora_unet_double_blocks / lora_transformer_ keys)
_FLUX_DIFFUSERS_KEYS = ("single_transformer_blocks.0.attn.to_q.lora_A.weight", "single_transformer_blocks.0.attn.to_q.lora_B.weight",
                        "transformer_blocks.0.attn.add_q_proj.lora_A.weight", "transformer_blocks.0.attn.add_q_proj.lora_B.weight")


def invokeai_flux_diffusers_format(sd) -> bool:
    if not all(k.endswith(("lora_A.weight", "lora_B.weight", "lora.down.weight", "lora.up.weight")) for k in sd):
        return False
    return any(all(prefix + k in sd for k in _FLUX_DIFFUSERS_KEYS) for prefix in ("transformer.", "base_model.model."))


# invoke-ai/InvokeAI invokeai/backend/model_manager/configs/lora.py: LoRA_LyCORIS_Config_Base._get_base_or_raise
def invokeai_lora_base(sd) -> str:
    """``flux``, ``sd-1``, ``sd-2`` or ``sdxl``, as InvokeAI files a single-file LoRA; :class:`NotAMatch` otherwise."""
    if invokeai_flux_diffusers_format(sd):
        return "flux"
    length = invokeai_token_vector_length(sd)
    if length == 768:
        return "sd-1"
    if length == 1024:
        return "sd-2"
    if length in (1280, 2048):  # 1280: "recognizes format at civitai.com/models/224641" (a time_emb_proj key)
        return "sdxl"
    if invokeai_looks_like_sdxl_unet(sd):
        return "sdxl"
    raise NotAMatch(f"unrecognized token vector length {length}")


# ================================================================================================ A1111
# AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py: suffix_conversion, convert_diffusers_name_to_compvis
_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_compvis_name(key: str, is_sd2: bool) -> str:
    def num(x):
        return int(x) if re.match(r"\d+", x) else x

    if m := re.match(r"lora_unet_conv_(in|out)(.*)", key):
        return f"diffusion_model_{'input_blocks_0_0' if m[1] == 'in' else 'out_2'}{m[2]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _RESNET_SUFFIX.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_input_blocks_{1 + num(m[1]) * 3 + num(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _RESNET_SUFFIX.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else num(m[2]) * 2}_{suffix}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _RESNET_SUFFIX.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_output_blocks_{num(m[1]) * 3 + num(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + num(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + num(m[1]) * 3}_{2 if num(m[1]) > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{m[1]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


# AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py: assign_network_names_to_compvis_modules
def a1111_layer_names(checkpoint_keys) -> set[str]:
    """The module names A1111 matches LoRA keys against, from an LDM checkpoint's keys (the UNet's modules as
    ``diffusion_model_...``: ``sd_model.model.named_modules()`` with dots as underscores)."""
    names = set()
    for key in checkpoint_keys:
        if key.startswith("model.diffusion_model."):
            module = key[len("model."):].rpartition(".")[0]
            names.add(module.replace(".", "_"))
    return names


# AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py: load_network (no diffusers_weight_map: SD 1/2/XL)
def a1111_lora_matches(lora_keys, layer_names: set[str], is_sd2: bool = False) -> tuple[dict[str, str], list[str]]:
    """({lora key: module it patches}, [keys A1111 silently skips ("didn't match keys", logged at debug level)])."""
    matched, failed = {}, []
    for key_network in lora_keys:
        stem = key_network.partition(".")[0]
        key = a1111_compvis_name(stem, is_sd2)
        found = key in layer_names
        if not found and (m := re.match(r"(.*)_([qkv]_proj)$", key)):
            found = m[1] in layer_names
        if not found and "lora_unet" in stem:  # "SDXL loras seem to already have correct compvis keys"
            key = stem.replace("lora_unet", "diffusion_model")
            found = key in layer_names
        if found:
            matched[key_network] = key
        else:
            failed.append(key_network)
    return matched, failed


# AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/network.py: NetworkOnDisk.detect_version
def a1111_lora_version(metadata: dict | None) -> str:
    metadata = metadata or {}
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    return "SD2" if str(metadata.get("ss_v2", "")) == "True" else "SD1" if len(metadata) else "Unknown"


# AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/ui_extra_networks_lora.py: ExtraNetworksPageLora.create_item
def a1111_lora_listed(version: str, model: str, hide_unknown_for: tuple[str, ...] = ()) -> bool:
    """Whether the LoRA page shows a LoRA of ``version`` while a ``model`` (SD1 / SD2 / SDXL) checkpoint is loaded
    (``lora_show_all`` off, the default)."""
    if version == "Unknown":
        return model not in hide_unknown_for
    return version == model


# AUTOMATIC1111/stable-diffusion-webui modules/sd_models_config.py: guess_model_config_from_state_dict
def a1111_checkpoint_config(sd) -> str:
    """The config A1111 builds a checkpoint with. SD 2.x's v-prediction is then decided by running the UNet once
    (``is_using_v_parameterization_for_sd2``), which a key rule cannot: ``v2-inference(-v)`` names both."""
    model_input = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    if "conditioner.embedders.1.model.ln_final.weight" in sd:
        return "sd_xl_inpaint" if model_input.shape[1] == 9 else "sd_xl_base"
    if "conditioner.embedders.0.model.ln_final.weight" in sd:
        return "sd_xl_refiner"
    proj = sd.get("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    if proj is not None and proj.shape[1] == 1024:
        return "v2-inpainting-inference" if model_input.shape[1] == 9 else "v2-inference(-v)"
    if model_input is not None and model_input.shape[1] in (8, 9):
        return {9: "v1-inpainting-inference", 8: "instruct-pix2pix"}[model_input.shape[1]]
    return "v1-inference"


# ================================================================================================ ComfyUI
# Comfy-Org/ComfyUI comfy/model_detection.py: unet_prefix_from_state_dict
def comfy_unet_prefix(sd) -> str:
    counts = {c: sum(1 for k in sd if k.startswith(c)) for c in ("model.diffusion_model.", "model.model.")}
    top = max(counts, key=counts.get)
    return top if counts[top] > 5 else "model."


def _count_blocks(keys, prefix: str, count: int = 0) -> int:
    while any(k.startswith(prefix.format(count)) for k in keys):
        count += 1
    return count


def _transformer_depth(prefix, keys, sd):
    tp = prefix + "1.transformer_blocks."
    if any(k.startswith(tp) for k in keys):
        return (_count_blocks(keys, tp + "{}"), sd[f"{tp}0.attn2.to_k.weight"].shape[1], len(sd[f"{prefix}1.proj_in.weight"].shape) == 2)
    return None


# Comfy-Org/ComfyUI comfy/model_detection.py: detect_unet_config (the MMDiT, Flux and UNet branches)
def comfy_detect_unet_config(sd, p: str) -> dict | None:
    keys = list(sd)
    if f"{p}joint_blocks.0.context_block.attn.qkv.weight" in sd:  # MMDiT (SD3: hidden = 64 x depth)
        x = sd[f"{p}x_embedder.proj.weight"]
        return {"in_channels": x.shape[1], "patch_size": x.shape[2], "depth": x.shape[0] // 64,
                "adm_in_channels": sd[f"{p}y_embedder.mlp.0.weight"].shape[1], "pos_embed_scaling_factor": None,
                "qk_norm": "rms" if f"{p}joint_blocks.0.context_block.attn.ln_q.weight" in sd else None,
                "x_block_self_attn_layers": sorted(int(k[len(p) + 13:-len(".x_block.attn2.qkv.weight")]) for k in keys
                                                   if k.startswith(f"{p}joint_blocks.") and k.endswith(".x_block.attn2.qkv.weight"))}
    if any(f"{p}double_blocks.0.img_attn.norm.key_norm.{s}" in sd for s in ("weight", "scale")) and f"{p}img_in.weight" in sd:  # Flux
        cfg = {"image_model": "flux", "axes_dim": [16, 56, 56], "patch_size": 2, "in_channels": sd[f"{p}img_in.weight"].shape[1] // 4,
               "hidden_size": sd[f"{p}img_in.weight"].shape[0], "context_in_dim": sd[f"{p}txt_in.weight"].shape[1],
               "vec_in_dim": sd[f"{p}vector_in.in_layer.weight"].shape[1] if f"{p}vector_in.in_layer.weight" in sd else None,
               "depth": _count_blocks(keys, f"{p}double_blocks.{{}}."), "depth_single_blocks": _count_blocks(keys, f"{p}single_blocks.{{}}."),
               "guidance_embed": f"{p}guidance_in.in_layer.weight" in sd}
        cfg["num_heads"] = cfg["hidden_size"] // sum(cfg["axes_dim"])
        return cfg
    if f"{p}input_blocks.0.0.weight" not in sd:
        return None
    y = f"{p}label_emb.0.0.weight"
    cfg = {"adm_in_channels": sd[y].shape[1] if y in sd else None, "model_channels": sd[f"{p}input_blocks.0.0.weight"].shape[0],
           "in_channels": sd[f"{p}input_blocks.0.0.weight"].shape[1], "use_temporal_attention": False}
    num_res, mult, depth, depth_out = [], [], [], []
    context, linear, last_res, last_mult = None, False, 0, 0
    n_in = _count_blocks(keys, f"{p}input_blocks.{{}}.")
    for count in range(n_in):
        pre, pre_out = f"{p}input_blocks.{count}.", f"{p}output_blocks.{n_in - count - 1}."
        if f"{pre}0.op.weight" in sd:  # a new level
            num_res.append(last_res)
            mult.append(last_mult)
            last_res = last_mult = 0
            out = _transformer_depth(pre_out, keys, sd)
            depth_out.append(out[0] if out else 0)
        else:
            if f"{pre}0.in_layers.0.weight" in sd:
                last_res += 1
                last_mult = sd[f"{pre}0.out_layers.3.weight"].shape[0] // cfg["model_channels"]
                out = _transformer_depth(pre, keys, sd)
                depth.append(out[0] if out else 0)
                if out and context is None:
                    context, linear = out[1], out[2]
            if f"{pre_out}0.in_layers.0.weight" in sd:
                out = _transformer_depth(pre_out, keys, sd)
                depth_out.append(out[0] if out else 0)
    num_res.append(last_res)
    mult.append(last_mult)
    mid = (_count_blocks(keys, f"{p}middle_block.1.transformer_blocks.{{}}") if f"{p}middle_block.1.proj_in.weight" in sd
           else -1 if f"{p}middle_block.0.in_layers.0.weight" in sd else -2)
    cfg.update(num_res_blocks=num_res, channel_mult=mult, transformer_depth=depth, transformer_depth_output=depth_out,
               transformer_depth_middle=mid, use_linear_in_transformer=linear, context_dim=context)
    return cfg


# Comfy-Org/ComfyUI comfy/supported_models.py: the `models` list order and each class's unet_config (BASE.matches in
# comfy/supported_models_base.py: every key equal), the classes our families can meet
COMFY_MODELS = (
    ("SD15", {"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False}),
    ("SD20", {"context_dim": 1024, "model_channels": 320, "use_linear_in_transformer": True, "adm_in_channels": None, "use_temporal_attention": False}),
    ("SDXLRefiner", {"model_channels": 384, "use_linear_in_transformer": True, "context_dim": 1280, "adm_in_channels": 2560,
                     "transformer_depth": [0, 0, 4, 4, 4, 4, 0, 0], "use_temporal_attention": False}),
    ("SDXL", {"model_channels": 320, "use_linear_in_transformer": True, "transformer_depth": [0, 0, 2, 2, 10, 10], "context_dim": 2048,
              "adm_in_channels": 2816, "use_temporal_attention": False}),
    ("SD3", {"in_channels": 16, "pos_embed_scaling_factor": None}),
    ("FluxInpaint", {"image_model": "flux", "guidance_embed": True, "in_channels": 96}),
    ("Flux", {"image_model": "flux", "guidance_embed": True}),
    ("FluxSchnell", {"image_model": "flux", "guidance_embed": False}),
)
#: Comfy-Org/ComfyUI comfy/supported_models.py: vae_key_prefix / text_encoder_key_prefix (BASE: first_stage_model. / cond_stage_model.)
COMFY_PREFIXES = {"SD15": ("first_stage_model.", "cond_stage_model."), "SD20": ("first_stage_model.", "cond_stage_model."),
                  "SDXL": ("first_stage_model.", "conditioner."), "SD3": ("first_stage_model.", "text_encoders."),
                  "Flux": ("vae.", "text_encoders."), "FluxSchnell": ("vae.", "text_encoders.")}


def comfy_model_class(unet_config: dict) -> str | None:
    for name, want in COMFY_MODELS:
        if all(k in unet_config and unet_config[k] == v for k, v in want.items()):
            return name
    return None


# Comfy-Org/ComfyUI comfy/supported_models.py: SDXL.model_type, SD20.model_type, FluxSchnell.get_model; model_base.SD3 / Flux
def comfy_model_type(name: str, sd, prefix: str) -> str:
    if name == "SDXL":
        if "edm_mean" in sd and "edm_std" in sd:
            return "EDM"
        if "edm_vpred.sigma_max" in sd:
            return "V_PREDICTION_EDM"
        return "V_PREDICTION" if "v_pred" in sd else "EPS"
    if name == "SD20":
        out = sd.get(f"{prefix}output_blocks.11.1.transformer_blocks.0.norm1.bias")
        return "V_PREDICTION" if out is not None and not out.is_meta and torch.std(out.float(), unbiased=False) > 0.09 else "EPS"
    return {"SD3": "FLOW", "Flux": "FLUX", "FluxSchnell": "FLOW"}.get(name, "EPS")


# Comfy-Org/ComfyUI comfy/sd.py: load_state_dict_guess_config (the detection part) with the clip targets of
# comfy/supported_models.py (SD3.clip_target, Flux.clip_target via text_encoders/sd3_clip.py t5_xxl_detect)
def comfy_checkpoint(sd) -> dict:
    """{"prefix", "unet_config", "model" (ComfyUI's class or None), "model_type", "clip" (text encoders found),
    "vae_keys"}: what "Load Checkpoint" builds from a single file."""
    prefix = comfy_unet_prefix(sd)
    cfg = comfy_detect_unet_config(sd, prefix)
    name = comfy_model_class(cfg) if cfg else None
    out = {"prefix": prefix, "unet_config": cfg, "model": name, "model_type": comfy_model_type(name, sd, prefix) if name else None}
    vae_prefix, te_prefix = COMFY_PREFIXES.get(name, ("first_stage_model.", "cond_stage_model."))
    out["vae_keys"] = sum(1 for k in sd if k.startswith(vae_prefix + "decoder.") or k.startswith(vae_prefix + "encoder."))
    clip = set()
    for enc in ("clip_l", "clip_g"):
        if f"{te_prefix}{enc}.transformer.text_model.final_layer_norm.weight" in sd:
            clip.add(enc)
    if f"{te_prefix}t5xxl.transformer.encoder.final_layer_norm.weight" in sd:
        clip.add("t5xxl")
    # SD15 / SD20 / SDXL.process_clip_state_dict: the prefixes they rename to clip_l / clip_h / clip_g
    for enc, model, pre in (("clip_l", "SD15", "cond_stage_model.transformer.text_model."), ("clip_h", "SD20", "cond_stage_model.model."),
                            ("clip_l", "SDXL", "conditioner.embedders.0.transformer.text_model"), ("clip_g", "SDXL", "conditioner.embedders.1.model.")):
        if name == model and any(k.startswith(pre) for k in sd):
            clip.add(enc)
    out["clip"] = clip
    return out


# Comfy-Org/ComfyUI comfy/utils.py: UNET_MAP_RESNET, UNET_MAP_ATTENTIONS, TRANSFORMER_BLOCKS, UNET_MAP_BASIC, unet_to_diffusers
_C_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
             "in_layers.0": "norm1", "out_layers.0": "norm2"}
_C_ATTN = ("proj_in", "proj_out", "norm")
_C_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
            "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_C_BASIC = {"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}


def comfy_unet_to_diffusers(cfg: dict) -> dict[str, str]:
    """diffusers UNet module -> LDM module (weights only: a LoRA patches ``.weight``)."""
    out, depth, depth_out = {}, list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    num_res = cfg["num_res_blocks"]
    for x in range(len(cfg["channel_mult"])):
        n = 1 + (num_res[x] + 1) * x
        for i in range(num_res[x]):
            out.update({f"down_blocks.{x}.resnets.{i}.{d}": f"input_blocks.{n}.0.{o}" for o, d in _C_RESNET.items()})
            t = depth.pop(0)
            if t > 0:
                out.update({f"down_blocks.{x}.attentions.{i}.{b}": f"input_blocks.{n}.1.{b}" for b in _C_ATTN})
                out.update({f"down_blocks.{x}.attentions.{i}.transformer_blocks.{j}.{b}": f"input_blocks.{n}.1.transformer_blocks.{j}.{b}"
                            for j in range(t) for b in _C_BLOCK})
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    out.update({f"mid_block.attentions.0.{b}": f"middle_block.1.{b}" for b in _C_ATTN})
    out.update({f"mid_block.attentions.0.transformer_blocks.{t}.{b}": f"middle_block.1.transformer_blocks.{t}.{b}"
                for t in range(cfg["transformer_depth_middle"]) for b in _C_BLOCK})
    for i, n in enumerate((0, 2)):
        out.update({f"mid_block.resnets.{i}.{d}": f"middle_block.{n}.{o}" for o, d in _C_RESNET.items()})
    num_res = list(reversed(num_res))
    for x in range(len(cfg["channel_mult"])):
        n, length = (num_res[x] + 1) * x, num_res[x] + 1
        for i in range(length):
            c = 1
            out.update({f"up_blocks.{x}.resnets.{i}.{d}": f"output_blocks.{n}.0.{o}" for o, d in _C_RESNET.items()})
            t = depth_out.pop()
            if t > 0:
                c += 1
                out.update({f"up_blocks.{x}.attentions.{i}.{b}": f"output_blocks.{n}.1.{b}" for b in _C_ATTN})
                out.update({f"up_blocks.{x}.attentions.{i}.transformer_blocks.{j}.{b}": f"output_blocks.{n}.1.transformer_blocks.{j}.{b}"
                            for j in range(t) for b in _C_BLOCK})
            if i == length - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    out.update(_C_BASIC)
    return out


def _swap(t):  # comfy/utils.py swap_scale_shift
    return torch.cat(t.chunk(2, dim=0)[::-1], dim=0)


# Comfy-Org/ComfyUI comfy/utils.py: MMDIT_MAP_BASIC, MMDIT_MAP_BLOCK, mmdit_to_diffusers (targets: key, (key, slice), (key, None, fn))
_MMDIT_BLOCK = {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
                "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
                "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj", "attn2.to_out.0": "x_block.attn2.proj",
                "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}
_MMDIT_BASIC = {"context_embedder": "context_embedder", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
                "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "pos_embed.proj": "x_embedder.proj",
                "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0", "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
                "proj_out": "final_layer.linear"}


def comfy_mmdit_to_diffusers(cfg: dict, prefix: str = "diffusion_model.") -> dict:
    depth, out = cfg["depth"], {}
    offset = depth * 64
    for i in range(depth):
        to = f"{prefix}joint_blocks.{i}"
        for names, qkv in ((("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.qkv"),
                           (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "context_block.attn.qkv"),
                           (("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.qkv")):
            for j, name in enumerate(names):
                out[f"transformer_blocks.{i}.{name}"] = (f"{to}.{qkv}.weight", (0, offset * j, offset))
        out.update({f"transformer_blocks.{i}.{d}": f"{to}.{o}.weight" for d, o in _MMDIT_BLOCK.items()})
    out.update({d: f"{prefix}{o}.weight" for d, o in _MMDIT_BASIC.items()})
    out["norm_out.linear"] = (f"{prefix}final_layer.adaLN_modulation.1.weight", None, _swap)
    out[f"transformer_blocks.{depth - 1}.norm1_context.linear"] = (f"{prefix}joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.weight", None, _swap)
    return out


# Comfy-Org/ComfyUI comfy/utils.py: flux_to_diffusers
_FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
                "ff_context.net.2": "txt_mlp.2"}
_FLUX_BASIC = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer", "context_embedder": "txt_in",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer", "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}


def comfy_flux_to_diffusers(cfg: dict, prefix: str = "diffusion_model.") -> dict:
    h, out = cfg["hidden_size"], {}
    for i in range(cfg["depth"]):
        to = f"{prefix}double_blocks.{i}"
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"transformer_blocks.{i}.attn.{name}"] = (f"{to}.img_attn.qkv.weight", (0, h * j, h))
        for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"transformer_blocks.{i}.attn.{name}"] = (f"{to}.txt_attn.qkv.weight", (0, h * j, h))
        out.update({f"transformer_blocks.{i}.{d}": f"{to}.{o}.weight" for d, o in _FLUX_DOUBLE.items()})
    for i in range(cfg["depth_single_blocks"]):
        to = f"{prefix}single_blocks.{i}"
        for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            out[f"single_transformer_blocks.{i}.{name}"] = (f"{to}.linear1.weight", (0, h * j, h))
        out[f"single_transformer_blocks.{i}.proj_mlp"] = (f"{to}.linear1.weight", (0, h * 3, h * 4))
        out[f"single_transformer_blocks.{i}.norm.linear"] = f"{to}.modulation.lin.weight"
        out[f"single_transformer_blocks.{i}.proj_out"] = f"{to}.linear2.weight"
    out.update({d: f"{prefix}{o}.weight" for d, o in _FLUX_BASIC.items()})
    out["norm_out.linear"] = (f"{prefix}final_layer.adaLN_modulation.1.weight", None, _swap)
    return out


# Comfy-Org/ComfyUI comfy/lora.py: model_lora_keys_unet (the UNet, SD3 and Flux parts)
def comfy_lora_key_map(model: str, unet_config: dict, unet_keys) -> dict:
    """LoRA key stem -> target (``diffusion_model.<key>``, or (key, slice) / (key, None, function))."""
    key_map = {}
    for k in unet_keys:  # ``diffusion_model.*`` keys of the loaded model
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
    if model in ("SD15", "SD20", "SDXL", "SDXLRefiner"):
        for d, ldm in comfy_unet_to_diffusers(unet_config).items():
            key_map["lora_unet_" + d.replace(".", "_")] = f"diffusion_model.{ldm}.weight"
            for p in ("", "unet."):
                stem = p + d.replace(".to_", ".processor.to_")
                key_map[stem[:-2] if stem.endswith(".to_out.0") else stem] = f"diffusion_model.{ldm}.weight"
    if model == "SD3":
        for d, to in comfy_mmdit_to_diffusers(unet_config).items():
            for stem in (f"transformer.{d}", f"base_model.model.{d}", "lora_transformer_" + d.replace(".", "_")):
                key_map[stem] = to
    if model in ("Flux", "FluxSchnell"):
        for d, to in comfy_flux_to_diffusers(unet_config).items():
            for stem in (f"transformer.{d}", "lora_transformer_" + d.replace(".", "_"), d):
                key_map[stem] = to
    return key_map


# Comfy-Org/ComfyUI comfy/lora.py: load_lora with comfy/weight_adapter/lora.py LoRAAdapter.load (up / down name pairs)
_PAIRS = (("{}.lora_up.weight", "{}.lora_down.weight"), ("{}_lora.up.weight", "{}_lora.down.weight"),
          ("{}.lora_B.weight", "{}.lora_A.weight"), ("{}.lora.up.weight", "{}.lora.down.weight"))


def comfy_load_lora(lora: dict, key_map: dict) -> tuple[dict, list[str]]:
    """({target: (up, down, alpha)}, keys ComfyUI logs as "lora key not loaded")."""
    patches, loaded = {}, set()
    for stem, target in key_map.items():
        alpha = lora.get(f"{stem}.alpha")
        for up, down in _PAIRS:
            if up.format(stem) in lora:
                patches[target if isinstance(target, str) else tuple(target)] = (lora[up.format(stem)], lora[down.format(stem)],
                                                                                  None if alpha is None else float(alpha))
                loaded |= {up.format(stem), down.format(stem)} | ({f"{stem}.alpha"} if alpha is not None else set())
                break
    return patches, [k for k in lora if k not in loaded]


# Comfy-Org/ComfyUI comfy/weight_adapter/lora.py: LoRAAdapter.calculate_weight; comfy/model_patcher.py: the slice / function
def comfy_apply(sd: dict, patches: dict) -> dict:
    """``sd`` (``diffusion_model.*`` keys) with every patch added as ComfyUI adds it (strength 1)."""
    out = {k: v.clone().float() for k, v in sd.items()}
    for target, (up, down, alpha) in patches.items():
        key, offset, fn = (target, None, None) if isinstance(target, str) else (target[0], target[1], target[2] if len(target) > 2 else None)
        w = out[key]
        if offset is not None:
            w = w.narrow(offset[0], offset[1], offset[2])
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        diff = (up.float().flatten(start_dim=1) @ down.float().flatten(start_dim=1)).reshape(w.shape)
        w += (fn or (lambda t: t))(scale * diff)
    return out
