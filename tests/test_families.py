"""Model families (erase.diffusion.families) end to end on tiny random SD 1.x / 2.x / XL pipelines (eval.tiny, 16 px images).

Each tiny pipeline and its forget data are built once for the module. Launched runs: SD 2.x scissorhands with a
full-pipeline export (1 process) and SDXL scissorhands on 2 CPU processes (== 1 process). Everything else runs
in-process: SDXL checkpoint + resume, every other method on SDXL, the I2P audit per family, detection errors.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from eval_fixtures import DATA, USER_FACING, bright_judge, error_text
from safetensors.torch import load_file
from test_sd import SMALL, SMALL_DATA, in_process, launch, unet_state

FAMILIES = ("sd1", "sd2", "sdxl")
TINY = {"sample_size": 8, "block_out_channels": (8, 16), "cross_attention_dim": 16}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from eval.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("families")
    return {f: build_tiny_pipeline(root / f, family=f, **TINY) for f in FAMILIES}


@pytest.fixture(scope="module")
def data(pipes, tmp_path_factory):
    """Forget images + cached latents per family (a 0-step run), shared by every run of that family here."""
    out = {}
    for f in ("sd2", "sdxl"):
        out[f] = tmp_path_factory.mktemp(f"data-{f}")
        in_process(["--pretrained_model_name_or_path", pipes[f], "--concept", "nudity", "--output_dir", tmp_path_factory.mktemp("prep"),
                    "--data_dir", out[f], *SMALL_DATA, "--max_train_steps", 0, "--method", "ft", "--num_retain_images", 2])
    return out


def _attn2_projections(folder) -> list[str]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    return [n for n, _ in unet.named_parameters() if ".attn2.to_" in n]


def test_detection_list_targets_and_force(pipes, tmp_path, capsys):
    from erase.diffusion.families import detect
    from erase.sd import parse_args

    assert {f: detect(p).name for f, p in pipes.items()} == {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
    for f, p in pipes.items():
        info = in_process(["--pretrained_model_name_or_path", p, "--list_targets"])
        expected = _attn2_projections(p)
        assert info["model_family"] == f and sorted(info["tensors"]) == sorted(expected)
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0].startswith(f"# model family: {f} (") and lines[-1].startswith(f"# {len(expected)} tensors, ")
    # SDXL: more transformer depth below (1, 2 blocks): 8 attn2 modules x 5 tensors; noxattn leaves add_embedding out
    assert len(_attn2_projections(pipes["sdxl"])) == 40
    u = in_process(["--pretrained_model_name_or_path", pipes["sdxl"], "--list_targets", "--targets", "noxattn"])
    assert not any(n.startswith("add_embedding.") or ".attn2." in n for n in u["tensors"]) and "conv_in.weight" in u["tensors"]
    # forcing: sd1 <-> sd2 share every code path; sdxl against a UNet without text_time (or the reverse) is one line
    assert parse_args(["--pretrained_model_name_or_path", pipes["sd2"], "--concept", "nudity", "--model_family", "sd1"]).family.name == "sd1"
    for force, folder, found in (("sdxl", pipes["sd1"], "sd1"), ("sd2", pipes["sdxl"], "sdxl")):
        with pytest.raises(SystemExit) as err:
            parse_args(["--pretrained_model_name_or_path", folder, "--concept", "nudity", "--model_family", force])
        line = capsys.readouterr().err.strip()
        assert err.value.code == 2 and "\n" not in line
        assert f"--model_family: model family '{force}' contradicts" in line and f"so it is {found}" in line
    with pytest.raises(SystemExit):
        parse_args(["--concept", "nudity", "--model_family", "sd4"])
    assert "invalid choice: 'sd4'" in capsys.readouterr().err
    for force in ("sd3", "flux"):  # a UNet is never forced into a transformer family
        with pytest.raises(SystemExit):
            parse_args(["--pretrained_model_name_or_path", pipes["sd1"], "--concept", "nudity", "--model_family", force])
        assert f"model family '{force}' contradicts" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["PixArtAlphaPipeline", "SanaPipeline", None])
def test_other_transformer_models_are_refused_in_one_line(tmp_path, capsys, kind):
    from erase.diffusion.generate import load_pipeline
    from erase.utils.errors import UserError
    from erase.sd import parse_args

    folder = tmp_path / "other"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    if kind:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": kind, "transformer": ["diffusers", "X"]}))
    with pytest.raises(SystemExit) as err:
        parse_args(["--pretrained_model_name_or_path", str(folder), "--concept", "nudity", "--output_dir", str(tmp_path / "out")])
    line = capsys.readouterr().err.strip()
    assert err.value.code == 2 and "\n" not in line
    assert f"is a {kind or 'PixArtTransformer2DModel'} model, whose transformer is none this toolkit erases from" in line
    assert ("supported families: sd1 (Stable Diffusion 1.x), sd2 (Stable Diffusion 2.x), sdxl (Stable Diffusion XL), "
            "sd3 (Stable Diffusion 3 / 3.5), flux (FLUX.1 (dev, schnell))") in line
    if kind:
        with pytest.raises(UserError, match="supported families"):
            load_pipeline(str(folder))
    assert not (tmp_path / "out").exists()


def test_prompt_encoding_matches_the_family_pipelines(pipes):
    """The packed conditioning and the UNet kwargs are exactly what the family's own pipeline feeds its UNet."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from erase.diffusion.families import Conditioner, FAMILIES, load_text

    prompts = ["a photo of a cat", "an apple on the table"]
    sd2 = StableDiffusionPipeline.from_pretrained(pipes["sd2"], safety_checker=None)
    text = load_text(FAMILIES["sd2"], pipes["sd2"])
    ref, _ = sd2.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(text.encode(prompts, "cpu"), ref, rtol=0, atol=0)
    assert sd2.scheduler.config.prediction_type == "v_prediction" and sd2.text_encoder.config.hidden_act == "gelu"

    xl = StableDiffusionXLPipeline.from_pretrained(pipes["sdxl"], add_watermarker=False)
    text = load_text(FAMILIES["sdxl"], pipes["sdxl"])
    embeds, neg, pooled, neg_pooled = xl.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    packed = text.encode(prompts, "cpu")
    cond = Conditioner(FAMILIES["sdxl"], 16, text.pooled_dim())
    kwargs = cond(packed)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], pooled, rtol=0, atol=0)
    time_ids = xl._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=text.pooled_dim())
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["time_ids"], time_ids.expand(2, -1))
    uncond = cond(text.uncond("cpu"))  # force_zeros_for_empty_prompt: the unconditional branch is zeros
    assert torch.count_nonzero(neg) == 0 and torch.equal(uncond["encoder_hidden_states"], neg[:1])
    assert torch.equal(uncond["added_cond_kwargs"]["text_embeds"], neg_pooled[:1])
    # and the UNet call is the pipeline's: same output for the same latents
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 20])
    with torch.no_grad():
        ours = xl.unet(z, t, **kwargs).sample
        theirs = xl.unet(z, t, encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(2, -1)}).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _generates(pipe, size=16):
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a photo of a church", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, size, size, 3) and float(img.std()) > 0
    return img


