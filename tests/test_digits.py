"""The digits benchmark: model format, judge accuracy, score summary, presets, bad input (eval/digits*.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from eval_fixtures import error_text, private_erase_cache

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(vae_steps=4, unet_steps=4, batch_size=8, vae_batch_size=8, unet_channels=(16, 32),
            vae_channels=(8, 16), text_width=32, text_layers=1)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A private ERASE_CACHE for the session (the judge is trained once into it)."""
    import torch

    torch.set_num_threads(1)  # tests share 2 cores with other suites; oversubscribed threads crawl
    with private_erase_cache(tmp_path_factory.mktemp("erase_cache")) as path:
        yield path


@pytest.fixture(scope="session")
def tiny_digits_model(digits_cache, tmp_path_factory):
    from eval.digits.model import DigitsModelConfig, train_digits_model

    out = tmp_path_factory.mktemp("digits") / "model"
    t0 = time.time()
    train_digits_model(DigitsModelConfig(**TINY), out, progress=False)
    return out, time.time() - t0


@pytest.fixture(scope="session")
def judge(digits_cache):
    from eval.digits.judge import load_judge

    return load_judge()


def _score_args(model, out, *extra):
    return ["score", "--model", str(model), "--concept", "three", "--num_images", "2", "--steps", "2",
            "--output_dir", str(out), *extra]


