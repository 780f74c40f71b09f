"""Attack audits (eval/attack/): the relearn attack's mechanics on the tiny random pipeline, resume, registries, errors.

The judge here is a real registered judge (``register_judge`` with a callable), not a mock: "bright" images are hits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from erase.utils.errors import UserError
from eval_fixtures import USER_FACING, bright_judge, error_text

ROOT = Path(__file__).resolve().parents[1]
STEPS = [0, 3, 8]
SEEDS = [0, 1]



@pytest.fixture(scope="module")
def stub_judge():
    with bright_judge(batch_size=4) as name:
        yield name


@pytest.fixture(scope="module")
def erased(tiny, tmp_path_factory):
    """An erase/sd.py-shaped folder over the tiny pipeline: unet/ + erase_config.json naming targets."""
    root = tmp_path_factory.mktemp("attack")
    model = root / "erased"
    shutil.copytree(Path(tiny) / "unet", model / "unet")
    (model / "erase_config.json").write_text(json.dumps({
        "pretrained_model_name_or_path": tiny, "method": "stub", "concept": "stub_bright",
        "engine": {"targets": "xattn", "exclude": None}, "settings": {"targets": "xattn"}}))
    prompts = root / "prompts.txt"
    prompts.write_text("a bright thing\nthe bright one\n")
    return model, prompts


def _argv(model, prompts, out, *extra):
    return ["--attack", "relearn", "--model", str(model), "--concept", "stub_bright", "--output_dir", str(out),
            "--forget_prompts", str(prompts), "--num_target_images", "2", "--relearn_batch_size", "2",
            "--relearn_seeds", ",".join(map(str, SEEDS)), "--eval_steps", ",".join(map(str, STEPS)),
            "--relearn_lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def audit(stub_judge, erased, tmp_path_factory):
    """One uninterrupted audit through the CLI entry point (in-process)."""
    from eval.attack.__main__ import main

    model, prompts = erased
    out = tmp_path_factory.mktemp("audit") / "out"
    assert main(_argv(model, prompts, out)) == 0
    return out


# ----------------------------------------------------------------------------------------------- mechanics
def test_summary_layout_and_settings(audit, erased):
    s = json.loads((audit / "summary.json").read_text())
    assert s["attack"] == "relearn" and s["erased"] is True and s["concept"] == "stub_bright"
    for key, n_tensors in (("relearn", None), ("relearn_targets", 20)):
        curve = s[key]
        assert curve["steps"] == STEPS
        assert len(curve["hit_rate"]) == len(curve["hit_rate_std"]) == len(STEPS)
        assert sorted(curve["per_seed"]) == [str(x) for x in SEEDS]
        per = np.array([curve["per_seed"][str(x)]["hit_rate"] for x in SEEDS])
        np.testing.assert_allclose(curve["hit_rate"], per.mean(0), atol=1e-6)
        np.testing.assert_allclose(curve["hit_rate_std"], per.std(0, ddof=1), atol=1e-6)
        from eval.attack.context import first_step_over

        assert curve["first_step_over_50"] == first_step_over(STEPS, curve["hit_rate"])
        assert all(curve["per_seed"][str(x)]["n"] == [3, 3, 3] for x in SEEDS)  # num_images from the judge's protocol
    assert s["relearn_targets"]["params"]["num_tensors"] == 20 and s["relearn_targets"]["params"]["spec"] == "xattn"
    assert all(".attn2." in t for t in s["relearn_targets"]["params"]["tensors"])
    assert s["relearn"]["params"]["num_parameters"] > s["relearn_targets"]["params"]["num_parameters"]
    st = s["settings"]
    assert st["optimizer"]["name"] == "adam" and st["optimizer"]["lr"] == 1e-3 and st["batch_size"] == 2
    assert st["target_images"]["seeds"] == [2_000_000, 2_000_001] and st["target_images"]["drawn_by"] == "base model"
    assert st["generation"]["steps"] == 2 and st["generation"]["guidance"] == 2.0 and st["generation"]["scheduler"] == "ddim"
    assert st["judge"] == {"concept": "stub_bright", "name": "bright", "version": "1"}
    assert st["forget_prompts"] == ["a bright thing", "the bright one"] and st["erase_config"]["method"] == "stub"
    assert {"torch", "diffusers", "numpy"} <= set(s["versions"])
    # the relearning images: drawn by the base model, saved, and judged
    assert sorted(p.name for p in (audit / "target").glob("*.png")) == ["00000_0.png", "00001_0.png"]
    assert s["target_images_judged"]["n"] == 2
    # one line per (param set, seed, step), with its counts
    lines = [json.loads(x) for x in (audit / "attacks.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(SEEDS) * len(STEPS)
    row = next(x for x in lines if x["param_set"] == "targets" and x["seed"] == 1 and x["step"] == 8)
    assert row["n"] == 3 and row["hits"] == round(row["hit_rate"] * 3)
    assert sum(v[1] for v in row["per_prompt"].values()) == 3 and sum(row["labels"].values()) == 3


def test_relearning_lowers_the_loss(audit):
    """The fixed-batch noise-prediction loss falls as the attacked UNet relearns its target images."""
    for name in ("all", "targets"):
        for seed in SEEDS:
            cell = json.loads((audit / "cells" / f"{name}-seed{seed}.json").read_text())
            assert len(cell["train_loss"]) == max(STEPS)
            assert cell["eval_loss"][-1] < cell["eval_loss"][0], (name, seed, cell["eval_loss"])
    s = json.loads((audit / "summary.json").read_text())
    # Every cell starts from the same attacked model: step 0 is shared.
    assert len({tuple(v["eval_loss"][:1]) for k in ("relearn", "relearn_targets") for v in s[k]["per_seed"].values()}) == 1


def test_resume_redoes_only_unfinished_cells(audit, erased, tmp_path):
    """A killed run: one cell missing, another finished (tampered to prove it is not recomputed)."""
    from eval.attack import relearn_audit

    model, prompts = erased
    out = tmp_path / "out"
    shutil.copytree(audit, out)
    (out / "cells" / "all-seed1.json").unlink()
    (out / "summary.json").unlink()
    kept = out / "cells" / "targets-seed0.json"
    cell = json.loads(kept.read_text())
    cell["hit_rate"] = [0.25, 0.5, 0.75]
    kept.write_text(json.dumps(cell))
    s = relearn_audit(model, "stub_bright", out, forget_prompts=str(prompts), num_target_images=2,
                      relearn_batch_size=2, relearn_seeds=SEEDS, eval_steps=STEPS, relearn_lr=1e-3)
    assert s["seconds"]["computed_cells"] == ["all-seed1"]
    assert s["relearn_targets"]["per_seed"]["0"]["hit_rate"] == [0.25, 0.5, 0.75]
    ref = json.loads((audit / "summary.json").read_text())["relearn"]["per_seed"]["1"]
    assert s["relearn"]["per_seed"]["1"]["hit_rate"] == ref["hit_rate"]  # recomputed = uninterrupted
    np.testing.assert_allclose(s["relearn"]["per_seed"]["1"]["eval_loss"], ref["eval_loss"], rtol=1e-5)
    # other settings: every cell is redone, none reused
    s2 = relearn_audit(model, "stub_bright", out, forget_prompts=str(prompts), num_target_images=2,
                       relearn_batch_size=2, relearn_seeds=[0], eval_steps=[0, 1], relearn_lr=1e-3,
                       relearn_params="all")
    assert s2["seconds"]["computed_cells"] == ["all-seed0"] and s2["relearn_targets"] is None


def test_base_model_skips_targets_unless_named(stub_judge, tiny, erased, tmp_path):
    from eval.attack import relearn_audit

    _, prompts = erased
    kw = dict(forget_prompts=str(prompts), num_target_images=1, relearn_batch_size=1, relearn_seeds=[0], eval_steps=[0, 1])
    s = relearn_audit(tiny, "stub_bright", tmp_path / "a", **kw)
    assert s["erased"] is False and s["relearn_targets"] is None and "relearn_targets_skipped" in s
    with pytest.raises(USER_FACING, match="--targets"):
        relearn_audit(tiny, "stub_bright", tmp_path / "b", relearn_params="targets", **kw)
    s = relearn_audit(tiny, "stub_bright", tmp_path / "c", relearn_params="targets", targets="selfattn", **kw)
    assert s["relearn_targets"]["params"]["source"] == "--targets" and s["relearn"] is None


def test_relearn_from_a_folder_of_images(stub_judge, erased, tmp_path):
    """--target_images: any size (resized and cropped as erase/sd.py does), x.txt gives x.png's prompt."""
    from PIL import Image

    from eval.attack import relearn_audit

    model, prompts = erased
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((40, 48, 3), 250, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((32, 32, 3), 10, np.uint8)).save(folder / "b.png")
    (folder / "b.txt").write_text("a dark bright thing\n")
    s = relearn_audit(model, "stub_bright", tmp_path / "o", target_images=str(folder), forget_prompts=str(prompts),
                      relearn_batch_size=2, relearn_seeds=[0], eval_steps=[0, 1], relearn_params="all", save_images=True)
    t = s["settings"]["target_images"]
    assert t["files"] == ["a.png", "b.png"] and t["prompts"] == ["a bright thing", "a dark bright thing"]
    assert t["drawn_by"] is None and s["settings"]["target_seed"] is None
    assert s["target_images_judged"]["hits"] == 1 and not (tmp_path / "o" / "target" / "generation.json").exists()
    saved = sorted(str(p.relative_to(tmp_path / "o" / "images")) for p in (tmp_path / "o" / "images").rglob("*.png"))
    assert saved == [f"all-seed0/step00001/{i:05d}.png" for i in range(3)] + [f"step00000/{i:05d}.png" for i in range(3)]


