"""The digits model's SD3-kind transformer (eval/digits/transformer.py): its conditioning is the pipeline's, it trains
with rectified flow into a StableDiffusion3Pipeline folder, and the bench's whole loop (erase, audit, attack) runs on
it with the family's own sampler."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

TINY_DIT = dict(vae_steps=3, unet_steps=3, batch_size=8, vae_batch_size=8, vae_channels=(8, 16), text_width=16,
                text_layers=1, dit_layers=1, denoiser="sd3")


@pytest.fixture(scope="module")
def dit_cache(tmp_path_factory):
    from eval_fixtures import private_erase_cache

    torch.set_num_threads(1)
    with private_erase_cache(tmp_path_factory.mktemp("erase_cache_dit")) as path:
        yield path


@pytest.fixture(scope="module")
def tiny_dit_model(dit_cache, tmp_path_factory):
    from eval.digits.model import DigitsModelConfig, train_digits_model

    return train_digits_model(DigitsModelConfig(**TINY_DIT), tmp_path_factory.mktemp("dit") / "model", progress=False)


def test_condition_is_the_pipelines_encode_prompt():
    """What the transformer trains on is what StableDiffusion3Pipeline.encode_prompt gives at sampling time (the
    T5 length capped by its tokenizer: Family.call_kwargs), prompts and the empty prompt alike."""
    from erase.diffusion.families import FAMILIES
    from eval.digits.model import DigitsModelConfig, build_tokenizer, vocabulary_words
    from eval.digits.transformer import build_mmdit_models, flow_pipeline, sd3_condition, token_ids
    from eval.tiny import build_t5_tokenizer

    cfg = DigitsModelConfig(**TINY_DIT)
    torch.manual_seed(0)
    clip_tok, t5_tok = build_tokenizer(cfg.max_length), build_t5_tokenizer(vocabulary_words(), cfg.max_length)
    vae, transformer, encoders = build_mmdit_models(cfg, clip_tok, t5_tok)
    for e in encoders:
        e.eval()  # T5's dropout
    pipe = flow_pipeline(vae, transformer, encoders, clip_tok, t5_tok)
    prompts = ["a handwritten digit three", "the number 7", ""]
    extra = FAMILIES["sd3"].call_kwargs(pipe)
    assert extra == {"max_sequence_length": cfg.max_length}
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False, **extra)
        ours_hidden, ours_pooled = sd3_condition(encoders, *token_ids(clip_tok, t5_tok, prompts))
    assert hidden.shape == ours_hidden.shape == (3, 2 * cfg.max_length, 4 * cfg.text_width)
    torch.testing.assert_close(ours_hidden, hidden)
    torch.testing.assert_close(ours_pooled, pooled)
    assert transformer.config.num_attention_heads == cfg.dit_layers and transformer.config.attention_head_dim == 64


def test_call_kwargs_keep_the_real_defaults_and_cap_short_tokenizers():
    from erase.diffusion.families import FAMILIES

    def pipe(name, length):
        return SimpleNamespace(**{name: SimpleNamespace(model_max_length=length)})

    assert FAMILIES["sd3"].call_kwargs(pipe("tokenizer_3", 512)) == {"max_sequence_length": 256}  # SD3's default
    assert FAMILIES["flux"].call_kwargs(pipe("tokenizer_2", 512)) == {"max_sequence_length": 512}  # Flux's
    assert FAMILIES["flux"].call_kwargs(pipe("tokenizer_2", 77)) == {"max_sequence_length": 77}
    assert FAMILIES["sd1"].call_kwargs(pipe("tokenizer", 77)) == {}  # a UNet family's call is unchanged


def test_unet_settings_keep_their_fingerprint_and_the_transformer_gets_its_own():
    from eval.digits.model import DigitsModelConfig

    unet = DigitsModelConfig()
    assert "denoiser" not in unet.to_dict() and "dit_layers" not in unet.to_dict()  # cached UNet models stay valid
    dit = DigitsModelConfig(denoiser="sd3")
    assert dit.to_dict()["denoiser"] == "sd3" and dit.fingerprint() != unet.fingerprint()
    assert DigitsModelConfig(denoiser="sd3", dit_layers=2).fingerprint() != dit.fingerprint()
    with pytest.raises(ValueError, match="denoiser 'dit' is not one of unet, sd3"):
        DigitsModelConfig(denoiser="dit")


def test_trained_folder_is_an_sd3_pipeline_with_a_shifted_vae(tiny_dit_model):
    from diffusers import StableDiffusion3Pipeline

    from erase.diffusion.families import detect

    index = json.loads((tiny_dit_model / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert detect(str(tiny_dit_model)).name == "sd3"
    card = json.loads((tiny_dit_model / "digits_model.json").read_text())
    assert card["denoiser"] == "sd3" and card["config"]["denoiser"] == "sd3" and "rectified flow" in card["objective"]
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_dit_model))
    assert pipe.vae.config.shift_factor == pytest.approx(card["vae_shift_factor"]) and pipe.vae.config.latent_channels == 16
    assert pipe.scheduler.config.shift == 1.0
    images = pipe(prompt=["the digit 3"], num_inference_steps=2, guidance_scale=2.0, output_type="np",
                  generator=torch.Generator().manual_seed(0), max_sequence_length=16).images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.as_tensor(images)).all()


def test_quickstart_on_the_transformer_erases_audits_and_attacks(tiny_dit_model, tmp_path):
    """The bench's loop on the SD3-kind model: erase/sd.py detects sd3, cuts the default text path, the audits and
    the relearning attack sample with flow_euler without being told."""
    from erase.export.local import read_record
    from eval.digits.__main__ import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--model", str(tiny_dit_model), "--output_dir", str(out), "--max_train_steps", "2",
                 "--num_images", "1", "--steps", "2", "--num_forget_images", "2", "--num_retain_images", "2",
                 "--train_batch_size", "1", "--relearn", "--launcher", "python",
                 "--attack_options", json.dumps({"relearn": {"relearn_seeds": [0], "eval_steps": [0, 2]}})]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["settings"]["scheduler"] == "flow_euler" and r["settings"]["audit_settings"]["scheduler"] == "flow_euler"
    assert r["settings"]["audit_settings"]["max_sequence_length"] == 16
    run = r["runs"]["scissorhands"][0]
    assert run["update_violations"] == 0 and 0.0 <= run["forget_acc"] <= 1.0
    cfg = read_record(out / "runs" / "scissorhands-seed0")
    assert cfg["model_family"] == "sd3" and cfg["pretrained_model_name_or_path"] == str(tiny_dit_model)
    assert (out / "runs" / "scissorhands-seed0" / "transformer").is_dir()
    relearned = json.loads((out / "relearn" / "scissorhands-seed0" / "summary.json").read_text())
    assert relearned["settings"]["generation"]["scheduler"] == "flow_euler"
    assert set(r["attack_columns"]) == {"relearn_0", "relearn_2"}


@pytest.mark.parametrize("argv, message", [
    (["bench", "--concept", "three", "--model", "MODEL", "--denoiser", "sd3"], "--denoiser sd3 picks the default model"),
    (["bench", "--concept", "three", "--denoiser", "dit"], "unknown --denoiser 'dit'; choose one of: unet, sd3"),
    (["train", "--denoiser", "dit"], "denoiser 'dit' is not one of unet, sd3"),
    (["train", "--denoiser", "sd3", "--dit_layers", "0"], "dit_layers must lie in 1..24, got 0"),
])
def test_bad_denoiser_settings_are_one_line_and_write_nothing(argv, message, tmp_path):
    import os
    import subprocess
    import sys

    argv = [str(tmp_path / "m") if a == "MODEL" else a for a in argv] + ["--output_dir", str(tmp_path / "o")]
    (tmp_path / "m").mkdir()
    proc = subprocess.run([sys.executable, "-m", "eval.digits", *argv], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "ERASE_CACHE": str(tmp_path / "c")})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "torchvision" not in ln]
    assert proc.returncode != 0 and len(lines) == 1 and message in lines[-1], proc.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_retrain_reference_keeps_the_transformer(tiny_dit_model):
    """The retrain reference of a transformer model is the same transformer settings without the digit."""
    from eval.digits.model import default_model_dir
    from eval.digits.retrain import retrain_config

    cfg = retrain_config(str(tiny_dit_model), [3], seed=1)
    card = json.loads((tiny_dit_model / "digits_model.json").read_text())
    assert cfg.denoiser == "sd3" and cfg.held_out_digits == (3,) and cfg.seed == 1
    assert cfg.dit_layers == card["config"]["dit_layers"] and cfg.text_width == card["config"]["text_width"]
    assert default_model_dir(cfg).name != f"model-{card['fingerprint']}"


def test_robust_tokens_reach_t5_on_the_transformer(tiny_dit_model, tmp_path):
    """--robust on an MMDiT: the learned token has a vector per encoder, T5's included. T5's encoder calls its own
    embed_tokens (tied to shared, which get_input_embeddings returns), so the injection hooks every module sharing the
    weight; before, T5's vector never entered the graph and the search stopped with an autograd error."""
    from transformers import T5EncoderModel

    from erase.diffusion.robust import TokenInjection
    from erase.sd import main, parse_args

    t5 = T5EncoderModel.from_pretrained(str(tiny_dit_model), subfolder="text_encoder_3").eval()
    ids = torch.tensor([[4, 7, 1], [7, 4, 1]])
    vec = torch.zeros(t5.config.d_model, requires_grad=True)
    plain = t5(ids)[0]
    with TokenInjection([t5], [7], [vec]):
        hooked = t5(ids)[0]
    assert not torch.allclose(hooked, plain)
    (g,) = torch.autograd.grad(hooked.sum(), [vec])
    assert g.abs().sum() > 0
    out = tmp_path / "robust"
    main(parse_args([str(a) for a in ["--pretrained_model_name_or_path", tiny_dit_model, "--concept", "three",
                                      "--output_dir", out, "--num_forget_images", 2, "--num_retain_images", 2,
                                      "--num_inference_steps", 2, "--generation_batch_size", 2, "--saliency_batches", 1,
                                      "--max_train_steps", 2, "--train_batch_size", 1, "--lr", "1e-3", "--robust",
                                      "--robust_steps", 2, "--robust_batch_size", 2, "--robust_every", 1,
                                      "--checkpointing_steps", 1]]))
    cfg = json.loads((out / "erase_config.json").read_text())
    assert cfg["model_family"] == "sd3" and cfg["settings"]["robust"] is True and cfg["repair"]["robust_searches"] >= 2
    from safetensors.torch import load_file

    state = load_file(str(out / "checkpoint-1" / "erase_state.safetensors"))
    assert {"robust.vec.0.0.0", "robust.vec.0.0.1", "robust.vec.0.0.2"} <= set(state)  # CLIP-L, CLIP-G, T5
    assert state["robust.vec.0.0.2"].shape == (t5.config.d_model,)
