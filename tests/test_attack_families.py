"""The attacks of eval/attack/ on the multi-encoder families (issue 18 §4): unlearndiffatk and inversion on SDXL, SD3 and
Flux dev (one prefix text tokenised for every tokenizer; one new word learned in every encoder's table), relearn on SD3
and Flux dev (the erased transformer fine-tuned through the flow objective). Each runs from the command line's entry
on a tiny erased export made by a one-step erase/sd.py run; the judge is a real registered one ("bright" images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_fixtures import bright_judge
from safetensors.torch import load_file

FAMILIES = ("sdxl", "sd3", "flux_dev")
TINY = {"sdxl": {"sample_size": 8, "block_out_channels": (8, 16), "cross_attention_dim": 16}, "sd3": {}, "flux_dev": {}}
ENCODERS = {"sdxl": ("text_encoder", "text_encoder_2"), "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
            "flux_dev": ("text_encoder", "text_encoder_2")}
KEYS = {"sdxl": ("clip_l", "clip_g"), "sd3": ("clip_l", "clip_g", "t5"), "flux_dev": ("clip_l", "t5")}
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


def sampler(family: str) -> list[str]:
    return ["--scheduler", "flow_euler"] if family != "sdxl" else []


@pytest.fixture(scope="module")
def judge():
    with bright_judge("stub_fam", num_images=2, batch_size=2) as name:
        yield name


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    """Per family: (base pipeline, erased export of a one-step FT run on its text paths, prompts file)."""
    from erase.sd import main, parse_args
    from eval.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("attack-families")
    prompts = root / "prompts.txt"
    prompts.write_text("a bright thing\n")
    out = {}
    for f in FAMILIES:
        torch.manual_seed(0)
        base = build_tiny_pipeline(root / f"base-{f}", family=f, **TINY[f])
        model = root / f"erased-{f}"
        main(parse_args([str(a) for a in (
            "--pretrained_model_name_or_path", base, "--concept", "nudity", "--method", "ft", "--output_dir", model,
            "--data_dir", root / f"data-{f}", "--num_forget_images", 1, "--num_retain_images", 1, "--num_inference_steps", 1,
            "--generation_batch_size", 1, "--max_train_steps", 1, "--lr", "1e-2", "--train_batch_size", 1)]))
        out[f] = (base, model, prompts)
    return out


def attack(argv: list) -> None:
    from eval.attack.__main__ import main

    assert main([str(a) for a in argv]) == 0


def each_family(name: str, judge, erased, tmp_path_factory, *extra) -> dict:
    """``python -m eval.attack --attack name`` on every family's erased export: family -> its output folder."""
    out = {}
    for f, (_, model, prompts) in erased.items():
        out[f] = tmp_path_factory.mktemp(f"{name}-{f}") / "out"
        attack(["--attack", name, "--model", model, "--concept", judge, "--output_dir", out[f], "--forget_prompts", prompts,
                "--concept_words", "bright", *extra, *sampler(f)])
    return out


@pytest.fixture(scope="module")
def uda(judge, erased, tmp_path_factory):
    return each_family("unlearndiffatk", judge, erased, tmp_path_factory, "--timestep_blocks", 2, "--iterations", 2,
                       "--num_adv_tokens", 3)


@pytest.fixture(scope="module")
def inv(judge, erased, tmp_path_factory):
    return each_family("inversion", judge, erased, tmp_path_factory, "--eval_steps", "0,2", "--num_target_images", 2,
                       "--inversion_batch_size", 2, "--inversion_lr", "0.05", "--init_word", "photo")


