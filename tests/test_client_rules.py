"""Every family's single file and LoRA through the clients' own rules (tests/client_rules.py): ComfyUI's checkpoint
detection and LoRA key maps, A1111's LoRA name map and version detection, InvokeAI's LoRA base probe.

Where a rule depends on real widths (InvokeAI's 768 / 1024 / 2048, ComfyUI's SDXL transformer depths, SD3's hidden =
64 x depth, Flux's 3072) the models are the released architectures built on the meta device: keys and shapes only,
run through the same layout and LoRA-naming code the writers use (rank-1 factors: the rules read names, widths, file
order and metadata). The tiny pipelines check values: ComfyUI's patching of the exported LoRA onto the base's single
file gives the erased single file.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pytest
import torch
from safetensors.torch import load_file, save_file

import client_rules as rules
from test_export_transformers import erase_some

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "sd35", "flux_dev", "flux_schnell")
COMFY = {"sd1": "SD15", "sd2": "SD20", "sdxl": "SDXL", "sd3": "SD3", "sd35": "SD3", "flux_dev": "Flux", "flux_schnell": "FluxSchnell"}
INVOKE = {"sd1": "sd-1", "sd2": "sd-2", "sdxl": "sdxl", "flux_dev": "flux", "flux_schnell": "flux"}
A1111 = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def clip_config(hidden, layers, heads, act, projection=None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=projection or hidden)


@lru_cache(maxsize=None)
def released(family: str, variant: str = ""):
    """(denoiser, vae, text encoders, scheduler config) of the released model of ``family`` on the meta device
    (``variant``: ``v`` for the v-prediction SD 2.x 768 / an SDXL v-prediction finetune, ``medium`` for SD3.5 medium)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    sched = {"prediction_type": "v_prediction" if variant == "v" else "epsilon"}
    clip_l = clip_config(768, 12, 12, "quick_gelu")

    def clip_g():
        return CLIPTextModelWithProjection(clip_config(1280, 32, 20, "gelu"))

    def t5():
        return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                       feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False))

    with init_empty_weights():
        sd_vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        flow_vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16,
                                 use_quant_conv=False, use_post_quant_conv=False)
        sd_blocks = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        if family == "sd1":
            return UNet2DConditionModel(**sd_blocks, cross_attention_dim=768, attention_head_dim=8), sd_vae, [CLIPTextModel(clip_l)], sched
        if family == "sd2":
            unet = UNet2DConditionModel(**sd_blocks, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
            return unet, sd_vae, [CLIPTextModel(clip_config(1024, 23, 16, "gelu", 512))], sched
        if family == "sdxl":
            unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280), layers_per_block=2,
                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                                        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                                        projection_class_embeddings_input_dim=2816)
            return unet, sd_vae, [CLIPTextModel(clip_l), clip_g()], sched
        if family in ("sd3", "sd35"):
            depth, pos, extra = 24, 192, {}
            if family == "sd35":
                depth, pos, extra = (24, 384, {"dual_attention_layers": tuple(range(13))}) if variant == "medium" else (38, 192, {})
                extra["qk_norm"] = "rms_norm"
            mmdit = SD3Transformer2DModel(sample_size=128, num_layers=depth, num_attention_heads=depth, attention_head_dim=64,
                                          caption_projection_dim=64 * depth, joint_attention_dim=4096, pooled_projection_dim=2048,
                                          pos_embed_max_size=2, **extra)
            # the sin-cos position table is computed on the CPU even under init_empty_weights (384^2 x 1536 for 3.5
            # medium): built small, then given its released size on the meta device
            mmdit.pos_embed.pos_embed = torch.empty(1, pos * pos, 64 * depth, device="meta")
            mmdit.register_to_config(pos_embed_max_size=pos)
            return mmdit, flow_vae, [CLIPTextModelWithProjection(clip_l), clip_g(), t5()], {}
        flux = FluxTransformer2DModel(guidance_embeds=family == "flux_dev")
        return flux, flow_vae, [CLIPTextModel(clip_l), t5()], {}


@lru_cache(maxsize=None)
def single_file(family: str, variant: str = "") -> dict:
    from erase.export.layouts import markers, pipeline_to_file

    denoiser, vae, texts, sched = released(family, variant)
    flat = pipeline_to_file(family, (denoiser.state_dict(), dict(denoiser.config)), (vae.state_dict(), dict(vae.config)),
                            [t.state_dict() for t in texts])
    return {**flat, **markers(family, sched)}


