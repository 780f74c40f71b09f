"""erase/sd.py keeps its promises (docs/RELIABILITY.md) on the tiny pipeline: user folders, strict resume, whole
exports, finite weights, escaped model cards. Runs are in process, 1-2 steps, on 4 + 4 user images (no generation);
one ``accelerate launch`` shows what a user sees for a bad flag.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval_fixtures import USER_FACING, error_text

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = "cube <b>x</b>"  # a free-form concept whose name, prompts and anchor carry markup
SMALL = ["--saliency_batches", "1", "--log_every", "1", "--lr", "1e-3", "--topk", "20"]


def fails(args, capsys=None) -> str:
    from erase.sd import main, parse_args

    with pytest.raises(SystemExit) as err:
        main(parse_args([str(a) for a in args]))
    code = err.value.code
    assert code not in (0, None)
    msg = capsys.readouterr().err if isinstance(code, int) else str(code)
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    assert len(lines) == 1, msg
    return lines[0]


def run(args):
    from erase.sd import main, parse_args

    return main(parse_args([str(a) for a in args]))


@pytest.fixture(scope="module")
def inputs(tiny, tmp_path_factory):
    """User forget / retain folders (no generation), prompt files and a shared data folder for the latents."""
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for split in ("forget", "retain"):
        (root / split).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
    (root / "forget.txt").write_text("a glowing [cube](http://e.vil)\n# a cube <script>alert(1)</script>\n")
    return root


def common(tiny, inputs, out, *extra):
    return ["--pretrained_model_name_or_path", tiny, "--concept", CONCEPT, "--forget_prompts", inputs / "forget.txt",
            "--anchor_prompt", "a plain `box` | nothing", "--forget_images", inputs / "forget", "--retain_images", inputs / "retain",
            "--data_dir", inputs / "data", "--output_dir", out, *SMALL, *extra]


@pytest.fixture(scope="module")
def base_run(tiny, inputs, tmp_path_factory):
    """3 steps, checkpoints after steps 1 and 2, a full pipeline export."""
    out = tmp_path_factory.mktemp("runs") / "base"
    run(common(tiny, inputs, out, "--max_train_steps", 3, "--checkpointing_steps", 1, "--export_pipeline"))
    return out


# ----------------------------------------------------------------------------------------------- folders (no model loaded)
def test_output_folder_that_is_holds_or_lies_in_the_base_is_refused(tiny, tmp_path, capsys):
    before = sorted(p.name for p in Path(tiny).rglob("*"))
    for out in (tiny, Path(tiny) / "erased", Path(tiny).parent):
        line = fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", out], capsys)
        assert "base model folder" in line
    assert sorted(p.name for p in Path(tiny).rglob("*")) == before


def test_foreign_folder_needs_overwrite_and_check_mode_writes_nothing(tiny, inputs, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    line = fails(common(tiny, inputs, mine), capsys)
    assert "did not write (README.md)" in line and "--overwrite" in line
    from erase.sd import main, parse_args

    main(parse_args([str(a) for a in common(tiny, inputs, mine, "--overwrite", "--check")]))
    assert capsys.readouterr().out.startswith("ok: scissorhands") and sorted(p.name for p in mine.iterdir()) == ["README.md"]


def test_bad_user_images_are_named_before_any_model_is_loaded(tiny, inputs, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(inputs / "forget", bad)
    (bad / "notes.jpg").write_text("not an image")
    (bad / "0.txt").write_bytes("caf\xe9".encode("latin-1"))
    line = fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--forget_images", bad, "--check",
                  "--output_dir", tmp_path / "out"], capsys)
    assert "notes.jpg" in line and "--forget_images" in line
    (bad / "notes.jpg").unlink()
    line = fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--forget_images", bad, "--check",
                  "--output_dir", tmp_path / "out"], capsys)
    assert "0.txt is not UTF-8" in line and not (tmp_path / "out").exists()


def test_a_folder_in_use_is_refused(tiny, inputs, tmp_path):
    from erase.utils.folders import claim_output_dir

    with claim_output_dir(tmp_path / "busy"):
        with pytest.raises(USER_FACING) as err:
            run(common(tiny, inputs, tmp_path / "busy", "--max_train_steps", 1))
    assert "in use by another run" in error_text(err)


def test_topk_that_selects_nothing_is_refused(tiny, inputs, tmp_path):
    with pytest.raises(USER_FACING) as err:
        run(common(tiny, inputs, tmp_path / "o", "--topk", "1e-9"))
    assert "selects none" in error_text(err) and not (tmp_path / "o" / "erase_config.json").exists()


# ----------------------------------------------------------------------------------------------- the export
def test_export_records_the_resolved_base_and_escapes_the_card(base_run, tiny):
    from erase.export.local import read_record

    cfg = read_record(base_run)  # the shared config names the folder, the local record (erase_local.json) the path
    assert cfg["pretrained_model_name_or_path"] == str(Path(tiny).resolve()) == cfg["base_model"]["path"]
    assert "model_index.json" in cfg["export"]["files"] and "unet" in cfg["export"]["files"]
    card = (base_run / "README.md").read_text()
    assert "<script>" not in card and "<b>" not in card and "&lt;b&gt;" in card and "\\[cube\\]" in card
    assert not any(line.startswith("# a cube") for line in card.splitlines())
    assert (base_run / "scissorhands-erase.json").is_file() and not (base_run / ".scissorhands-erase.lock").exists()


def test_reexport_replaces_the_old_export_whole(base_run, tiny, inputs, tmp_path, monkeypatch):
    """Issue 8.11: a UNet-only export into a folder that held a pipeline export leaves no model_index.json (the folder
    no longer looks like a pipeline); checkpoints and the user's files stay; a relative base is recorded resolved."""
    out = tmp_path / "out"
    shutil.copytree(base_run, out)
    (out / "my-notes.txt").write_text("mine")
    monkeypatch.chdir(Path(tiny).parent)
    args = common(tiny, inputs, out, "--max_train_steps", 1)
    args[args.index(tiny)] = os.path.relpath(tiny)
    run(args)
    names = {p.name for p in out.iterdir()}
    assert "model_index.json" not in names and "vae" not in names and "text_encoder" not in names
    assert {"unet", "erase_config.json", "checkpoint-1", "checkpoint-2", "my-notes.txt"} <= names
    assert json.loads((out / "erase_local.json").read_text())["paths"]["pretrained_model_name_or_path"] == str(Path(tiny).resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing staged is left beside it


def test_non_finite_weights_are_never_exported(tiny, inputs, tmp_path, monkeypatch):
    import erase.diffusion.run as stages

    real = stages.run

    def poisoned(*a, **k):  # a run whose last update made a weight NaN while every loss stayed finite
        result = real(*a, **k)
        next(iter(result.params.values())).data.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(stages, "run", poisoned)
    with pytest.raises(USER_FACING) as err:
        run(common(tiny, inputs, tmp_path / "o", "--max_train_steps", 1))
    assert "non-finite" in error_text(err) and "nothing was exported" in error_text(err)
    assert not (tmp_path / "o" / "unet").exists() and not (tmp_path / "o" / "erase_config.json").exists()


# ----------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("change, words", [
    (["--lr", "2e-3"], "lr 0.001 -> 0.002"),
    (["--method", "ga"], "method 'scissorhands' -> 'ga'"),
    (["--topk", "30"], "topk 20.0 -> 30.0"),
    (["--seed", "1"], "seed 0 -> 1"),
    (["--concept", "sphere"], "concept 'cube <b>x</b>' -> 'sphere'"),
    (["--targets", "selfattn"], "targets 'xattn' -> 'selfattn'"),
    (["--max_train_steps", "1"], "max_train_steps 1 is below the step 2"),
], ids=["lr", "method", "topk", "seed", "concept", "targets", "steps-below"])
def test_resume_refuses_other_settings_in_one_line(base_run, tiny, inputs, tmp_path, change, words):
    out = tmp_path / "out"
    shutil.copytree(base_run, out)
    args = common(tiny, inputs, out, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if "--method" in change:  # options of Scissorhands only are an error with another method: leave them out
        from erase.core.options import option_names

        mine = option_names(change[change.index("--method") + 1], "diffusion")
        for flag in [a for a in args if isinstance(a, str) and a.startswith("--")]:
            if flag[2:] in option_names("scissorhands", "diffusion") and flag[2:] not in mine:
                del args[args.index(flag):args.index(flag) + 2]
    with pytest.raises(USER_FACING) as err:
        run(args)
    msg = error_text(err)
    assert words in msg and "\n" not in msg, msg
    assert json.loads((out / "erase_config.json").read_text()) == json.loads((base_run / "erase_config.json").read_text())


def test_latest_skips_a_corrupt_checkpoint_and_rotation_spares_foreign_folders(base_run, tiny, inputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base_run, out)
    weights = next((out / "checkpoint-2").glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # cut by a full disk
    (out / "checkpoint-0").mkdir()  # a folder of the user's with our naming: never rotated away
    (out / "checkpoint-0" / "mine.txt").write_text("mine")
    with pytest.raises(USER_FACING) as err:
        run(common(tiny, inputs, out, "--max_train_steps", 3, "--resume_from_checkpoint", out / "checkpoint-2", "--overwrite"))
    assert "checkpoint-2 is corrupt" in error_text(err)
    run(common(tiny, inputs, out, "--max_train_steps", 3, "--resume_from_checkpoint", "latest", "--checkpointing_steps", 1,
               "--checkpoints_total_limit", 1, "--overwrite"))
    cfg = json.loads((out / "erase_config.json").read_text())
    assert cfg["resumed_from"].endswith("checkpoint-1") and [r["step"] for r in cfg["history"]] == [2, 3]
    assert (out / "checkpoint-0" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-2"]


# ----------------------------------------------------------------------------------------------- under accelerate launch
def test_what_a_user_sees_under_accelerate_launch(tmp_path):
    """A bad flag under `accelerate launch`: our one line, then the launcher's own report and a non-zero exit
    (docs/RELIABILITY.md says so); `python erase/sd.py --check` shows the line alone, before any launch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "erase/sd.py",
                               "--concept", "nudity", "--lr", "nan", "--output_dir", str(tmp_path / "o")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode != 0 and "erase/sd.py: error: --lr nan is not a finite number" in launched.stderr
    checked = subprocess.run([sys.executable, "erase/sd.py", "--concept", "nudity", "--lr", "nan", "--check"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 2 and checked.stderr.strip().splitlines() == [
        "erase/sd.py: error: --lr nan is not a finite number (allowed: > 0)"]
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- broken inputs, full disks
def test_a_weights_file_missing_tensors_is_one_line(tiny, inputs, tmp_path):
    """diffusers loads a UNet file that lacks tensors as meta tensors without an error: both loaders refuse it."""
    from safetensors.torch import load_file, save_file

    from erase.diffusion.generate import load_pipeline

    broken = tmp_path / "sd"
    shutil.copytree(tiny, broken)
    f = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    del state[sorted(state)[0]]
    save_file(state, str(f))
    with pytest.raises(USER_FACING) as err:
        load_pipeline(str(broken))
    assert "missing 1 tensor" in error_text(err)
    args = common(tiny, inputs, tmp_path / "o", "--max_train_steps", 1)
    args[args.index(tiny)] = broken
    with pytest.raises(USER_FACING) as err:
        run(args)
    assert "missing 1 tensor" in error_text(err) and not (tmp_path / "o" / "unet").exists()


def test_a_full_disk_is_found_before_any_work_and_a_failed_export_leaves_the_folder_as_it_was(base_run, tiny, inputs, tmp_path,
                                                                                               monkeypatch):
    import erase.export.folder
    import erase.utils.checks

    real = erase.utils.checks.shutil.disk_usage
    monkeypatch.setattr(erase.utils.checks.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(USER_FACING) as err:
        run(common(tiny, inputs, tmp_path / "full", "--max_train_steps", 1))
    assert "MiB free" in error_text(err) and not (tmp_path / "full").exists()  # no marker-only folder is left behind
    monkeypatch.undo()

    out = tmp_path / "out"
    shutil.copytree(base_run, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(erase.export.folder, "save_file", disk_full)
    with pytest.raises(USER_FACING) as err:
        run(common(tiny, inputs, out, "--max_train_steps", 1))
    assert "No space left on device" in error_text(err) and "nothing was exported" in error_text(err)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_claim_in_progress_is_ours_to_the_other_processes_of_a_launch(tmp_path):
    """Every process of a launch checks the output folder before the main one claims it; caught mid-claim (the lock,
    then the marker under its temporary name) the folder is ours, while a stranger's file beside them still is not."""
    from erase.utils.errors import UserError
    from erase.utils.folders import LOCK_NAME, MARKER_NAME, check_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text('{"pid": 1}')
    check_output_dir(out)
    (out / f".{MARKER_NAME}.{os.getpid()}.tmp").write_text("{")
    check_output_dir(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files this tool did not write"):
        check_output_dir(out)