def test_sd2_launch_export_pipeline(pipes, data, tmp_path):
    """SD 2.x (v-prediction) through `accelerate launch erase/sd.py`; the export is a full StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from erase.diffusion.generate import load_pipeline

    out = tmp_path / "sd2"
    launch(["--pretrained_model_name_or_path", pipes["sd2"], "--concept", "nudity", "--output_dir", out, "--data_dir", data["sd2"],
            *SMALL, "--max_train_steps", 2, "--lr", "1e-3", "--topk", 20, "--export_pipeline"])
    cfg = json.loads((out / "erase_config.json").read_text())
    assert cfg["model_family"] == "sd2" and cfg["pipeline_class"] == "StableDiffusionPipeline"
    assert cfg["adapter"]["prediction_type"] == "v_prediction" and cfg["adapter"]["hidden_state"] == "last"
    assert cfg["delta"]["tensors_changed"] > 0 and all(".attn2." in n for n in cfg["delta"]["per_tensor"])
    unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    assert unet.config.use_linear_projection and unet.config.cross_attention_dim == 16
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    name = next(iter(cfg["delta"]["per_tensor"]))
    assert torch.equal(pipe.unet.state_dict()[name], unet.state_dict()[name])
    _generates(pipe)
    assert type(load_pipeline(str(out))).__name__ == "StableDiffusionPipeline"


@pytest.fixture(scope="module")
def sdxl_run(pipes, data, tmp_path_factory):
    """4 in-process scissorhands steps on SDXL with a checkpoint at step 2 (unet/ export over the base)."""
    out = tmp_path_factory.mktemp("sdxl") / "erased"
    in_process(["--pretrained_model_name_or_path", pipes["sdxl"], "--concept", "nudity", "--output_dir", out, "--data_dir", data["sdxl"],
                *SMALL, "--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 2, "--lr", "1e-3", "--topk", 20])
    return out


def test_sdxl_export_loads_over_its_base(pipes, sdxl_run):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from erase.diffusion.generate import load_pipeline

    cfg = json.loads((sdxl_run / "erase_config.json").read_text())
    assert cfg["model_family"] == "sdxl" and cfg["pipeline_class"] == "StableDiffusionXLPipeline"
    assert cfg["adapter"]["time_ids"] == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    assert cfg["adapter"]["pooled_dim"] == 12  # text_encoder_2's width: 3/4 of cross_attention_dim 16 (eval.tiny)
    assert cfg["adapter"]["hidden_state"] == "penultimate" and cfg["targets"]["num_tensors"] == 40
    unet = UNet2DConditionModel.from_pretrained(str(sdxl_run), subfolder="unet")
    new, base = unet.state_dict(), load_file(f"{pipes['sdxl']}/unet/diffusion_pytorch_model.safetensors")
    changed = [n for n in new if not torch.equal(new[n], base[n])]
    assert changed and all(".attn2." in n for n in changed) and sorted(changed) == sorted(cfg["delta"]["per_tensor"])
    pipe = StableDiffusionXLPipeline.from_pretrained(pipes["sdxl"], unet=unet, add_watermarker=False)
    a = _generates(pipe)
    audit = load_pipeline(str(sdxl_run), scheduler="ddim")  # what eval.i2p / eval.utility load: unet/ over the base
    assert type(audit).__name__ == "StableDiffusionXLPipeline" and torch.equal(audit.unet.state_dict()[changed[0]], new[changed[0]])
    assert "StableDiffusionXLPipeline.from_pretrained" in (sdxl_run / "README.md").read_text()
    assert not (sdxl_run / "model_index.json").exists() and a.shape == (1, 16, 16, 3)


def test_sdxl_resume_equals_uninterrupted(pipes, data, sdxl_run, tmp_path):
    shutil.copytree(sdxl_run / "checkpoint-2", tmp_path / "checkpoint-2")
    in_process(["--pretrained_model_name_or_path", pipes["sdxl"], "--concept", "nudity", "--output_dir", tmp_path, "--data_dir", data["sdxl"],
                *SMALL, "--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 2, "--lr", "1e-3", "--topk", 20,
                "--resume_from_checkpoint", "latest"])
    a, b = unet_state(sdxl_run), unet_state(tmp_path)
    assert all(torch.equal(a[n], b[n]) for n in a)
    cfg = json.loads((tmp_path / "erase_config.json").read_text())
    assert cfg["resumed_from"].endswith("checkpoint-2") and [r["step"] for r in cfg["history"]] == [3, 4]


def test_sdxl_two_processes_match_one(pipes, data, tmp_path):
    """As tests/test_sd.py's SD 1.x test: DDP on 2 CPU processes, batch 1 == 1 process, batch 2 (same tolerance);
    the 2-process run also exports the full SDXL pipeline."""
    common = ["--pretrained_model_name_or_path", pipes["sdxl"], "--concept", "nudity", "--data_dir", data["sdxl"], *SMALL,
              "--max_train_steps", 3, "--lr", "0.05", "--optimizer", "sgd", "--topk", 100, "--lam", "0.5"]
    launch([*common, "--output_dir", tmp_path / "two", "--train_batch_size", 1, "--export_pipeline"], nproc=2)
    in_process([*common, "--output_dir", tmp_path / "one", "--train_batch_size", 2])
    two, one = unet_state(tmp_path / "two"), unet_state(tmp_path / "one")
    # --export_pipeline wrote the family's pipeline: a StableDiffusionXLPipeline folder that generates
    from diffusers import StableDiffusionXLPipeline

    index = json.loads((tmp_path / "two" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
    _generates(StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "two"), add_watermarker=False))
    base = load_file(f"{pipes['sdxl']}/unet/diffusion_pytorch_model.safetensors")
    cfg = json.loads((tmp_path / "two" / "erase_config.json").read_text())
    assert cfg["num_processes"] == 2 and cfg["model_family"] == "sdxl"
    for n in two:
        if ".attn2." not in n:
            assert torch.equal(two[n], base[n]), n
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(two[n], base[n]) for n in two)


@pytest.mark.parametrize("row", [
    ["--method", "esd", "--esd_ddim_steps", "2", "--targets", "noxattn"],
    ["--method", "salun", "--mask_ratio", "30"],
    ["--method", "ga", "--forget_bound", "5"],
    ["--method", "ft"],
    ["--method", "l1sparse"],
], ids=["esd", "salun", "ga", "ft", "l1sparse"])
def test_methods_on_sdxl(pipes, data, tmp_path, row):
    saliency = ["--saliency_batches", 1] if row[1] == "salun" else []  # an option of the saliency methods only
    in_process(["--pretrained_model_name_or_path", pipes["sdxl"], "--concept", "nudity", "--output_dir", tmp_path, "--data_dir", data["sdxl"],
                *SMALL_DATA, "--num_retain_images", 2, "--max_train_steps", 2, *saliency, "--lr", "1e-3", *row])
    cfg = json.loads((tmp_path / "erase_config.json").read_text())
    assert cfg["model_family"] == "sdxl" and cfg["delta"]["tensors_changed"] > 0
    assert all(all(isinstance(v, str) or v == v for v in r.values()) for r in cfg["history"])
    new, base = unet_state(tmp_path), load_file(f"{pipes['sdxl']}/unet/diffusion_pytorch_model.safetensors")
    for n in new:
        if n not in cfg["targets"]["tensors"]:
            assert torch.equal(new[n], base[n]), n
    if "noxattn" in row:
        assert not any(n.startswith("add_embedding.") for n in cfg["targets"]["tensors"])


def test_esd_on_v_prediction(pipes, data, tmp_path):
    """ESD's target and its DDIM start sampling on a v-prediction model (SD 2.x)."""
    in_process(["--pretrained_model_name_or_path", pipes["sd2"], "--concept", "nudity", "--output_dir", tmp_path, "--data_dir", data["sd2"],
                *SMALL_DATA, "--max_train_steps", 1, "--lr", "1e-3", "--method", "esd", "--esd_ddim_steps", "3"])
    cfg = json.loads((tmp_path / "erase_config.json").read_text())
    assert cfg["adapter"]["prediction_type"] == "v_prediction" and cfg["delta"]["tensors_changed"] > 0