@pytest.mark.parametrize("family, variant", [(f, "") for f in FAMILIES] + [("sd2", "v"), ("sdxl", "v"), ("sd35", "medium")])
def test_released_single_files_are_what_comfyui_and_a1111_detect(family, variant):
    from erase.export.layouts import architecture

    flat = single_file(family, variant)
    denoiser, _, _, sched = released(family, variant)
    found = rules.comfy_checkpoint(flat)
    assert found["prefix"] == "model.diffusion_model." and found["model"] == COMFY[family] and found["vae_keys"] > 50
    assert found["clip"] == {"sd1": {"clip_l"}, "sd2": {"clip_h"}, "sdxl": {"clip_l", "clip_g"}}.get(family, {"clip_l", "clip_g", "t5xxl"}
                                                                                                     if family.startswith("sd3") else {"clip_l", "t5xxl"})
    expected_type = {"sdxl": "V_PREDICTION" if variant == "v" else "EPS", "sd3": "FLOW", "sd35": "FLOW", "flux_dev": "FLUX", "flux_schnell": "FLOW"}
    if family in expected_type:  # SD 2.x: ComfyUI reads v-prediction off a norm bias's spread (values, not keys)
        assert found["model_type"] == expected_type[family]
    cfg = found["unet_config"]
    if family.startswith("sd3"):  # ComfyUI builds depth = hidden / 64 blocks: every joint block of the file is one of them
        blocks = {int(k.split(".")[3]) for k in flat if k.startswith("model.diffusion_model.joint_blocks.")}
        assert cfg["depth"] == len(blocks) == denoiser.config.num_layers
        assert cfg["qk_norm"] == ("rms" if family == "sd35" else None)
        assert cfg["x_block_self_attn_layers"] == list(denoiser.config.dual_attention_layers)
    if family.startswith("flux"):
        assert (cfg["hidden_size"], cfg["num_heads"], cfg["depth"], cfg["depth_single_blocks"]) == (3072, 24, 19, 38)
    if family in A1111:
        assert rules.a1111_checkpoint_config(flat) == {"sd1": "v1-inference", "sd2": "v2-inference(-v)", "sdxl": "sd_xl_base"}[family]
    arch = architecture(family, dict(denoiser.config), sched)
    assert arch == {("sd2", "v"): "stable-diffusion-v2-768-v", ("sd2", ""): "stable-diffusion-v2-512",
                    ("sd35", "medium"): "stable-diffusion-3-5-medium"}.get((family, variant), arch)


def preset_modules(family: str, preset: str) -> dict[str, tuple]:
    """{module: weight shape} of the LoRA-able weights a target preset selects (the UNet families' presets of
    erase.diffusion.families; for the transformers: every linear / convolution, or the text stream's entry)."""
    from erase.diffusion.families import FAMILIES

    denoiser = released(family)[0]
    pattern = {"text": r".*(add_[qkv]_proj|context_embedder)\.weight", "full": r".*"}.get(preset) or FAMILIES[family].target_presets[preset]
    return {n.removesuffix(".weight"): tuple(p.shape) for n, p in denoiser.named_parameters()
            if n.endswith(".weight") and p.ndim in (2, 4) and re.fullmatch(pattern, n)}


def lora_file(tmp_path, family: str, preset: str, style: str | None = None, anchors: bool = True, variant: str = ""):
    """The LoRA file the writer makes of a change to ``preset``'s modules (rank 1), read back in file order."""
    from erase.export.layouts import LAYOUTS
    from erase.export.lora import lora_metadata, name_factors, probe_anchors

    denoiser, _, _, sched = released(family, variant)
    style = style or LAYOUTS[family].lora
    factors = {m: (torch.zeros(1, *s[1:]), torch.zeros(s[0], 1, *[1] * (len(s) - 2))) for m, s in preset_modules(family, preset).items()}
    tensors = name_factors(factors, style, dict(denoiser.config))
    if anchors:
        probe_anchors(tensors, family, style, {n: tuple(p.shape) for n, p in denoiser.named_parameters()}, dict(denoiser.config), torch.float32)
    meta = {k: str(v) for k, v in lora_metadata(family, style, dict(denoiser.config), sched).items()}
    save_file(tensors, str(tmp_path / "l.safetensors"), metadata=meta)
    return load_file(str(tmp_path / "l.safetensors")), meta