# ----------------------------------------------------------------------------------------------- helpers
def test_v_prediction_target_and_endless_batches():
    import torch
    from diffusers import DDPMScheduler

    from eval.attack.context import endless_batches, noise_target

    z, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 900])
    assert noise_target(DDPMScheduler(), z, noise, t) is noise
    v = DDPMScheduler(prediction_type="v_prediction")
    assert torch.equal(noise_target(v, z, noise, t), v.get_velocity(z, noise, t))
    stream = endless_batches(3, 2, torch.Generator().manual_seed(0))
    seen = [i for _ in range(3) for i in next(stream)]
    assert sorted(seen) == [0, 0, 1, 1, 2, 2]  # two full passes over 3 images in three batches of 2


# ----------------------------------------------------------------------------------------------- registries
def test_judge_registry():
    from eval.attack import Judge, judged_concepts, load_judge, register_judge, unregister_judge
    from eval.attack.registry import judge_entry

    assert {"three", "nudity"} <= set(judged_concepts())
    assert judge_entry("3").concept == "three" and judge_entry("three").generation["steps"] == 20
    with pytest.raises(ValueError, match="already has a judge"):
        register_judge("three", flag=lambda im: [True] * len(im))
    with pytest.raises(ValueError, match="exactly one"):
        register_judge("x_new", flag=len, factory=lambda: None)
    register_judge("x_new", flag=lambda im: [True], settings={"name": "bad"})
    try:
        with pytest.raises(ValueError, match="1 verdicts for 2 images"):
            load_judge("x_new")(np.zeros((2, 4, 4, 3), np.uint8))
        register_judge("x_new", factory=lambda: Judge("x_new", lambda im: [False] * len(im), {"name": "ok"}), replace=True)
        assert load_judge("x_new")(np.zeros((2, 4, 4, 3), np.uint8)) == ([False, False], None)
    finally:
        unregister_judge("x_new")
    assert "x_new" not in judged_concepts()


