"""erase/sd.py bad input: one clear line, a non-zero exit, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import error_text

ROOT = Path(__file__).resolve().parents[1]


def fails(args, capsys) -> str:
    from erase.sd import main, parse_args

    with pytest.raises(SystemExit) as err:
        main(parse_args([str(a) for a in args]))
    assert err.value.code not in (0, None)
    msg = capsys.readouterr().err if isinstance(err.value.code, int) else error_text(err)
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    assert len(lines) == 1, msg
    return lines[0]


def test_unknown_concept_lists_presets(tiny, capsys):
    line = fails(["--pretrained_model_name_or_path", tiny, "--concept", "unicorns"], capsys)
    assert "unknown concept 'unicorns'" in line
    for name in ("nudity", "van_gogh", "church", "eiffel_tower"):
        assert name in line


@pytest.mark.parametrize("kind", ["missing", "not_diffusers", "a_file", "empty"])
def test_bad_model_path(tmp_path, capsys, kind):
    path = tmp_path / "nothing-here"
    if kind == "not_diffusers":
        path.mkdir()
        (path / "weights.bin").write_bytes(b"x")
    elif kind == "a_file":
        path.write_bytes(b"x")
    line = fails(["--pretrained_model_name_or_path", "" if kind == "empty" else path, "--concept", "nudity",
                  "--output_dir", tmp_path / "out"], capsys)
    expected = {"missing": "does not exist", "not_diffusers": "not a diffusers", "a_file": "is a file, not a folder",
                "empty": "--pretrained_model_name_or_path is empty"}[kind]
    assert (kind == "empty" or str(path) in line) and expected in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("k", ["0", "-5", "100.5", "nan"])
def test_topk_out_of_range(tiny, capsys, k):
    line = fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--topk", k], capsys)
    assert "--topk" in line and "(0, 100]" in line


def test_empty_prompt_file(tiny, tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    line = fails(["--pretrained_model_name_or_path", tiny, "--concept", "my thing", "--forget_prompts", empty], capsys)
    assert "holds no prompts" in line and str(empty) in line
    line = fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--retain_prompts", tmp_path / "none.txt"], capsys)
    assert "does not exist" in line


def test_other_cross_flag_checks(tiny, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a glowing cube\n")
    assert "anchor prompt" in fails(["--pretrained_model_name_or_path", tiny, "--concept", "cube", "--forget_prompts", prompts,
                                     "--forget_loss", "redirect"], capsys)
    assert "--targets" in fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--targets", "attn2.(("], capsys)
    assert "--num_retain_images" in fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--num_retain_images", 0,
                                           "--retain_loss", "data"], capsys)
    assert "--distill_empty_fraction" in fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity",
                                                "--distill_empty_fraction", 1.5], capsys)
    assert "--resume_from_checkpoint" in fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity",
                                                "--resume_from_checkpoint", tmp_path / "nope"], capsys)
    assert "--concept is required" in fails(["--pretrained_model_name_or_path", tiny], capsys)
    assert "names 'lora' twice" in fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity",
                                          "--export_format", "lora,lora"], capsys)
    assert "--anchor_prompt is empty" in fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity",
                                                "--anchor_prompt", "  "], capsys)
    assert f"prompt file {str(tmp_path)!r} is a folder" in fails(["--pretrained_model_name_or_path", tiny, "--concept", "cube",
                                                               "--forget_prompts", tmp_path], capsys)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    assert "are the same images" in fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--forget_images",
                                           tmp_path / "imgs", "--retain_images", tmp_path / "imgs" / "sub"], capsys)


def test_check_names_targets_that_select_nothing(tiny, tmp_path, capsys):
    """--check reads the denoiser's config (no weights) and refuses a --targets / --exclude that selects no weight."""
    base = ["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", tmp_path / "o", "--check"]
    assert "'zzz' (exclude None) match no parameter" in fails(base + ["--targets", "zzz"], capsys)
    assert "(exclude '.*') match no parameter" in fails(base + ["--exclude", ".*"], capsys)
    assert not (tmp_path / "o").exists()


