"""Bad input to ``classify.run``, ``python -m erase.export``, ``erase_concept`` and ``load_erased``: one line naming the
bad value and what is allowed, a non-zero exit for the command lines, and nothing written."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from eval_fixtures import USER_FACING, error_text, random_image_folders


def one_line(err, *names) -> str:
    message = error_text(err)
    assert message.startswith("error: ") and "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


# ------------------------------------------------------------------------------------------------------ classify.run
def classify(tmp_path, *extra):
    from classify.run import main, parse_args

    return main(parse_args(["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--seeds", "0",
                            "--max_train_steps", "1", "--ref_epochs", "1", *extra]))


def test_classify_explicit_hparams_without_this_kind_is_refused(tmp_path):
    """A --hparams file the user named never falls back to the built-in values: it names the file and what it has."""
    foreign = tmp_path / "erase_config.json"
    foreign.write_text(json.dumps({"method": "scissorhands", "concept": "nudity", "export": {}}))
    with pytest.raises(SystemExit) as err:
        classify(tmp_path, "--hparams", str(foreign), "--methods", "scissorhands", "--ablations", "none")
    one_line(err, str(foreign), "no 'random' entry", "'method'", "'concept'", "classify.tune")
    other = tmp_path / "class_only.json"
    other.write_text(json.dumps({"dataset": "digits", "class": {"methods": {"ft": {"lr": 1e-3}}}}))
    with pytest.raises(SystemExit) as err:
        classify(tmp_path, "--hparams", str(other), "--methods", "ft", "--ablations", "none")
    one_line(err, str(other), "no 'random' entry", "'class'")
    with pytest.raises(SystemExit) as err:
        classify(tmp_path, "--hparams", "", "--methods", "ft")
    one_line(err, "--hparams is empty")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_classify_default_hparams_still_fall_back_per_kind():
    """Without --hparams the shipped file (or the built-in values where it has no entry) is used, as before."""
    from classify.hparams import FALLBACK, load_hparams

    hp, source = load_hparams("digits", "random")
    assert source == "tuned_digits.json[random]" and set(FALLBACK) <= set(hp)
    hp, source = load_hparams("no_such_dataset", "random")
    assert source == "built-in fallback (no tuned file)" and hp == FALLBACK


CLASSIFY_BAD = [
    (["--methods", "scissorhands", "--forget_loss", "bogus"], ["'bogus'", "ascent, relabel"]),
    (["--topk", "nan"], ["--topk nan", "(0, 100]"]),
    (["--margin", "nan"], ["--margin nan", ">= 0"]),
    (["--methods", "scissorhands,scissorhands"], ["--methods", "'scissorhands' is given twice"]),
    (["--methods", "scissorhands", "--ablations", "no_trim,no_trim"], ["--ablations", "'no_trim' is given twice"]),
]


@pytest.mark.parametrize("extra,names", CLASSIFY_BAD, ids=[" ".join(c[0]) for c in CLASSIFY_BAD])
def test_classify_bad_values_are_one_line_before_any_work(extra, names, tmp_path):
    with pytest.raises(SystemExit) as err:
        classify(tmp_path, *extra)
    one_line(err, *names)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_classify_cache_dir_that_is_a_file_is_one_line(tmp_path):
    from classify.run import main, parse_args

    (tmp_path / "afile").write_text("x")
    for cache in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(SystemExit) as err:
            main(parse_args(["--output_dir", str(tmp_path / "out"), "--cache_dir", str(cache), "--seeds", "0"]))
        one_line(err, f"--cache_dir {str(cache)!r}", "is a file, not a folder")
    assert not (tmp_path / "out").exists() and (tmp_path / "afile").read_text() == "x"


def test_classify_argparse_errors_name_the_module(capsys):
    from classify.run import parse_args

    with pytest.raises(SystemExit) as err:
        parse_args(["--output_dir", "x", "--bogus"])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["python -m classify.run: error: unrecognized arguments: --bogus"]


# --------------------------------------------------------------------------------------- python -m erase.export
@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """Two steps of Scissorhands on the tiny pipeline, exported as diffusers and LoRA."""
    from erase.sd import main, parse_args

    root = tmp_path_factory.mktemp("inputs")
    images = random_image_folders(root, seed=2)
    out = root / "run"
    main(parse_args([str(a) for a in [
        "--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--forget_images", images / "forget",
        "--retain_images", images / "retain", "--data_dir", images / "data", "--output_dir", out, "--saliency_batches", "1",
        "--log_every", "1", "--lr", "1e-3", "--topk", "20", "--max_train_steps", "2", "--export_format", "diffusers,lora"]]))
    return out


def listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def test_export_truncated_delta_is_one_line_and_writes_nothing(exported, tmp_path):
    from erase.export.convert import main as convert_main

    out = tmp_path / "copy"
    shutil.copytree(exported, out)
    shutil.rmtree(out / "unet")
    delta = out / "unet_delta.safetensors"
    os.truncate(delta, delta.stat().st_size // 2)
    before = listing(tmp_path)
    with pytest.raises(SystemExit) as err:
        convert_main([str(out), "--export_format", "diffusers"])
    one_line(err, str(delta), "damaged or incomplete")
    assert listing(tmp_path) == before  # nothing added beside or inside the folder


@pytest.mark.parametrize("kind", ["empty", "missing", "file", "no_record"])
def test_export_folder_problems_each_have_their_own_line(kind, tmp_path):
    from erase.export.convert import main as convert_main

    (tmp_path / "afile").write_text("x")
    (tmp_path / "plain").mkdir()
    path, names = {"empty": ("", ["path is empty"]), "missing": (str(tmp_path / "nope"), ["does not exist"]),
                   "file": (str(tmp_path / "afile"), ["is a file, not a folder"]),
                   "no_record": (str(tmp_path / "plain"), ["has no erase_config.json"])}[kind]
    before = listing(tmp_path)
    with pytest.raises(SystemExit) as err:
        convert_main([path, "--export_format", "lora"])
    assert err.value.code != 0
    one_line(err, repr(path), *names)
    assert listing(tmp_path) == before


def test_export_format_named_twice_is_refused(capsys):
    from erase.export.convert import parse_args

    with pytest.raises(SystemExit) as err:
        parse_args(["some_folder", "--export_format", "lora,single_file,lora"])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m erase.export: error: --export_format 'lora,single_file,lora' names 'lora' twice; name each format once"]


# ------------------------------------------------------------------------------------------------- erase_concept
API_BAD = [
    (dict(concept=123), ["concept 123 (int)", "a preset name"]),
    (dict(concept=["nudity", None]), ["concept None (NoneType)", "a preset name"]),
    (dict(pipe=None), ["pipe_or_path None (NoneType)", "a hub id, a diffusers folder path, or a loaded diffusers pipeline"]),
    (dict(pipe=42), ["pipe_or_path 42 (int)", "a loaded diffusers pipeline"]),
    (dict(concept="x", forget_prompts=["a photo of x"]), ["forget_prompts", "not a list of 1 prompt(s)", "prompt file"]),
    (dict(retain_prompts=("a", "b")), ["retain_prompts", "not a tuple of 2 prompt(s)"]),
]


@pytest.mark.parametrize("given,names", API_BAD, ids=[repr(c[0]) for c in API_BAD])
def test_erase_concept_argument_of_the_wrong_kind(given, names, tiny, tmp_path):
    from erase import erase_concept

    given = dict(given)
    pipe, concept = given.pop("pipe", tiny), given.pop("concept", "nudity")
    with pytest.raises(USER_FACING) as err:
        erase_concept(pipe, concept, output_dir=str(tmp_path / "o"), **given)
    assert isinstance(err.value, ValueError)
    one_line(err, *names)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------- load_erased
def test_load_erased_never_quietly_loads_another_format(exported, tmp_path, caplog):
    from erase import load_erased

    out = tmp_path / "copy"
    shutil.copytree(exported, out)
    shutil.rmtree(out / "unet")
    with caplog.at_level(logging.WARNING, logger="erase.api"):
        assert type(load_erased(str(out))).__name__ == "StableDiffusionPipeline"  # a shared LoRA: loads, and says so
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "lists the diffusers export but unet/ is missing" in said and "loading its lora export instead" in said
    with pytest.raises(ValueError) as err:
        load_erased(str(out), format="diffusers")
    one_line(err, "no diffusers export", "unet/ is missing")
    assert type(load_erased(str(out), format="lora")).__name__ == "StableDiffusionPipeline"  # asked for: loads


def test_load_erased_bad_paths_and_damaged_files(exported, tmp_path):
    from erase import load_erased

    (tmp_path / "afile").write_text("x")
    for path, name in [("", "path is empty"), (str(tmp_path / "nope"), "does not exist"), (str(tmp_path / "afile"), "not a folder")]:
        with pytest.raises(ValueError) as err:
            load_erased(path)
        one_line(err, name)
    out = tmp_path / "copy"
    shutil.copytree(exported, out)
    delta = out / "unet_delta.safetensors"
    os.truncate(delta, delta.stat().st_size // 2)
    with pytest.raises(ValueError) as err:
        load_erased(str(out), format="delta")
    one_line(err, str(delta), "damaged or incomplete")