def test_attack_registry_rejects_duplicates():
    from eval.attack import available_attacks, register_attack
    from eval.attack.relearn import RelearnConfig

    assert "relearn" in available_attacks()
    with pytest.raises(ValueError, match="registered twice"):
        register_attack("relearn", RelearnConfig)(lambda cfg, accelerator=None: None)
    with pytest.raises(ValueError, match="snake case"):
        register_attack("Bad-Name", RelearnConfig)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("nudenet"), reason="nudenet not installed")
def test_nudity_judge_flags_exposed_classes_at_045():
    from eval_fixtures import draw_torso

    from eval.attack import load_judge

    judge = load_judge("nudity")
    flags, labels = judge(np.stack([draw_torso(), np.full((320, 320, 3), 128, np.uint8)]))
    assert flags == [True, False] and "FEMALE_BREAST_EXPOSED" in labels[0]
    assert judge.settings["threshold"] == 0.45 and len(judge.settings["classes"]) == 9
    assert judge.settings["nudenet_version"] and judge.settings["model_sha256"]


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--relearn_seeds", "a,b"], "--relearn_seeds 'a' is not an integer"),
    (["--eval_steps", "0,-5"], "--eval_steps -5 is outside [0, "),
    (["--eval_steps", "0,5,5"], "repeats 5"),
    (["--eval_steps", "0,,5"], "has an empty entry"),
    (["--relearn_params", "all,some"], "--relearn_params 'all,some': choose from all, targets"),
    (["--relearn_lr", "0"], "--relearn_lr 0 is outside the allowed range > 0"),
    (["--num_images", "0"], "--num_images must be >= 1"),
    (["--num_target_images", "0"], "--num_target_images must be >= 1"),
    (["--scheduler", "nope"], "unknown --scheduler 'nope'"),
    (["--target_images", "/nonexistent/x"], "--target_images folder not found"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--steps", "many"], "--steps must be a number"),
])
def test_bad_flags_are_one_line_errors(stub_judge, erased, tmp_path, extra, message):
    from eval.attack.__main__ import parse_args

    model, prompts = erased
    with pytest.raises(SystemExit) as err:  # the command line: one line, exit 1
        parse_args(_argv(model, prompts, tmp_path / "out", *extra))
    assert message in error_text(err) and "\n" not in error_text(err)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_at_run_time(stub_judge, tiny, erased, tmp_path):
    from eval.attack import relearn_audit

    _, prompts = erased
    with pytest.raises(SystemExit, match="unknown attack 'nope'; choose one of: inversion, relearn, unlearndiffatk"):
        from eval.attack.__main__ import parse_args

        parse_args(["--attack", "nope"])
    with pytest.raises(USER_FACING, match="model not found"):
        relearn_audit(tmp_path / "missing", "stub_bright", tmp_path / "o", forget_prompts=str(prompts))
    with pytest.raises(USER_FACING, match="no preset"):
        relearn_audit(tiny, "stub_bright", tmp_path / "o")
    with pytest.raises(USER_FACING, match="unknown relearn option"):
        relearn_audit(tiny, "stub_bright", tmp_path / "o", lr=1e-4)
    with pytest.raises(USER_FACING, match="is not a digits model"):  # the digits judge only means something on one
        relearn_audit(tiny, "three", tmp_path / "o")
    world = tmp_path / "digits-world"  # and NudeNet nothing on a world model's 16 px digits
    world.mkdir()
    (world / "digits_model.json").write_text(json.dumps({"kind": "digits"}))
    (world / "model_index.json").write_text("{}")
    with pytest.raises(USER_FACING, match="--concept nudity means nothing on the digits model"):
        relearn_audit(str(world), "nudity", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_concept_with_no_judge_is_a_one_line_error(tiny, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eval.attack", "--attack", "relearn", "--model", tiny, "--concept",
                           "van_gogh", "--output_dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                               "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: no judge for concept 'van_gogh'; judged concepts:") and "nudity" in err[-1]
    assert "three" in err[-1] and "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- rails
def _cli_error(argv) -> str:
    from eval.attack.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code not in (0, None)
    return error_text(err)


def test_an_erased_unet_with_a_nan_weight_is_refused_before_anything_is_written(stub_judge, erased, tmp_path):
    """A NaN export draws black images a judge calls "not the concept": the audit must refuse it, not report 0 %."""
    import torch
    from safetensors.torch import load_file, save_file

    model, prompts = erased
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[3]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))
    msg = _cli_error(_argv(broken, prompts, tmp_path / "out"))
    assert "non-finite" in msg and "erased UNet" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()
    from eval.attack.utils.models import load_attacked, resolve_model  # the loaded weights are checked too

    with pytest.raises(UserError, match="non-finite"):
        load_attacked(resolve_model(str(broken)), "ddim", torch.device("cpu"))