def test_several_concepts_checks(tiny, capsys):
    """--concept a,b: each a preset, none twice, no anchor that names another erased concept."""
    base = ["--pretrained_model_name_or_path", tiny, "--concept"]
    assert "names the erased concept 'four'" in fails(base + ["three,four"], capsys)
    assert "listed twice" in fails(base + ["three,five,three"], capsys)
    assert "'unicorn'" in fails(base + ["three,unicorn"], capsys)
    assert "empty name" in fails(base + ["three,,five"], capsys)
    from erase.sd import parse_args

    args = parse_args(base + ["three,five,eight"])
    cs = args.concept_set
    assert [c.name for c in cs.concepts] == ["three", "five", "eight"] and args.forget_loss == "redirect"
    named = {w for p in cs.retain_prompts for w in p.split()}
    assert not named & {"three", "3", "five", "5", "eight", "8"} and {"two", "nine", "0"} <= named
    assert len(cs.retain_prompts) == 7 * 6


def test_concept_file_erases_free_form_concepts_together(tiny, tmp_path, capsys):
    """--concept FILE.json: free-form concepts with their own prompts and anchors, mixed with presets; every mistake in
    the file is one line naming the file, the entry and the field."""
    import json

    from erase.sd import parse_args

    listed = tmp_path / "many.json"
    listed.write_text(json.dumps([
        {"name": "red star", "forget_prompts": ["a red star", "two red stars"], "anchor_prompt": "a red circle",
         "retain_prompts": ["a blue star", "a red circle", "a red star on grey"]},
        {"name": "teal", "forget_prompts": ["a teal moon"], "anchor_prompt": "a green moon", "retain_prompts": ["a blue moon"]}]))
    cs = parse_args(["--pretrained_model_name_or_path", tiny, "--concept", f"{listed},three"]).concept_set
    assert [c.name for c in cs.concepts] == ["red star", "teal", "three"]
    assert cs.concepts[0].forget_prompts == ["a red star", "two red stars"] and cs.concepts[1].anchor_prompt == "a green moon"
    assert "a blue star" in cs.retain_prompts and "a red star on grey" in cs.retain_prompts  # kept: not a forget prompt
    assert not {"a red star", "two red stars", "a teal moon"} & set(cs.retain_prompts)

    one = tmp_path / "cube.json"  # one object: its name defaults to the file's stem; --forget_prompts still overrides
    one.write_text(json.dumps({"forget_prompts": ["a cube"], "anchor_prompt": "a ball"}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a glowing cube\n")
    args = parse_args(["--pretrained_model_name_or_path", tiny, "--concept", str(one), "--forget_prompts", str(prompts)])
    assert [(c.name, c.forget_prompts, c.anchor_prompt) for c in args.concept_set.concepts] == [("cube", ["a glowing cube"], "a ball")]

    base = ["--pretrained_model_name_or_path", tiny, "--concept"]
    bad = tmp_path / "bad.json"
    for content, expect in [("[{", "not valid JSON"), ("[]", "non-empty list"), ('"x"', "one concept object"),
                            ('[{"name": "a", "forget_prompts": ["x"], "colour": 1}]', "unknown field 'colour'"),
                            ('[{"forget_prompts": ["x"]}]', "entry 0 has no 'name'"),
                            ('[{"name": "../up", "forget_prompts": ["x"]}]', "'../up' is not allowed"),
                            ('[{"name": "a", "forget_prompts": "x"}]', "'forget_prompts' must be a list of strings"),
                            ('[{"name": "a", "forget_prompts": []}]', "has no forget prompts"),
                            ('[{"name": "a", "forget_prompts": ["x"]}, {"name": "a", "forget_prompts": ["y"]}]', "listed twice")]:
        bad.write_text(content)
        line = fails(base + [str(bad)], capsys)
        assert expect in line and "\n" not in line.strip(), (content, line)
    assert "does not exist" in fails(base + [str(tmp_path / "nope.json")], capsys)
    assert "--forget_prompts applies to one concept" in fails(base + [str(listed), "--forget_prompts", str(prompts)], capsys)


def test_default_forget_term_is_never_unbounded_ascent(tiny, tmp_path):
    """Scissorhands redirects when the concept has an anchor; without one (and for ga) the ascent is bounded."""
    from erase.sd import DEFAULT_FORGET_BOUND, parse_args

    prompts = tmp_path / "p.txt"
    prompts.write_text("a glowing cube\n")
    base = ["--pretrained_model_name_or_path", str(tiny), "--concept"]
    args = parse_args(base + ["nudity"])
    assert (args.forget_loss, args.retain_loss, args.topk, args.lam) == ("redirect", "distill", 2.0, 0.3)  # tuned defaults
    assert parse_args(base + ["nudity", "--topk", "7"]).topk == 7.0
    assert parse_args(base + ["nudity", "--method", "salun"]).topk is None  # not a SalUn option
    args = parse_args(base + ["cube", "--forget_prompts", str(prompts)])
    assert (args.forget_loss, args.forget_bound) == ("ascent", DEFAULT_FORGET_BOUND)
    assert parse_args(base + ["nudity", "--method", "ga"]).forget_bound == DEFAULT_FORGET_BOUND
    assert parse_args(base + ["nudity", "--forget_loss", "ascent", "--forget_bound", "0.5"]).forget_bound == 0.5


def test_target_regex_matching_nothing(tiny, tmp_path, capsys):
    line = fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", tmp_path, "--targets", r"nothing\.here",
                  "--num_forget_images", 1, "--num_retain_images", 1, "--num_inference_steps", 1], capsys)
    assert "match no parameter" in line
    assert not (tmp_path / "erase_config.json").exists()