@pytest.mark.skipif(not (DATA / "i2p.csv").exists(), reason="../shared/data not present")
def test_i2p_audit_on_every_family(pipes, sdxl_run, tmp_path):
    """eval.i2p loads each family through the same table (the erased SDXL folder: its unet/ over the base)."""
    from eval import i2p

    for name, model in (("sd1", pipes["sd1"]), ("sd2", pipes["sd2"]), ("sdxl-erased", str(sdxl_run))):
        out = tmp_path / name
        i2p.main(i2p.parse_args(["--model", model, "--output_dir", str(out), "--prompts_csv", str(DATA / "i2p.csv"), "--subset", "sexual",
                                 "--limit", "2", "--steps", "2", "--batch_size", "2", "--no_report"]))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["images"] == 2 and summary["settings"]["generation"]["resolution"] == 16
        assert sorted(p.name for p in (out / "images").glob("*.png")) == sorted(r["file"] for r in
                                                                                 json.loads((out / "images" / "generation.json").read_text())["images"])


def test_bad_family_in_an_erased_folder_is_one_line(pipes, sdxl_run, tmp_path):
    from erase.diffusion.generate import load_pipeline
    from erase.utils.errors import UserError

    bad = tmp_path / "bad"
    shutil.copytree(sdxl_run / "unet", bad / "unet")
    cfg = json.loads((sdxl_run / "erase_config.json").read_text())
    (bad / "erase_config.json").write_text(json.dumps({**cfg, "model_family": "sd4"}))
    with pytest.raises(UserError) as err:
        load_pipeline(str(bad))
    assert "names model family 'sd4'; supported: sd1, sd2, sdxl, sd3, flux" in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, USER_FACING) and error_text(err).startswith("error: ")


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_every_export_format_of_a_family_loads_back(pipes, data, tmp_path, family):
    """erase/sd.py with --export_format diffusers,single_file,lora on SD 2.x / SDXL: the single file (fp32) holds the
    erased UNet bit for bit through diffusers' from_single_file, the LoRA loads through load_lora_weights."""
    from erase import load_erased

    out = tmp_path / family
    in_process(["--pretrained_model_name_or_path", pipes[family], "--concept", "nudity", "--output_dir", out,
                "--data_dir", data[family], *SMALL, "--num_retain_images", 2, "--max_train_steps", 1, "--lr", "1e-3",
                "--topk", 20, "--export_format", "diffusers,single_file,lora", "--export_dtype", "fp32"])
    cfg = json.loads((out / "erase_config.json").read_text())
    assert cfg["export"]["formats"] == ["diffusers", "single_file", "lora"] and cfg["model_family"] == family
    erased = load_erased(out, format="diffusers").unet.state_dict()
    single = load_erased(out, format="single_file", local_files_only=True)
    assert type(single).__name__ == cfg["pipeline_class"]
    state = single.unet.state_dict()
    assert state.keys() == erased.keys() and all(torch.equal(state[k], erased[k]) for k in erased)
    lora = load_erased(out, format="lora")
    assert type(lora).__name__ == cfg["pipeline_class"] and any("lora" in n for n, _ in lora.unet.named_parameters())


def test_attacks_on_sdxl(pipes, tmp_path):
    """relearn conditions an SDXL UNet as its pipeline does (both encoders, pooled, time ids); the prompt attacks on SDXL
    (every encoder) are tests/test_attack_families.py's."""
    import numpy as np

    from eval.attack import relearn_audit

    with bright_judge("stub_xl", num_images=2, batch_size=2):
        prompts = tmp_path / "p.txt"
        prompts.write_text("a bright thing\n")
        s = relearn_audit(pipes["sdxl"], "stub_xl", tmp_path / "o", forget_prompts=str(prompts), num_target_images=2,
                          relearn_seeds="0", eval_steps="0,1", relearn_batch_size=2, relearn_params="all")
        assert s["relearn"]["steps"] == [0, 1] and len(s["relearn"]["hit_rate"]) == 2
        loss = np.asarray(s["relearn"]["eval_loss"], dtype=float)
        assert loss.size == 2 and np.isfinite(loss).all() and loss[1] != loss[0]  # one Adam step moved the SDXL UNet