# ----------------------------------------------------------------------------------------------- model
def test_tiny_model_folder_is_a_loadable_sd_pipeline(tiny_digits_model):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from eval.digits.model import DigitsModelConfig, TRAIN_TEMPLATES, train_digits_model

    model, _ = tiny_digits_model
    index = json.loads((model / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    card = json.loads((model / "digits_model.json").read_text())
    cfg = DigitsModelConfig(**TINY)
    assert card["kind"] == "digits" and card["fingerprint"] == cfg.fingerprint()
    assert card["train_templates"] == list(TRAIN_TEMPLATES) and card["config"]["unet_steps"] == 4
    unet_sd = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any("attn2.to_k" in k for k in unet_sd), "the UNet must have cross-attention (ESD-x / targets need it)"
    unet_cfg = json.loads((model / "unet" / "config.json").read_text())
    te_cfg = json.loads((model / "text_encoder" / "config.json").read_text())
    assert unet_cfg["cross_attention_dim"] == te_cfg["hidden_size"] == 32
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] > 0 and vae_cfg["scaling_factor"] != 0.18215  # fitted to the latents

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    tok = pipe.tokenizer
    assert tok.model_max_length == 16
    ids = tok("a handwritten digit three").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == ["a</w>", "handwritten</w>", "digit</w>", "three</w>"]
    out = pipe(["the number 3", "a handwritten seven"], num_inference_steps=2, guidance_scale=3.0,
               output_type="np", generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()

    t0 = time.time()  # cached: same settings return at once, files untouched
    mtime = (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert train_digits_model(cfg, model, progress=False) == model
    assert time.time() - t0 < 1.0
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime


def test_training_refuses_to_overwrite_a_foreign_folder(tmp_path, digits_cache):
    from eval.digits.__main__ import main

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a digits model folder"):
        main(["train", "--output_dir", str(tmp_path), "--unet_steps", "1", "--vae_steps", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------- judge
def test_judge_is_accurate_on_held_out_real_digits(judge):
    import torch

    from eval.digits.judge import load_judge
    from eval.digits.model import load_digit_images, split_indices

    assert judge.meta["test_accuracy"] >= 0.9
    x, y = load_digit_images(16)
    _, te = split_indices(len(x))
    pred, feats = judge.predict(x[te], grey=True)
    assert (pred == y[te].numpy()).mean() == pytest.approx(judge.meta["test_accuracy"], abs=1e-6)
    assert feats.shape == (len(te), 128)
    # the pipeline-output path (N, H, W, 3) in [0, 1] gives the same answers
    rgb = ((x[te] + 1) / 2).permute(0, 2, 3, 1).repeat(1, 1, 1, 3).numpy()
    assert (judge.predict(rgb)[0] == pred).all()
    again = load_judge()  # from the cache: safetensors + JSON
    assert torch.equal(again.net.head.weight, judge.net.head.weight)
    folder = Path(os.environ["ERASE_CACHE"]) / "digits" / f"judge-{judge.config.fingerprint()}"
    assert sorted(p.name for p in folder.iterdir()) == ["judge.json", "judge.safetensors"]


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_shift():
    from eval.digits.judge import frechet_distance

    a = np.random.default_rng(0).normal(size=(200, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=1e-3)


# ----------------------------------------------------------------------------------------------- score
def test_score_writes_a_consistent_summary(tiny_digits_model, judge, tmp_path, monkeypatch):
    from eval.digits.__main__ import main

    model, _ = tiny_digits_model
    out = tmp_path / "score"
    assert main(_score_args(model, out, "--seeds", "0,1")) == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("forget_acc", "retain_acc", "per_digit_acc", "retain_fd", "heldout", "settings", "n_forget"):
        assert key in s
    assert s["concept"] == "three" and s["digit"] == 3
    per = s["per_digit_acc"]
    assert sorted(per) == [str(d) for d in range(10)]
    assert s["forget_acc"] == pytest.approx(per["3"])
    assert s["retain_acc"] == pytest.approx(np.mean([per[str(d)] for d in range(10) if d != 3]))
    assert s["n_forget"] == 4 and s["n_retain"] == 36  # 2 images x 2 seeds per digit
    assert sum(s["forget_predicted_hist"]) == 4
    st = s["settings"]
    assert st["seeds"] == [0, 1] and st["generation"]["steps"] == 2 and st["generation"]["scheduler"] == "ddim"
    assert st["generation"]["resolution"] == 16 and st["erased"] is False
    assert st["forget_prompts"][0] == "a handwritten digit three" and "seven" in st["retain_prompts"]
    assert st["judge"]["test_accuracy"] >= 0.9
    held = s["heldout"]
    assert held["prompts"]["three"][0] == "a picture of the number 3"
    assert held["forget_acc"] == pytest.approx(held["per_digit_acc"]["3"])
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 80
    main_preds = [p for p in preds if p["audit"] == "main"]
    assert np.mean([p["predicted"] == 3 for p in main_preds if p["digit"] == 3]) == pytest.approx(s["forget_acc"])
    import eval.digits.score as score_module  # a rerun with other settings, killed before it writes its summary,

    def killed(*_, **__):  # leaves no summary of the earlier settings beside its own predictions
        raise KeyboardInterrupt

    monkeypatch.setattr(score_module, "atomic_write_json", killed)
    with pytest.raises(SystemExit):
        main(_score_args(model, out, "--seeds", "2"))
    assert not (out / "summary.json").exists()
    assert {p["seed"] for p in main_preds if p["digit"] == 3} == {10**8 + k for k in (0, 1, 1000, 1001)}  # held-out noise
    assert all((out / "images" / p["audit"] / p["file"]).is_file() for p in preds)


def test_score_several_erased_digits(tiny_digits_model, judge, tmp_path):
    """--concept three,five: both are forget digits (per-digit forget acc), the other eight are retained."""
    from eval.digits.__main__ import main

    model, _ = tiny_digits_model
    out = tmp_path / "score2"
    assert main(["score", "--model", str(model), "--concept", "three,five", "--output_dir", str(out), "--num_images", "1",
                 "--steps", "2", "--no_heldout"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["concept"] == "three,five" and s["digits"] == [3, 5] and sorted(s["forget_acc_per_digit"]) == ["3", "5"]
    assert s["n_forget"] == 2 and s["n_retain"] == 8
    assert s["forget_acc"] == pytest.approx(np.mean([s["per_digit_acc"]["3"], s["per_digit_acc"]["5"]]))
    assert "five" not in s["settings"]["retain_prompts"] and sorted(s["settings"]["forget_prompts"]) == ["five", "three"]


def test_score_accepts_an_erase_sd_output_and_prompt_files(tiny_digits_model, judge, tmp_path):
    from eval.digits.__main__ import main

    model, _ = tiny_digits_model
    erased = tmp_path / "erased"
    shutil.copytree(model / "unet", erased / "unet")
    (erased / "erase_config.json").write_text(json.dumps(
        {"pretrained_model_name_or_path": str(model), "concept": "three", "method": "ft"}))
    forget = tmp_path / "forget.txt"
    forget.write_text("# my phrasings\nthree\n\n")
    retain = tmp_path / "retain.txt"
    retain.write_text("a 7\nthe number one\n")
    out = tmp_path / "score"
    assert main(_score_args(erased, out, "--forget_prompts", str(forget), "--retain_prompts", str(retain))) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["erased"] is True and s["settings"]["base_model"] == str(model)
    assert s["settings"]["erase_config"]["method"] == "ft"
    assert s["settings"]["forget_prompts"] == ["three"] and s["heldout"] is None
    assert sorted(s["per_digit_acc"]) == ["1", "3", "7"] and s["n_retain"] == 4


@pytest.mark.parametrize("case", ["unknown_concept", "not_digits", "empty_prompts", "no_digit_in_retain",
                                  "missing_model", "repeated_seed", "inside_the_model", "an_attack_folder"])
def test_score_bad_input_is_one_line_and_writes_nothing(case, tiny_digits_model, tmp_path, capsys):
    from eval.digits.__main__ import main

    model, _ = tiny_digits_model
    out = tmp_path / "out"
    args = _score_args(model, out)
    expected = {"unknown_concept": "unknown digit 'eleven'", "not_digits": "is not a digits model",
                "empty_prompts": "holds no prompts", "no_digit_in_retain": "names no single digit",
                "missing_model": "model folder not found", "repeated_seed": "--seeds '0,0' repeats 0",
                "inside_the_model": "lies inside the scored model folder",
                "an_attack_folder": "holds the output of eval.attack relearn, not of eval.digits score"}[case]
    if case == "unknown_concept":
        args[args.index("three")] = "eleven"
    elif case == "not_digits":
        foreign = tmp_path / "sd"
        foreign.mkdir()
        (foreign / "model_index.json").write_text("{}")
        args[args.index(str(model))] = str(foreign)
    elif case == "empty_prompts":
        (tmp_path / "empty.txt").write_text("\n# nothing\n")
        args += ["--forget_prompts", str(tmp_path / "empty.txt")]
    elif case == "no_digit_in_retain":
        (tmp_path / "r.txt").write_text("a cat\n")
        args += ["--retain_prompts", str(tmp_path / "r.txt")]
    elif case == "repeated_seed":
        args += ["--seeds", "0,0"]  # one run counted twice
    elif case == "inside_the_model":
        out = model / "score"
        args[args.index(str(tmp_path / "out"))] = str(out)
    elif case == "an_attack_folder":  # another command's results would be replaced: refused, nothing touched
        from erase.utils.folders import mark_ours

        out.mkdir()
        mark_ours(out, by="eval.attack relearn")
        (out / "summary.json").write_text('{"attack": "relearn"}')
    else:
        args[args.index(str(model))] = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as e:
        main(args)
    msg = error_text(e)
    assert msg.startswith("error: ") and expected in msg and "\n" not in msg
    if case == "an_attack_folder":
        assert sorted(p.name for p in out.iterdir()) == ["scissorhands-erase.json", "summary.json"]
        assert json.loads((out / "summary.json").read_text()) == {"attack": "relearn"}
    else:
        assert not out.exists()


def test_cli_bad_concept_exits_nonzero_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eval.digits", "score", "--concept", "banana",
                           "--output_dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "torchvision" not in ln]
    assert lines == ["error: unknown digit 'banana'; expected one of zero, one, two, three, four, five, six, "
                     "seven, eight, nine or 0-9"]
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- presets
def test_digit_presets_match_the_templates():
    from eval.digits.model import (DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, build_tokenizer,
                                   digit_prompts, preset_dict, prompt_digit)
    from prompts import load_concept

    tok = build_tokenizer()
    train = {p for d in range(10) for p in digit_prompts(d)}
    for d, word in enumerate(DIGIT_WORDS):
        c = load_concept(word)
        assert json.loads((ROOT / "prompts" / "presets" / f"{word}.json").read_text()) == preset_dict(d)
        assert c.category == "digit" and c.forget_prompts == digit_prompts(d)
        assert len(c.retain_prompts) == 9 * len(TRAIN_TEMPLATES)
        assert {prompt_digit(p) for p in c.retain_prompts} == set(range(10)) - {d}
        assert prompt_digit(c.anchor_prompt) == (d + 1) % 10
        for p in digit_prompts(d, HELDOUT_TEMPLATES):
            assert p not in train and prompt_digit(p) == d
            # every held-out word was seen in training: each one is a single vocabulary token
            assert all(t.endswith("</w>") for t in tok.convert_ids_to_tokens(tok(p).input_ids)[1:-1])


# ----------------------------------------------------------------------------------------------- quick start
def test_quickstart_reduced_runs_the_whole_loop(tiny_digits_model, judge, tmp_path, monkeypatch):
    """The README's quick start, reduced: erase with erase/sd.py under accelerate launch, audit before / after; the
    output folder is relative to where the user runs it (erase/sd.py itself runs in the repository root). With
    --retrain and --relearn (one relearning seed) it is also the test of the bench's retrain row and attack columns:
    one erasure process serves both."""
    from PIL import Image

    from eval.digits.__main__ import main

    model, _ = tiny_digits_model
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "qs"
    assert main(["quickstart", "--model", str(model), "--output_dir", "qs", "--max_train_steps", "2",
                 "--num_images", "1", "--steps", "2", "--num_forget_images", "2", "--num_retain_images", "2",
                 "--train_batch_size", "1", "--relearn", "--retrain",
                 "--attack_options", json.dumps({"relearn": {"relearn_seeds": [0], "eval_steps": [0, 2, 5]}})]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["concept"] == "three" and r["settings"]["methods"] == ["scissorhands"]
    assert r["settings"]["max_train_steps"] == 2 and r["settings"]["seeds"] == [0]
    run = r["runs"]["scissorhands"][0]
    assert run["seed"] == 0 and run["wall_seconds"] > 0 and run["peak_rss_mb"] > 50
    assert run["update_violations"] == 0  # the applied update never lowered the memory forget loss
    assert all(0.0 <= run[f"relearn_{k}"] <= 1.0 for k in (0, 2, 5))
    relearned = json.loads((out / "relearn" / "scissorhands-seed0" / "summary.json").read_text())
    assert relearned["relearn"]["steps"] == [0, 2, 5] and relearned["relearn"]["hit_rate"][2] == run["relearn_5"]
    assert "accelerate.commands.launch" in run["command"] and "--max_train_steps" in run["command"]
    agg = r["methods"]["scissorhands"]
    assert agg["forget_acc"] == {"mean": run["forget_acc"], "std": 0.0, "n": 1}
    assert {t["target"] for t in r["targets"]} >= {"base draws each digit correctly >= 90%",
                                                   "Scissorhands forget_acc <= 2%", "Scissorhands retain FD <= 1.3 x base",
                                                   "Scissorhands retain_acc >= base - 1 point(s)"}
    from erase.export.local import read_record

    cfg = read_record(out / "runs" / "scissorhands-seed0")  # with the local record's paths
    assert cfg["method"] == "scissorhands" and cfg["pretrained_model_name_or_path"] == str(model)
    scored = json.loads((out / "scores" / "scissorhands-seed0" / "summary.json").read_text())
    assert scored["settings"]["erased"] is True and scored["forget_acc"] == run["forget_acc"]
    md = (out / "results.md").read_text()
    assert "| scissorhands |" in md and "| base (no erasure) |" in md
    for name in ("chart.png", "grid_base.png", "grid_scissorhands.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 32

    # the retrain row: the base settings trained without the digit's images, scored like every method
    retrain = r["runs"]["retrain"][0]
    scored = json.loads((out / "scores" / "retrain-seed0" / "summary.json").read_text())
    assert retrain["seed"] == 0 and retrain["forget_acc"] == scored["forget_acc"]
    assert r["retrain"]["forget_acc"] == {"mean": retrain["forget_acc"], "std": 0.0, "n": 1}
    trained = r["settings"]["retrain"]
    assert trained["held_out_digits"] == [3] and trained["config"]["held_out_digits"] == [3]
    assert scored["settings"]["model"] == trained["models"]["0"]
    card = json.loads((Path(trained["models"]["0"]) / "digits_model.json").read_text())
    assert card["training_data"]["images_per_digit"][3] == 0 and card["fingerprint"] == trained["fingerprints"]["0"]
    # attack columns: the same relearn budget on the base, the retrain model and the erased model
    assert r["attack_columns"] == ["relearn_0", "relearn_2", "relearn_5"]
    assert r["settings"]["attacks"]["relearn"]["options"] == {
        "relearn_params": "all", "eval_steps": [0, 2, 5], "relearn_seeds": [0], "num_images": 1, "steps": 2, "guidance": 4.0}
    for row, cells in (("base", r["base_attacks"]), ("retrain-seed0", r["retrain"]),
                       ("scissorhands-seed0", r["methods"]["scissorhands"])):
        audit = json.loads((out / "relearn" / row / "summary.json").read_text())
        assert audit["relearn"]["steps"] == [0, 2, 5] and list(audit["relearn"]["per_seed"]) == ["0"]
        assert audit["settings"]["num_target_images"] == 8 and audit["relearn_targets"] is None
        assert {c: cells[c]["mean"] for c in r["attack_columns"]} == audit["headline"]
    # a retrain model cannot draw the digit: its relearning learns from the images the base model drew for its row
    base_audit, retrain_audit = (json.loads((out / "relearn" / row / "summary.json").read_text())
                                 for row in ("base", "retrain-seed0"))
    assert retrain_audit["settings"]["target_images"]["source"] == str((out / "base-concept-images" / "relearn").resolve())
    assert retrain_audit["settings"]["target_images"]["prompts"] == base_audit["settings"]["target_images"]["prompts"]
    assert retrain_audit["target_images_judged"]["hits"] == base_audit["target_images_judged"]["hits"]
    assert "| retrain (never saw the digit) |" in md and "## Robustness" in md
    assert "| model | relearn_0 | relearn_2 | relearn_5 |" in md
    assert md.count("| retrain (never saw the digit) |") == 2  # the main table and the robustness table
    for row in ("base (no erasure)", "scissorhands"):
        assert md.count(f"| {row} |") == 3  # ... and the gap table
    # the gap: the erased model's hit rate minus the retrain model's of the same seed, at every budget
    retrain_run = r["runs"]["retrain"][0]
    for c in r["attack_columns"]:
        assert run[f"{c}_gap"] == pytest.approx(run[c] - retrain_run[c])
        assert agg[f"{c}_gap"]["mean"] == pytest.approx(run[f"{c}_gap"])
        assert r["base_attacks"][f"{c}_gap"]["mean"] == pytest.approx(r["base_attacks"][c]["mean"] - retrain_run[c])
    assert "| model | relearn_0_gap | relearn_2_gap | relearn_5_gap |" in md and "gap_rule" in r["settings"]
    assert any(t["target"].startswith("Scissorhands") and "retrain reference" in t["target"] for t in r["targets"]) is False
    from eval.digits.tables import curves

    assert curves(r["attack_columns"]) == {"relearn": [(0, "relearn_0"), (2, "relearn_2"), (5, "relearn_5")]}


# ----------------------------------------------------------------------------------------------- retrain and attacks
def test_retrain_model_never_saw_the_erased_digit(tiny_digits_model, digits_cache, capsys):
    """eval.digits retrain: the base settings trained without the digit's images; cached by settings + held-out digits."""
    import hashlib

    from eval.digits.__main__ import main
    from eval.digits.model import DigitsModelConfig, default_model_dir, load_digit_images, training_indices

    _, labels = load_digit_images(8)
    labels = labels.numpy()
    keep = training_indices(labels, (3,))
    assert set(labels[keep].tolist()) == set(range(10)) - {3} and len(keep) == len(labels) - (labels == 3).sum()
    assert np.array_equal(training_indices(labels), np.arange(len(labels)))  # nothing held out: every image

    base, _ = tiny_digits_model
    assert main(["retrain", "--digits", "three", "--model", str(base)]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = DigitsModelConfig(**{**TINY, "held_out_digits": (3,)})
    assert folder == default_model_dir(cfg) and str(folder).startswith(str(digits_cache))
    card = json.loads((folder / "digits_model.json").read_text())
    base_card = json.loads((base / "digits_model.json").read_text())
    assert card["config"] == {**base_card["config"], "held_out_digits": [3]} and "held_out_digits" not in base_card["config"]
    assert card["fingerprint"] == cfg.fingerprint() != base_card["fingerprint"]
    data = card["training_data"]  # the split the training loop used
    assert data["held_out_digits"] == [3] and data["images_per_digit"][3] == 0
    assert data["images_per_digit"] == [int((labels[keep] == d).sum()) for d in range(10)]
    assert data["num_images"] == len(keep) and data["indices_sha256"] == hashlib.sha256(keep.astype(np.int64).tobytes()).hexdigest()
    assert base_card["training_data"]["num_images"] == len(labels) and base_card["training_data"]["held_out_digits"] == []
    mtime = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert main(["retrain", "--digits", "3", "--model", str(base)]) == 0  # cached: same folder, untouched
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(SystemExit, match="unknown digit 'eleven'"):
        main(["retrain", "--digits", "eleven"])


def test_the_digits_bench_runs_a_closed_form_editor_with_no_repair_steps(tiny_digits_model, tmp_path):
    """uce / speed take no repair step (erase/sd.py refuses more): the bench asks for 0 whatever its --max_train_steps."""
    from types import SimpleNamespace

    from eval.digits.bench import is_closed_form, run_erasure

    model, _ = tiny_digits_model
    assert is_closed_form("uce") and is_closed_form("speed") and not is_closed_form("scissorhands")
    args = SimpleNamespace(launcher="python", max_train_steps=7, train_batch_size=1, num_forget_images=2,
                           num_retain_images=2, steps=2, guidance=4.0, erase_args=None)
    info = run_erasure(str(model), 3, "uce", 0, tmp_path / "uce-seed0", tmp_path / "data", args)
    cmd = info["command"]
    assert cmd[cmd.index("--max_train_steps") + 1] == "0" and cmd[cmd.index("--method") + 1] == "uce"
    record = json.loads((tmp_path / "uce-seed0" / "erase_config.json").read_text())
    assert record["method"] == "uce" and record["settings"]["max_train_steps"] == 0
