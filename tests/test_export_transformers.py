"""The offline MMDiT fixtures (eval.tiny: SD3, SD3.5, Flux dev / schnell) and the exports of a transformer denoiser:
``transformer/`` + ``transformer_delta.safetensors`` + card, the single file in Stability's / Black Forest Labs'
layout read back through diffusers' ``from_single_file`` bit for bit, the LoRA through ``load_lora_weights``, the
offline converter; LoRA factors for changes that are float noise.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

DITS = ("sd3", "sd35", "flux_dev", "flux_schnell")
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "sd35": "StableDiffusion3Pipeline", "flux_dev": "FluxPipeline", "flux_schnell": "FluxPipeline"}
CHANGED = {"sd3": ["transformer_blocks.0.attn.to_k", "transformer_blocks.1.norm1_context.linear", "pos_embed.proj"],
           "sd35": ["transformer_blocks.0.attn2.to_v", "transformer_blocks.0.attn.add_q_proj"],
           "flux_dev": ["transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.0.proj_mlp", "norm_out.linear"],
           "flux_schnell": ["single_transformer_blocks.1.attn.to_q", "context_embedder"]}


@pytest.fixture(scope="module")
def dits(tmp_path_factory):
    from eval.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("dits")
    return {f: build_tiny_pipeline(root / f, family=f, sample_size=8, block_out_channels=(32, 64)) for f in DITS}


def load(family, folder):
    import diffusers

    return getattr(diffusers, PIPELINES[family]).from_pretrained(folder, local_files_only=True)


def record(base: str) -> dict:
    """What an erase run records (erase_config.json), as far as the export and the card read it."""
    from erase.export.folder import versions

    return {"pretrained_model_name_or_path": base, "base_model": {"path": base}, "concept": "nudity", "method": "scissorhands",
            "concept_prompts": {"name": "nudity", "forget_prompts": ["nudity"]}, "num_processes": 1, "method_config": {},
            "settings": {"targets": "text", "max_train_steps": 2, "lr": 1e-4, "train_batch_size": 1, "gradient_accumulation_steps": 1, "seed": 0},
            "targets": {"num_tensors": 2, "num_parameters": 100}, "data": {"forget": {"count": 2, "source": "generated"}},
            "wall_seconds": 1.0, "versions": versions()}


def erase_some(model, modules, seed: int = 0) -> dict:
    """A rank-2 change to each module's weight; returns the base tensors of the changed weights."""
    g = torch.Generator().manual_seed(seed)
    params, base = dict(model.named_parameters()), {}
    with torch.no_grad():
        for m in modules:
            w = params[f"{m}.weight"]
            base[f"{m}.weight"] = w.detach().clone()
            w.add_((0.05 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w[0].numel(), generator=g)).view_as(w))
    return base