def comfy_patches(family: str, lora: dict):
    """ComfyUI's patches of ``lora`` onto the family's single file, each checked to fit the weight it patches (a patch
    that does not fit is logged as an error and skipped by ComfyUI)."""
    flat = single_file(family)
    found = rules.comfy_checkpoint(flat)
    unet = {"diffusion_model." + k[len(found["prefix"]):]: t for k, t in flat.items() if k.startswith(found["prefix"])}
    patches, not_loaded = rules.comfy_load_lora(lora, rules.comfy_lora_key_map(found["model"], found["unet_config"], unet))
    for target, (up, down, _) in patches.items():
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        shape = list(unet[key].shape)
        if offset is not None:
            shape[offset[0]] = offset[2]
        assert up.shape[0] == shape[0] and down.flatten(1).shape[1] == int(torch.Size(shape[1:]).numel()), (target, up.shape, down.shape)
    return patches, not_loaded


@pytest.mark.parametrize("family, preset", [(f, p) for f in ("sd1", "sd2", "sdxl") for p in ("xattn", "selfattn", "noxattn", "full")]
                         + [(f, p) for f in ("sd3", "sd35", "flux_dev", "flux_schnell") for p in ("text", "full")])
def test_released_loras_load_in_every_client(tmp_path, family, preset):
    lora, meta = lora_file(tmp_path, family, preset)
    patches, not_loaded = comfy_patches(family, lora)
    stems = {re.sub(r"\.(lora_(down|up|A|B)\.weight|alpha)$", "", k) for k in lora}
    assert not_loaded == [] and len(patches) == len(stems) >= len(preset_modules(family, preset))
    if family in INVOKE:
        assert rules.invokeai_lora_base(lora) == INVOKE[family]
    if family in A1111:
        is_sd2 = family == "sd2"
        matched, dropped = rules.a1111_lora_matches(lora, rules.a1111_layer_names(single_file(family)), is_sd2)
        assert dropped == [] and len(matched) == len(lora)
        version = rules.a1111_lora_version(meta)
        assert version == A1111[family] and rules.a1111_lora_listed(version, A1111[family])


def test_the_rules_catch_the_defects_of_the_old_exports(tmp_path):
    """What InvokeAI, A1111 and ComfyUI made of the exports before the fixes, decided by the same rules."""
    # SD 1.x ESD-u (noxattn): the first probe key is a resnet time_emb_proj, 1280 wide -> filed as SDXL
    lora, _ = lora_file(tmp_path, "sd1", "noxattn", anchors=False)
    assert rules.invokeai_lora_base(lora) == "sdxl"
    # --targets selfattn: no probe key at all -> not recognised
    lora, _ = lora_file(tmp_path, "sd1", "selfattn", anchors=False)
    with pytest.raises(rules.NotAMatch):
        rules.invokeai_lora_base(lora)
    # SDXL with diffusers module names: A1111 drops add_embedding and the first upsampler
    lora, _ = lora_file(tmp_path, "sdxl", "full", style="kohya")
    _, dropped = rules.a1111_lora_matches(lora, rules.a1111_layer_names(single_file("sdxl")))
    assert {k.partition(".")[0] for k in dropped} == {"lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2",
                                                      "lora_unet_up_blocks_0_upsamplers_0_conv"}
    # SD 2.x without ss_v2: filed as SD 1 and hidden while an SD 2 checkpoint is loaded
    old = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v2"}
    assert rules.a1111_lora_version(old) == "SD1" and not rules.a1111_lora_listed("SD1", "SD2")
    # an SDXL v-prediction single file without v_pred: sampled as epsilon
    flat = {k: v for k, v in single_file("sdxl", "v").items() if k != "v_pred"}
    assert rules.comfy_checkpoint(flat)["model_type"] == "EPS"
    # a Flux diffusers LoRA without InvokeAI's two probe modules: not taken as Flux (then refused by the SD probe)
    lora, _ = lora_file(tmp_path, "flux_dev", "text", anchors=False)
    with pytest.raises(rules.NotAMatch):
        rules.invokeai_lora_base(lora)