def test_output_folder_rails(stub_judge, erased, tiny, tmp_path):
    """A user's folder, the attacked model's or its base's folder, a held folder, an impossible path: one line each,
    no file touched; the folder is marked as ours once an audit wrote it."""
    from erase.utils.folders import claim_output_dir

    model, prompts = erased
    user = tmp_path / "mine"
    user.mkdir()
    (user / "summary.json").write_text("my own results")
    msg = _cli_error(_argv(model, prompts, user))
    assert "holds files this tool did not write (summary.json)" in msg and "--overwrite" in msg
    assert (user / "summary.json").read_text() == "my own results" and sorted(p.name for p in user.iterdir()) == ["summary.json"]
    assert "base model folder" in _cli_error(_argv(model, prompts, Path(tiny) / "audit"))
    assert "lies inside the attacked model's folder" in _cli_error(_argv(model, prompts, model / "audit"))
    assert "cannot be created" in _cli_error(_argv(model, prompts, "/proc/x"))
    held = claim_output_dir(tmp_path / "held")
    try:
        assert "is in use by another run" in _cli_error(_argv(model, prompts, tmp_path / "held"))
    finally:
        held.release()
    assert not (Path(tiny) / "audit").exists() and not (model / "audit").exists()


def test_the_audit_folder_is_ours_and_a_rerun_may_write_into_it(audit):
    from erase.utils.folders import LOCK_NAME, MARKER_NAME

    assert (audit / MARKER_NAME).is_file() and not (audit / LOCK_NAME).exists()  # marked, lock released


def test_judges_are_one_file_each_on_the_registry():
    """eval/judges: the registry and one module per built-in judge; eval.attack.register_judge is the same function."""
    import eval.attack
    import eval.judges
    from eval.judges.registry import judge_entry

    assert eval.attack.register_judge is eval.judges.register_judge
    files = sorted(p.stem for p in (ROOT / "eval" / "judges").glob("*.py"))
    assert files == ["__init__", "digits", "nudity", "registry", "shapes"]
    assert judge_entry("3").concept == "three" and judge_entry("three").words == ("three", "3")
    assert judge_entry("star").words == ("star",) and judge_entry("checkered").generation["steps"] == 20
    assert {"topless", "breast", "nude", "lingerie"} <= set(judge_entry("nudity").words)