@pytest.mark.parametrize("family", DITS)
def test_tiny_mmdit_pipelines_load_offline_and_generate(dits, family):
    """Each fixture is a real pipeline folder of its family: its components' types and structure, locally built CLIP
    and T5 tokenizers, and a 32 px image in two steps."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel, T5TokenizerFast

    pipe = load(family, dits[family])
    t = pipe.transformer.config
    if family.startswith("sd3"):
        assert [type(e) for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)] == [CLIPTextModelWithProjection] * 2 + [T5EncoderModel]
        assert isinstance(pipe.tokenizer_3, T5TokenizerFast) and t.num_layers * 64 == t.num_attention_heads * t.attention_head_dim
        assert t.pooled_projection_dim == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
        assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(t.pooled_projection_dim // 3))
        assert (t.qk_norm, list(t.dual_attention_layers)) == (("rms_norm", [0]) if family == "sd35" else (None, []))
    else:
        assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is T5EncoderModel
        assert isinstance(pipe.tokenizer_2, T5TokenizerFast) and t.guidance_embeds == (family == "flux_dev")
        assert t.in_channels == 4 * pipe.vae.config.latent_channels and sum(t.axes_dims_rope) == t.attention_head_dim
    ids = (pipe.tokenizer_3 if family.startswith("sd3") else pipe.tokenizer_2)("a photo of ü").input_ids
    assert ids[-1] == 1 and 2 in ids  # </s> appended; a character outside the vocabulary is <unk>
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a church", height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and bool(torch.isfinite(torch.as_tensor(image)).all()) and float(image.std()) > 0.01


@pytest.mark.parametrize("family", DITS)
def test_transformer_exports_load_back_through_diffusers(dits, family, tmp_path):
    """diffusers folder + delta + card, single file (bit for bit through ``from_single_file``), LoRA (through
    ``load_lora_weights``): all named after the transformer; then the offline converter on a diffusers-only export."""
    from erase.export.convert import main as convert_main
    from erase.export.folder import export
    from erase.export.formats import ExportSpec

    base_dir = dits[family]
    pipe = load(family, base_dir)
    base = erase_some(pipe.transformer, CHANGED[family])
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2") + (("text_encoder_3",) if family.startswith("sd3") else ())
    erased = {p: {k: v.detach().clone() for k, v in getattr(pipe, p).state_dict().items()} for p in parts}
    out = tmp_path / "out"
    out.mkdir()
    config = record(base_dir)
    export(out, pipe.transformer, base, config, spec=ExportSpec(("diffusers", "single_file", "lora"), "fp32", 2, None))

    files = set(json.loads((out / "erase_config.json").read_text())["export"]["files"])
    assert {"transformer", "transformer_delta.safetensors", "erased.safetensors", "erased_lora.safetensors"} <= files
    assert not any(f.startswith("unet") for f in files)
    assert set(load_file(str(out / "transformer_delta.safetensors"))) == set(base)
    ex = config["export"]
    assert (ex["denoiser"], ex["family"], ex["details"]["single_file"]["family"]) == ("transformer", family, family)
    card = (out / "README.md").read_text()
    assert f"{type(pipe.transformer).__name__}.from_pretrained" in card and f"from diffusers import {PIPELINES[family]}" in card
    assert "transformer_delta.safetensors" in card and "unet" not in card

    with safe_open(str(out / "erased.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    if family.startswith("sd3"):
        assert {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "first_stage_model.decoder.conv_in.weight",
                "text_encoders.clip_g.transformer.text_projection.weight", "text_encoders.t5xxl.transformer.shared.weight"} <= keys
        assert ("model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in keys) == (family == "sd35")
    else:
        assert {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.single_blocks.0.linear1.weight",
                "vae.decoder.conv_in.weight", "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"} <= keys
        assert ("model.diffusion_model.guidance_in.in_layer.weight" in keys) == (family == "flux_dev")
    assert meta["modelspec.architecture"] == {"sd3": "stable-diffusion-3-medium", "sd35": "stable-diffusion-3-5-medium",
                                              "flux_dev": "flux-1-dev", "flux_schnell": "flux-1-schnell"}[family]
    cls = type(pipe)
    # diffusers' Flux converter hard-codes the released width (3072): at this width the transformer is given and the
    # layout is read back at the released width in test_flux_transformer_single_file_at_released_width
    extra = {"transformer": pipe.transformer} if family.startswith("flux") else {}
    back = cls.from_single_file(str(out / "erased.safetensors"), config=base_dir, local_files_only=True, **extra)
    for part in parts:
        got = getattr(back, part).state_dict()
        assert got.keys() == erased[part].keys() and all(torch.equal(got[k], v) for k, v in erased[part].items()), part

    fresh = load(family, base_dir)
    fresh.load_lora_weights(str(out), weight_name="erased_lora.safetensors")
    fresh.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in fresh.transformer.state_dict().items() if "lora_" not in k}
    for name in base:
        torch.testing.assert_close(fused[name], erased["transformer"][name], rtol=1e-5, atol=1e-5)

    plain = tmp_path / "plain"
    plain.mkdir()
    export(plain, pipe.transformer, base, record(base_dir))
    assert convert_main([str(plain), "--export_format", "single_file", "--export_dtype", "fp32"]) == 0
    assert load_file(str(plain / "erased.safetensors")).keys() == keys


def test_flux_transformer_single_file_at_released_width(tmp_path):
    """diffusers reads Flux single files only at FLUX.1's width (its converter splits ``linear1`` at 3072 / 12288): the
    BFL layout of a 3072-wide transformer (one double, one single block) comes back bit for bit."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from erase.export.layouts import materialize
    from erase.export.layouts.flux import PREFIX, transformer_to_flux

    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, joint_attention_dim=64, pooled_projection_dim=32,
                                       guidance_embeds=True)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.named_parameters():  # random positive finite bf16 values: bit patterns below 0x7F00
        state[name] = torch.randint(0, 0x7F00, p.shape, generator=g, dtype=torch.int16).view(torch.bfloat16)
    model.save_config(str(tmp_path / "transformer"))
    save_file(materialize({PREFIX + k: v for k, v in transformer_to_flux(state).items()}), str(tmp_path / "flux.safetensors"))
    back = FluxTransformer2DModel.from_single_file(str(tmp_path / "flux.safetensors"), config=str(tmp_path), subfolder="transformer",
                                                   torch_dtype=torch.bfloat16, local_files_only=True)
    got = back.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())


def test_float_noise_gets_no_lora_factors():
    """A tensor whose every entry moved by an ulp (a round trip, not an edit) gets no factors (an SVD of noise is
    full-rank); a real change beside it does, and the noise counts in the error."""
    from erase.export.lora import NOISE_ULPS, extract_lora, float_noise

    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(64, 32, generator=g), "b.weight": torch.randn(64, 32, generator=g)}
    noisy = torch.nextafter(base["a.weight"], torch.full_like(base["a.weight"], float("inf")))
    changed = base["b.weight"] + torch.randn(64, 1, generator=g) @ torch.randn(1, 32, generator=g)
    tensors, stats = extract_lora({"a.weight": noisy, "b.weight": changed}, base, energy=0.99)
    assert stats["float_noise"] == ["a.weight"] and set(stats["per_tensor"]) == {"b.weight"}
    assert not any(k.startswith("lora_unet_a.") for k in tensors) and stats["per_tensor"]["b.weight"]["rank"] == 1
    assert 0 < stats["rel_error"] < 1e-5
    far = base["a.weight"] + (NOISE_ULPS + 2) * (noisy - base["a.weight"])
    assert float_noise(noisy, base["a.weight"]) and not float_noise(far, base["a.weight"])
