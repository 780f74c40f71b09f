"""``from erase import erase_concept, load_erased`` on the tiny pipeline: the same weights as the command line with the
same seed, options checked like flags, and every export format loads back into a pipeline with the erased UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from eval_fixtures import random_image_folders

SMALL = dict(saliency_batches=1, log_every=1, lr=1e-3, topk=20, max_train_steps=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return random_image_folders(tmp_path_factory.mktemp("images"), seed=1)


def user_data(images):
    return dict(forget_images=str(images / "forget"), retain_images=str(images / "retain"), data_dir=str(images / "data"))


@pytest.fixture(scope="module")
def cli_run(tiny, images, tmp_path_factory):
    """The command line's run (in process, as tests/test_sd.py does), exported in every format."""
    from erase.sd import main, parse_args

    out = tmp_path_factory.mktemp("cli") / "out"
    flags = ["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", str(out),
             "--export_format", "diffusers,single_file,lora", "--export_dtype", "fp32"]
    for k, v in {**SMALL, **user_data(images)}.items():
        flags += [f"--{k}", str(v)]
    main(parse_args(flags))
    return out


def test_erase_concept_gives_the_cli_weights(tiny, images, cli_run):
    from erase import erase_concept

    unet = erase_concept(tiny, "nudity", **SMALL, **user_data(images))
    cli = load_file(str(cli_run / "unet" / "diffusion_pytorch_model.safetensors"))
    state = unet.state_dict()
    assert state.keys() == cli.keys() and all(torch.equal(state[k], cli[k]) for k in cli)
    changed = [k for k in cli if "attn2" in k and not torch.equal(cli[k], load_file(f"{tiny}/unet/diffusion_pytorch_model.safetensors")[k])]
    assert len(changed) == 20  # the run did erase something: every cross-attention tensor moved


def test_erase_concept_takes_a_loaded_pipeline_and_leaves_it_unchanged(tiny, images, cli_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from erase import erase_concept

    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    unet = erase_concept(pipe, ["nudity"], output_dir=str(tmp_path / "o"), export_format=["lora"], **SMALL, **user_data(images))
    cli = load_file(str(cli_run / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(unet.state_dict()[k], cli[k]) for k in cli)
    assert all(torch.equal(pipe.unet.state_dict()[k], before[k]) for k in before)
    assert (tmp_path / "o" / "erased_lora.safetensors").is_file() and not (tmp_path / "o" / "unet").exists()
    import json

    settings = json.loads((tmp_path / "o" / "erase_config.json").read_text())["settings"]
    assert settings["export_format"] == "lora" and settings["lr"] == 1e-3
    assert not {"components", "erased_unet"} & set(settings)  # the in-process objects are not settings


def test_options_are_checked_like_flags(tiny, tmp_path):
    from erase import erase_concept
    from erase.api import allowed_options

    with pytest.raises(TypeError) as err:
        erase_concept(tiny, "nudity", output_dir=str(tmp_path / "o"), learning_rate=1e-3)
    msg = str(err.value)
    assert "'learning_rate'" in msg and "allowed:" in msg and " lr," in msg and "lora_rank" in msg
    assert {"topk", "lam", "export_format", "max_train_steps", "project", "k_basis"} <= set(allowed_options())
    with pytest.raises(ValueError, match=r"--lora_energy 2 is outside the allowed range \(0, 1\]"):
        erase_concept(tiny, "nudity", output_dir=str(tmp_path / "o"), lora_energy=2)
    with pytest.raises(ValueError, match="'ckpt' is not an export format"):
        erase_concept(tiny, "nudity", output_dir=str(tmp_path / "o"), export_format="ckpt")
    with pytest.raises(ValueError, match="on/off"):
        erase_concept(tiny, "nudity", output_dir=str(tmp_path / "o"), project="yes")
    with pytest.raises(ValueError, match="--topk is not an option of method salun"):  # validated as the CLI does
        erase_concept(tiny, "nudity", method="salun", output_dir=str(tmp_path / "o"), topk=5)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["diffusers", "single_file", "lora", "delta"])
def test_load_erased_gives_the_erased_unet_in_every_format(tiny, cli_run, fmt):
    import json

    from erase import load_erased

    pipe = load_erased(str(cli_run), format=fmt)
    if fmt == "lora":
        pipe.fuse_lora()
    state = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    erased = load_file(str(cli_run / "unet" / "diffusion_pytorch_model.safetensors"))
    if fmt == "lora":  # the truncated change: each tensor exactly as far from the full export as erased_lora.json says
        base = load_file(f"{tiny}/unet/diffusion_pytorch_model.safetensors")
        per = json.loads((cli_run / "erased_lora.json").read_text())["per_tensor"]
        for name, st in per.items():
            full, got = erased[name].double() - base[name].double(), state[name].double() - base[name].double()
            assert float((full - got).norm() / full.norm()) == pytest.approx(st["rel_error"], rel=1e-3, abs=1e-6)
        assert all(torch.equal(state[k], base[k]) for k in base if k not in per and "to_out.0.bias" not in k)
    else:
        assert all(torch.equal(state[k], erased[k]) for k in erased)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a photo", num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()


def test_load_erased_names_what_is_missing(cli_run, tmp_path):
    from erase import load_erased

    with pytest.raises(ValueError, match="has no erase_config.json"):
        load_erased(str(tmp_path))
    with pytest.raises(ValueError, match="format 'ckpt' is not one of"):
        load_erased(str(cli_run), format="ckpt")