def test_lora_metadata_names_the_variant(tmp_path):
    _, meta = lora_file(tmp_path, "sd2", "xattn", variant="v")
    assert meta["ss_v2"] == "True" and meta["ss_v_parameterization"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    _, meta = lora_file(tmp_path, "sd1", "xattn")
    assert "ss_v2" not in meta and "ss_v_parameterization" not in meta and meta["ss_base_model_version"] == "sd_v1"


# ------------------------------------------------------------------------------------------------ tiny: values
#: diffusers modules an "erasure" changes in each tiny family: fused-projection members, the adaLN halves diffusers
#: swaps, convolutions, SDXL's add_embedding and first upsampler (what the old exports lost in A1111)
CHANGED = {
    "sd1": ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "up_blocks.1.resnets.0.conv1", "up_blocks.0.resnets.1.time_emb_proj"],
    "sd2": ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", "down_blocks.1.attentions.0.proj_in"],
    "sdxl": ["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "add_embedding.linear_1", "up_blocks.0.upsamplers.0.conv"],
    "sd3": ["transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.1.norm1_context.linear",
            "norm_out.linear", "pos_embed.proj", "transformer_blocks.1.ff.net.0.proj"],
    "sd35": ["transformer_blocks.0.attn2.to_q", "transformer_blocks.1.attn.add_k_proj", "context_embedder"],
    "flux_dev": ["transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_q_proj", "single_transformer_blocks.1.proj_mlp",
                 "single_transformer_blocks.0.attn.to_k", "norm_out.linear", "time_text_embed.guidance_embedder.linear_1"],
}


@pytest.mark.parametrize("family", list(CHANGED))
def test_comfyui_patching_the_lora_onto_the_base_file_gives_the_erased_file(tmp_path, family):
    """The LoRA applied as ComfyUI applies it (its key map, the q / k / v slices of fused projections, the adaLN swap)
    onto the base's single file equals the erased single file: the key format is right for ComfyUI, not only for
    diffusers."""
    import diffusers

    from erase.export.formats import ExportSpec
    from erase.export.layouts import LAYOUTS
    from erase.export.lora import write as write_lora
    from erase.export.single_file import write as write_single_file
    from eval.tiny import build_tiny_pipeline

    base_dir = build_tiny_pipeline(tmp_path / "base", family=family, sample_size=8, block_out_channels=(32, 64))
    pipe = getattr(diffusers, LAYOUTS[family].pipeline).from_pretrained(base_dir)
    model = pipe.unet if LAYOUTS[family].denoiser == "unet" else pipe.transformer
    config = {"pretrained_model_name_or_path": base_dir, "base_model": {"path": base_dir}, "concept": "x", "method": "m", "settings": {}}
    spec = ExportSpec(("single_file", "lora"), "fp32", 2, None)
    for stage in ("before", "after"):
        (tmp_path / stage).mkdir()
    write_single_file(tmp_path / "before", model, {}, config, spec)
    base = erase_some(model, CHANGED[family])
    write_single_file(tmp_path / "after", model, base, config, spec)
    anchors = write_lora(tmp_path / "after", model, base, config, spec, family)["probe_anchors"]

    before, after = (load_file(str(tmp_path / s / "erased.safetensors")) for s in ("before", "after"))
    prefix = "model.diffusion_model."
    unet_before = {"diffusion_model." + k[len(prefix):]: v for k, v in before.items() if k.startswith(prefix)}
    cfg = rules.comfy_detect_unet_config(before, prefix)
    lora = load_file(str(tmp_path / "after" / "erased_lora.safetensors"))
    patches, not_loaded = rules.comfy_load_lora(lora, rules.comfy_lora_key_map(COMFY[family], cfg, unet_before))
    assert not_loaded == [] and len(patches) == len(CHANGED[family]) + len(anchors)
    assert anchors == (["transformer.single_transformer_blocks.0.attn.to_q"] if family == "flux_dev" else [])
    patched = rules.comfy_apply(unet_before, patches)
    changed = {k for k in unet_before if not torch.equal(before[prefix + k[len("diffusion_model."):]], after[prefix + k[len("diffusion_model."):]])}
    assert changed and changed <= {t if isinstance(t, str) else t[0] for t in patches}
    for k, v in patched.items():
        torch.testing.assert_close(v, after[prefix + k[len("diffusion_model."):]].float(), rtol=1e-5, atol=1e-5)
