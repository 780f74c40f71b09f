"""Export formats (issue 12): the single file loads back through diffusers' own ``from_single_file`` bit for bit for
SD 1.x (an erase/sd.py run on the tiny pipeline), SD 2.x and SDXL (tiny random pipelines built here); the LoRA loads
through ``load_lora_weights`` and is the SVD it claims; bad export flags are one line before any work; a failed
export leaves the folder as it was; ``python -m erase.export`` adds formats to a finished run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eval_fixtures import USER_FACING, error_text, random_image_folders

SMALL = ["--saliency_batches", "1", "--log_every", "1", "--lr", "1e-3", "--topk", "20", "--max_train_steps", "2"]


def run(args):
    from erase.sd import main, parse_args

    return main(parse_args([str(a) for a in args]))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return random_image_folders(tmp_path_factory.mktemp("images"), seed=0)


def flags(tiny, images, out, *extra):
    return ["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--forget_images", images / "forget",
            "--retain_images", images / "retain", "--data_dir", images / "data", "--output_dir", out, *SMALL, *extra]


@pytest.fixture(scope="module")
def exported(tiny, images, tmp_path_factory):
    """Two steps of Scissorhands on the tiny SD 1.x pipeline, exported in all three formats."""
    out = tmp_path_factory.mktemp("runs") / "all"
    run(flags(tiny, images, out, "--export_format", "lora,single_file,diffusers"))
    return out


def states(pipe, parts=("unet", "vae", "text_encoder")):
    return {p: {k: v.detach().clone() for k, v in getattr(pipe, p).state_dict().items()} for p in parts}


def assert_bitwise(loaded: dict, expected: dict, dtype):
    assert loaded.keys() == expected.keys()
    bad = [k for k in expected if loaded[k].dtype != dtype or not torch.equal(loaded[k], expected[k].to(dtype))]
    assert not bad, bad[:3]


# ----------------------------------------------------------------------------------------------- SD 1.x end to end
def test_single_file_loads_back_bit_for_bit(tiny, exported):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    path = exported / "erased.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert meta["format"] == "erase-single-file" and meta["family"] == "sd1" and meta["dtype"] == "fp16"
    assert json.loads(meta["settings"])["topk"] == 20 and meta["concept"] == "nudity" and meta["method"] == "scissorhands"
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "model.diffusion_model.out.2.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert q.ndim == 4 and q.shape[2:] == (1, 1)  # the original VAE attention is a 1x1 convolution
    assert not any(k.startswith(("down_blocks", "unet.", "vae.")) for k in keys)

    back = StableDiffusionPipeline.from_single_file(str(path), config=tiny, local_files_only=True, torch_dtype=torch.float16)
    erased = UNet2DConditionModel.from_pretrained(str(exported), subfolder="unet")
    base = StableDiffusionPipeline.from_pretrained(tiny)
    assert_bitwise(back.unet.state_dict(), erased.state_dict(), torch.float16)
    assert_bitwise(back.vae.state_dict(), base.vae.state_dict(), torch.float16)
    assert_bitwise(back.text_encoder.state_dict(), base.text_encoder.state_dict(), torch.float16)
    assert not torch.equal(back.unet.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
                           base.unet.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"].half())


def test_lora_is_the_truncated_svd_and_loads_through_diffusers(tiny, exported):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    lora = load_file(str(exported / "erased_lora.safetensors"))
    stats = json.loads((exported / "erased_lora.json").read_text())
    erased = UNet2DConditionModel.from_pretrained(str(exported), subfolder="unet").state_dict()
    base_pipe = StableDiffusionPipeline.from_pretrained(tiny)
    base = {k: v.clone() for k, v in base_pipe.unet.state_dict().items()}
    assert stats["energy"] == 0.99 and stats["tensors"] == 16 and len(lora) == 3 * 16
    assert len({s["rank"] for s in stats["per_tensor"].values()}) > 1  # ranks differ: each tensor's scale must still be right
    # the 4 to_out.0 biases changed too: a LoRA cannot hold them, and they count in the whole-change error
    assert sorted(stats["left_out"]) == sorted(k for k in erased if k.endswith("to_out.0.bias") and "attn2" in k)
    for name, st in stats["per_tensor"].items():
        key = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
        assert st["key"] == key and lora[f"{key}.alpha"].item() == 1.0  # one alpha: the loader's scale is 1 / rank
        down, up = lora[f"{key}.lora_down.weight"].double(), lora[f"{key}.lora_up.weight"].double()
        assert down.shape[0] == up.shape[1] == st["rank"] <= st["full_rank"]
        change = erased[name].double() - base[name].double()
        err = float(torch.linalg.norm(change - (up @ down) / st["rank"]) / torch.linalg.norm(change))
        assert err == pytest.approx(st["rel_error"], rel=1e-6, abs=1e-9)
        assert st["energy_kept"] >= 0.99 and err <= 0.1 + 1e-3  # energy 0.99 leaves at most 10 % of the norm (+ fp16)
    with safe_open(str(exported / "erased_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["per_tensor"]) == {n: {"rank": s["rank"], "rel_error": round(s["rel_error"], 6)}
                                              for n, s in stats["per_tensor"].items()}

    # diffusers' kohya converter maps every key (it raises on one it cannot place); fused, W = base + up @ down
    base_pipe.load_lora_weights(str(exported), weight_name="erased_lora.safetensors")
    base_pipe.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in base_pipe.unet.state_dict().items() if "lora_" not in k}
    for name, st in stats["per_tensor"].items():
        key = st["key"]
        want = base[name] + (lora[f"{key}.lora_up.weight"].float() @ lora[f"{key}.lora_down.weight"].float()) / st["rank"]
        torch.testing.assert_close(fused[name], want, rtol=1e-5, atol=1e-6)
    untouched = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(fused[untouched], base[untouched])


def test_full_rank_lora_equals_the_change(tiny, exported, tmp_path):
    """The offline converter on a finished run: --lora_rank at the full rank in fp32 reproduces the change exactly
    (so the error of the default LoRA is the truncation's, not the layout's); the formats it had stay."""
    from erase.export.convert import main as convert_main

    out = tmp_path / "copy"
    shutil.copytree(exported, out)
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert convert_main([str(out), "--export_format", "lora", "--lora_rank", "64", "--export_dtype", "fp32"]) == 0
    stats = json.loads((out / "erased_lora.json").read_text())
    assert all(s["rank"] == s["full_rank"] for s in stats["per_tensor"].values())
    assert stats["max_rel_error"] < 1e-6 and stats["dtype"] == "float32"
    cfg = json.loads((out / "erase_config.json").read_text())
    assert cfg["export"]["formats"] == ["diffusers", "single_file", "lora"] and cfg["export"]["details"]["lora"]["rank"] == 64
    assert {"unet", "erased.safetensors", "erased_lora.safetensors", "erased_lora.json", "README.md"} <= set(cfg["export"]["files"])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert "rank 64" in (out / "README.md").read_text()


def test_config_and_card_name_every_format(exported):
    cfg = json.loads((exported / "erase_config.json").read_text())
    ex = cfg["export"]
    assert ex["formats"] == ["diffusers", "single_file", "lora"] and ex["spec"]["dtype"] == "fp16"
    assert {"unet", "unet_delta.safetensors", "erased.safetensors", "erased_lora.safetensors", "erased_lora.json"} <= set(ex["files"])
    assert ex["details"]["single_file"]["family"] == "sd1" and ex["details"]["single_file"]["pipeline_class"] == "StableDiffusionPipeline"
    lo = ex["details"]["lora"]
    card = (exported / "README.md").read_text()
    assert "erased.safetensors" in card and "from_single_file" in card and "models/Stable-diffusion/" in card
    assert "erased_lora.safetensors" in card and "load_lora_weights" in card and "models/loras/" in card
    assert f"{100 * lo['rel_error']:.2f} %" in card and "not the full export" in card


def test_offline_converter_from_a_diffusers_only_run(tiny, images, tmp_path):
    """A run exported as diffusers only (the default) gains a single file; a folder that is not an export is one line."""
    from diffusers import StableDiffusionPipeline

    from erase.export.convert import main as convert_main

    out = tmp_path / "plain"
    run(flags(tiny, images, out))
    assert not (out / "erased.safetensors").exists()
    (out / "notes.txt").write_text("mine")
    convert_main([str(out), "--export_format", "single_file", "--export_dtype", "fp32"])
    back = StableDiffusionPipeline.from_single_file(str(out / "erased.safetensors"), config=tiny, local_files_only=True)
    erased = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_bitwise(back.unet.state_dict(), erased, torch.float32)
    assert (out / "notes.txt").read_text() == "mine" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(USER_FACING) as err:
        convert_main([tiny, "--export_format", "lora"])
    assert "no erase_config.json" in error_text(err)


# ----------------------------------------------------------------------------------------------- bad input, atomicity
@pytest.mark.parametrize("extra, words", [
    (["--export_format", "diffusers,ckpt"], "--export_format 'ckpt' is not an export format; allowed: a comma list of diffusers, single_file, lora"),
    (["--export_format", "lora,"], "has an empty name"),
    (["--lora_rank", "0"], "--lora_rank 0 is not allowed; allowed: an integer >= 1"),
    (["--lora_energy", "0"], "--lora_energy 0 is outside the allowed range (0, 1]"),
    (["--lora_energy", "1.5"], "--lora_energy 1.5 is outside the allowed range (0, 1]"),
    (["--lora_energy", "nan"], "--lora_energy nan is not a finite number"),
    (["--lora_rank", "4", "--lora_energy", "0.9"], "both given"),
    (["--export_pipeline", "--export_format", "lora"], "--export_pipeline writes the diffusers format"),
], ids=["format", "empty", "rank", "energy0", "energy>1", "nan", "both", "pipeline"])
def test_bad_export_flags_are_one_line_before_any_work(tiny, images, tmp_path, capsys, extra, words):
    from erase.sd import parse_args

    with pytest.raises(SystemExit) as err:
        parse_args([str(a) for a in flags(tiny, images, tmp_path / "o", *extra)])
    assert err.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_export_folder_that_is_the_base_is_refused(tiny, images, capsys):
    from erase.sd import main, parse_args

    before = sorted(p.name for p in Path(tiny).rglob("*"))
    with pytest.raises(USER_FACING) as err:
        main(parse_args([str(a) for a in flags(tiny, images, tiny, "--export_format", "single_file")]))
    assert "base model folder" in error_text(err)
    assert sorted(p.name for p in Path(tiny).rglob("*")) == before


def test_a_failed_single_file_leaves_the_folder_as_it_was(tiny, exported, images, tmp_path, monkeypatch):
    """A write that dies half way (a full disk, a kill) leaves the previous export whole and no file of the new one."""
    import erase.export.formats as formats

    out = tmp_path / "o"
    shutil.copytree(exported, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def dies(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")  # the first bytes of a file that never gets finished
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats, "save_file", dies)
    with pytest.raises(USER_FACING) as err:
        run(flags(tiny, images, out, "--export_format", "single_file"))
    assert "nothing was exported, the folder is as it was" in error_text(err)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") and "tmp" in p.name]


# ----------------------------------------------------------------------------------------------- SD 2.x and SDXL
def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=32)


def _text(tok, hidden, act, cls=None, **extra):
    from transformers import CLIPTextModel

    from eval.tiny import text_config as _text_config

    config = _text_config(tok, hidden, 77)
    config.hidden_act = act
    for k, v in extra.items():
        setattr(config, k, v)
    return (cls or CLIPTextModel)(config)


def tiny_sd2(path):
    """SD 2.x shape: per-block attention heads, linear projections, an OpenCLIP-style (gelu) text encoder, v-prediction."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from eval.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text(tok, 32, "gelu"), tokenizer=tok, unet=unet,
                                   scheduler=EulerDiscreteScheduler(prediction_type="v_prediction", steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return pipe


def tiny_sdxl(path, prediction_type: str = "epsilon"):
    """SDXL shape: text_time added conditioning, two text encoders (CLIP 32 wide, OpenCLIP 64 wide with a projection),
    two transformer layers in the second block, two resnets per block (``v_prediction``: an SDXL v-prediction finetune)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from eval.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=96, attention_head_dim=(2, 4), use_linear_projection=True,
                                transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=16 + 6 * 8)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text(tok, 32, "quick_gelu"), tokenizer=tok,
                                     text_encoder_2=_text(tok, 64, "gelu", CLIPTextModelWithProjection, projection_dim=16),
                                     tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1, prediction_type=prediction_type))
    pipe.save_pretrained(str(path))
    return pipe


@pytest.mark.parametrize("family", ["sd2", "sdxl", "sdxl_v"])
def test_sd2_and_sdxl_single_files_load_back_through_from_single_file(family, tmp_path):
    """The converter for the other families, through diffusers' own loader offline (tiny configs from the folder): the
    family is detected from the configs, the UNet (a changed weight included), VAE and text encoders come back bit for
    bit; the metadata and markers say how to sample (SD 2.x 768-v, an SDXL v-prediction finetune)."""
    import diffusers

    from erase.export.formats import ExportSpec
    from erase.export.single_file import write as write_single_file

    base = tmp_path / "base"
    pipe = tiny_sd2(base) if family == "sd2" else tiny_sdxl(base, "v_prediction" if family == "sdxl_v" else "epsilon")
    parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ())
    with torch.no_grad():  # an "erased" UNet: one cross-attention weight changed
        w = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
        w.add_(torch.randn_like(w))
    expected = states(pipe, parts)
    config = {"base_model": {"path": str(base)}, "pretrained_model_name_or_path": str(base), "concept": "x", "method": "scissorhands",
              "settings": {"lr": 1}}
    (tmp_path / "out").mkdir()
    rec = write_single_file(tmp_path / "out", pipe.unet, {}, config, ExportSpec(("single_file",), "fp16"))
    assert rec["family"] == family.removesuffix("_v")
    with safe_open(str(tmp_path / "out" / "erased.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["modelspec.architecture"] == {"sd2": "stable-diffusion-v2-768-v"}.get(family, "stable-diffusion-xl-v1-base")
    assert ("v_pred" in keys) == (family == "sdxl_v")  # ComfyUI samples an SDXL file as epsilon without it
    if family == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    else:
        assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
        assert {"conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight",
                "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias"} <= keys
    cls = getattr(diffusers, rec["pipeline_class"])
    back = cls.from_single_file(str(tmp_path / "out" / "erased.safetensors"), config=str(base), local_files_only=True,
                                torch_dtype=torch.float16)
    for part in parts:
        assert_bitwise(getattr(back, part).state_dict(), expected[part], torch.float16)


@pytest.mark.parametrize("style", ["kohya_sgm", "kohya"])
def test_sdxl_lora_loads_through_diffusers(tmp_path, style):
    """SDXL LoRAs are written in the original SGM names (``lora_unet_input_blocks_4_1_...``, as kohya writes them:
    A1111 drops diffusers-named add_embedding / upsampler keys); diffusers renumbers them onto its blocks, and reads
    diffusers-named kohya keys as well."""
    from erase.export.lora import extract_lora

    pipe = tiny_sdxl(tmp_path / "base")
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    name = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v.weight"
    erased = {name: base[name] + torch.randn(64, 1) @ torch.randn(1, 96)}  # a rank-1 change
    tensors, stats = extract_lora(erased, base, energy=0.99, style=style, config=dict(pipe.unet.config))
    assert stats["per_tensor"][name]["rank"] == 1 and stats["rel_error"] < 1e-6
    key = {"kohya_sgm": "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v",
           "kohya": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_v"}[style]
    assert stats["per_tensor"][name]["key"] == key and f"{key}.lora_down.weight" in tensors
    save_file(tensors, str(tmp_path / "l.safetensors"))
    pipe.load_lora_weights(str(tmp_path), weight_name="l.safetensors")
    pipe.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    torch.testing.assert_close(fused[name], erased[name], rtol=1e-5, atol=1e-5)


def test_layouts_refuse_what_they_cannot_place():
    from erase.export.layouts.ldm import detect_family, LayoutError, unet_to_ldm

    with pytest.raises(LayoutError, match="class_embedding.linear_1.weight"):
        unet_to_ldm({"class_embedding.linear_1.weight": torch.zeros(1)}, {"layers_per_block": 1, "up_block_types": ["UpBlock2D"]})
    with pytest.raises(LayoutError, match="2 text encoders"):
        detect_family({}, [{}, {}])
    assert detect_family({}, [{"hidden_act": "quick_gelu", "hidden_size": 768}])[0] == "sd1"
    assert detect_family({}, [{"hidden_act": "gelu", "hidden_size": 1024}])[0] == "sd2"


def test_conv_lora_loads_through_diffusers(tiny, tmp_path):
    """A convolution's change (``--targets full``) is reshaped for the SVD and stored as kohya's conv pair: down
    ``(r, in, 3, 3)``, up ``(out, r, 1, 1)``; diffusers applies it as that weight change."""
    from diffusers import StableDiffusionPipeline

    from erase.export.lora import extract_lora

    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    name = "down_blocks.0.resnets.0.conv1.weight"  # (32, 32, 3, 3)
    change = (torch.randn(32, 2) @ torch.randn(2, 32 * 9)).reshape(32, 32, 3, 3)  # rank 2
    tensors, stats = extract_lora({name: base[name] + change}, base, rank=2)
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{key}.lora_down.weight"].shape == (2, 32, 3, 3) and tensors[f"{key}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert stats["per_tensor"][name]["rel_error"] < 1e-6
    save_file(tensors, str(tmp_path / "c.safetensors"))
    pipe.load_lora_weights(str(tmp_path), weight_name="c.safetensors")
    pipe.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    torch.testing.assert_close(fused[name], base[name] + change, rtol=1e-5, atol=1e-5)