def test_cli_one_line_and_list_concepts():
    """Through the real entry point (python erase/sd.py): stderr is one line, exit 2; --list_concepts prints presets."""
    run = subprocess.run([sys.executable, "erase/sd.py", "--concept", "unicorns"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "presets:" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "erase.sd", "--list_concepts"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    names = [ln.split()[0] for ln in run.stdout.splitlines() if ln.strip()]
    assert {"nudity", "van_gogh", "church", "eiffel_tower", "parachute"} <= set(names)


@pytest.mark.parametrize("targets,expect", [("xattn", ".attn2."), ("selfattn", ".attn1."), (r".*conv_in\..*", "conv_in.")])
def test_list_targets_prints_what_matches_without_loading_weights(targets, expect, tiny, capsys):
    from erase.sd import main, parse_args

    info = main(parse_args(["--pretrained_model_name_or_path", str(tiny), "--list_targets", "--targets", targets]))
    lines = capsys.readouterr().out.strip().splitlines()
    listed = [ln.split("\t")[0] for ln in lines if not ln.startswith("#")]
    assert listed == list(info["tensors"]) and listed and all(expect in n for n in listed)
    assert lines[-1].startswith(f"# {len(listed)} tensors, {info['num_parameters']:,} of ")


def test_projection_flags_reach_the_method(tiny, capsys):
    from erase.core import build_method
    from erase.sd import parse_args

    args = parse_args(["--pretrained_model_name_or_path", str(tiny), "--concept", "nudity", "--no_update_projection", "--margin", "0.5"])
    config = build_method("scissorhands", "diffusion", **args.method_options).config
    assert config.project_update is False and config.project is True and config.margin == 0.5
    assert "--margin -1 is outside the allowed range >= 0" in fails(["--pretrained_model_name_or_path", tiny, "--concept", "nudity",
                                                             "--margin", "-1"], capsys)