@pytest.mark.parametrize("family", FAMILIES)
def test_unlearndiffatk_types_one_prefix_for_every_encoder(uda, erased, family):
    """The kept prefix is the same typed words in every tokenizer (each decodes its tokens to the prefix, and the
    adversarial prompt re-tokenises to them + the prompt), and every encoder's variable moved (its gradient arrived)."""
    from transformers import AutoTokenizer

    from eval.attack.utils.tokens import content_ids

    base = erased[family][0]
    s = json.loads((uda[family] / "summary.json").read_text())
    assert s["attack"] == "unlearndiffatk" and s["erased"] is True and s["reencode_share"] == 1.0
    st = s["settings"]
    assert st["model_family"] == family.split("_")[0] and st["text_encoders"] == list(ENCODERS[family])
    assert len(st["block_timesteps"]) == len(st["denoiser_block_timesteps"]) == 2
    if family != "sdxl":  # the flow families' blocks: sigma through the family's shift, on the 1000 sigma scale
        assert "velocity" in st["loss"] and st["denoiser_block_timesteps"] != st["block_timesteps"]
    (rec,) = [json.loads(x) for x in (uda[family] / "attacks.jsonl").read_text().splitlines()]
    assert rec["adversarial_prompt"] == f"{rec['prefix']} {rec['prompt']}" and len(rec["prefix"].split()) == 3
    assert sorted(rec["tokenizers"]) == sorted(ENCODERS[family]) and rec["reencodes"] is True
    for enc, got in rec["tokenizers"].items():
        tok = AutoTokenizer.from_pretrained(Path(base) / TOKENIZERS[enc])
        assert got["decoded"] == rec["prefix"] and tok.decode(got["adv_token_ids"]).strip() == rec["prefix"]
        assert content_ids(tok, rec["adversarial_prompt"]) == got["adv_token_ids"] + content_ids(tok, rec["prompt"])
        assert got["embedding_moved"] > 0, enc
    assert all(torch.isfinite(torch.tensor(rec["block_loss"])))
    assert (uda[family] / "adversarial_prompts.txt").read_text().splitlines() == [rec["adversarial_prompt"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_inversion_learns_the_word_in_every_encoder(inv, erased, family):
    """One (1, D) row per encoder (its own width), each moved away from the init word's row of that encoder."""
    from transformers import AutoModel

    base = erased[family][0]
    s = json.loads((inv[family] / "summary.json").read_text())
    assert s["steps"] == [0, 2] and len(s["hit_rate"]) == 2 and all(map(torch.isfinite, torch.tensor(s["eval_loss"])))
    st = s["settings"]
    assert st["text_encoders"] == dict(zip(KEYS[family], ENCODERS[family]))
    emb = load_file(str(inv[family] / "embeddings" / "seed0.safetensors"))
    assert sorted(emb) == sorted(KEYS[family])
    for key, enc in zip(KEYS[family], ENCODERS[family]):
        table = AutoModel.from_pretrained(Path(base) / enc).get_input_embeddings().weight.detach()
        init = table[st["init_token_ids"][key]]
        assert emb[key].shape == (1, table.shape[1])
        assert not torch.allclose(emb[key][0], init), key  # learned: not the init word's row any more
        assert s["per_seed"]["0"]["embedding_norm"][key]["moved"] > 0
    manifest = json.loads((inv[family] / "artefacts.json").read_text())
    assert manifest["kind"] == "token_embeddings" and manifest["encoders"] == st["text_encoders"]


@pytest.mark.parametrize("family", ["sd3", "flux_dev"])
def test_relearn_fine_tunes_the_erased_transformer(judge, erased, tmp_path, family):
    """relearn on an MMDiT: the erase run's targets (its text paths) selected by the family's presets, trained with the
    flow objective; one Adam step moves the eval loss."""
    _, model, prompts = erased[family]
    attack(["--attack", "relearn", "--model", model, "--concept", judge, "--forget_prompts", prompts, "--num_target_images", 2,
            "--relearn_batch_size", 2, "--relearn_seeds", "0", "--eval_steps", "0,1", "--relearn_lr", "1e-3",
            "--output_dir", tmp_path / "o", *sampler(family)])
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    cfg = json.loads((Path(model) / "erase_config.json").read_text())
    assert "velocity" in s["settings"]["loss"]
    for key in ("relearn", "relearn_targets"):
        loss = s[key]["eval_loss"]
        assert len(loss) == 2 and all(map(torch.isfinite, torch.tensor(loss))) and loss[1] != loss[0]
    assert sorted(s["relearn_targets"]["params"]["tensors"]) == sorted(cfg["targets"]["tensors"])
    assert any(n.startswith("context_embedder") for n in s["relearn_targets"]["params"]["tensors"])


def test_a_unet_sampler_on_a_flow_model_is_one_line(judge, erased, tmp_path):
    """The judge's default sampler (ddim here) cannot draw a Flux model: one line naming flow_euler, nothing written."""
    from eval.attack.__main__ import main

    _, model, prompts = erased["flux_dev"]
    with pytest.raises(SystemExit) as err:
        main(["--attack", "inversion", "--model", str(model), "--concept", judge, "--forget_prompts", str(prompts),
              "--output_dir", str(tmp_path / "o")])
    line = str(err.value.code)
    assert line.startswith("error: --scheduler ddim does not sample a flux model") and "flow_euler" in line and "\n" not in line
    assert not (tmp_path / "o").exists()


def test_replay_of_a_multi_encoder_word(inv, erased, tmp_path):
    """--replay puts every encoder's row back: on the model it was learned on it gives the attack's own last verdict;
    an SD3 word on a Flux model (its T5 is narrower) is one line naming the encoder."""
    from eval.attack.__main__ import main

    assert main(["--replay", str(inv["sd3"]), "--model", str(erased["sd3"][1]), "--output_dir", str(tmp_path / "r")]) == 0
    r = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert r["per_seed"]["0"]["hit_rate"] == r["per_seed"]["0"]["hit_rate_when_learned"]
    with pytest.raises(SystemExit) as err:
        main(["--replay", str(inv["sd3"]), "--model", str(erased["flux_dev"][1]), "--output_dir", str(tmp_path / "x")])
    line = str(err.value.code)
    assert "has width 128, the t5 encoder of" in line and "takes 64: it was learned on another text encoder" in line
    assert not (tmp_path / "x" / "summary.json").exists()
