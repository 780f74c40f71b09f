"""Method options come from the method configs: every field is a flag, a foreign flag is an error, --help groups them."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from erase.core import available_methods, build_method, get_method_class
from erase.core.options import option_fields

SAMPLE = {bool: None, int: 3, float: 0.25, str: None}  # None: chosen per field below


def _value(f: dataclasses.Field, kind: type):
    """A legal non-default value of the field as a command-line string, or None when there is none."""
    if f.metadata.get("choices"):
        others = [c for c in f.metadata["choices"] if c != f.default]
        return others[0] if others else None
    if kind is str:
        return {"trim_only": "attn2", "forget_loss": "redirect"}.get(f.name)
    if kind is float:
        return 7.5 if f.name in ("topk", "mask_ratio") else 0.25
    return SAMPLE.get(kind)


def _cases(task: str):
    for method in available_methods(task):
        for f, kind in option_fields(method, task):
            yield method, f, kind


def _sd(tiny, *extra):
    from erase.sd import parse_args

    return parse_args(["--pretrained_model_name_or_path", str(tiny), "--concept", "nudity", *map(str, extra)])


def test_build_method_rejects_keys_the_method_does_not_have():
    with pytest.raises(TypeError, match=r"method salun has no option 'topk'; its options: mask_ratio"):
        build_method("salun", "diffusion", topk=5)
    assert build_method("salun", "diffusion", mask_ratio=5, alpha=None).config.mask_ratio == 5  # None = config default


#: options that only mean something beside another one (refused alone, one line): the companion flags they get here
NEEDS = {"relearn_params": ("--relearn_radius", "0.01")}


@pytest.mark.parametrize("method, field, kind", [c for c in _cases("diffusion")], ids=lambda x: getattr(x, "name", str(x)))
def test_every_option_of_every_diffusion_method_is_a_flag_of_erase_sd(tiny, method, field, kind):
    if kind is bool:
        flag, expected = (f"--no_{field.name}", False) if field.default else (f"--{field.name}", True)
        args = _sd(tiny, "--method", method, flag)
    else:
        value = _value(field, kind)
        if value is None:
            pytest.skip(f"{method}.{field.name}: no second legal value to set")
        args = _sd(tiny, "--method", method, *NEEDS.get(field.name, ()), f"--{field.name}", value)
        expected = kind(value)
    overrides = args.method_options
    assert overrides[field.name] == expected
    assert getattr(build_method(method, "diffusion", **overrides).config, field.name) == expected


@pytest.mark.parametrize("argv, words", [
    (["--method", "salun", "--topk", "5"], "--topk is not an option of method salun (it belongs to scissorhands); salun's options: --mask_ratio"),
    (["--method", "ga", "--mask_ratio", "5"], "--mask_ratio is not an option of method ga (it belongs to salun)"),
    (["--method", "esd", "--no_projection"], "--project is not an option of method esd"),
    (["--method", "ft", "--lam", "0.1"], "--lam is not an option of method ft"),
    (["--k_basis", "sideways"], "argument --k_basis: invalid choice: 'sideways'"),
    (["--trim_only", "up_blocks["], "--trim_only 'up_blocks[' is not a valid regex"),
    (["--forget_loss", "relabel"], "--forget_loss 'relabel' is not one of the diffusion forget terms"),
])
def test_a_foreign_or_bad_option_is_one_line(tiny, argv, words, capsys):
    with pytest.raises(SystemExit) as err:
        _sd(tiny, *argv)
    msg = capsys.readouterr().err.strip() if isinstance(err.value.code, int) else str(err.value.code)
    assert err.value.code not in (0, None) and words in msg and "\n" not in msg, msg


def test_options_that_had_no_flag_are_settable(tiny):
    args = _sd(tiny, "--trim_only", "up_blocks", "--k_basis", "reset", "--forget_steps", "first_per_epoch")
    config = build_method("scissorhands", "diffusion", **args.method_options).config
    assert (config.trim_only, config.k_basis, config.forget_steps) == ("up_blocks", "reset", "first_per_epoch")
    assert (config.topk, config.lam) == (2.0, 0.3)  # the SD adapter's defaults still apply


def test_help_lists_each_method_under_its_own_heading(tiny, capsys):
    with pytest.raises(SystemExit) as err:
        _sd(tiny, "--help")
    assert err.value.code == 0
    text = capsys.readouterr().out
    for method in available_methods("diffusion"):
        fields = [f.name for f, _ in option_fields(method, "diffusion")]
        if not fields:
            continue
        heading = f"{method} options (--method {method}):"
        assert heading in text, heading
        section = text.split(heading, 1)[1].split(" options (--method ", 1)[0]
        assert all(f"--{n}" in section for n in fields), (method, fields)
    assert "(default: 2.0)" in text.split("scissorhands options", 1)[1].split("--lam", 1)[0]  # the adapter's top-k


def test_classify_run_options_apply_to_each_method_that_has_them(tmp_path):
    from classify.run import method_overrides, parse_args

    args = parse_args(["--output_dir", str(tmp_path / "o"), "--methods", "salun,l1sparse,scissorhands", "--alpha", "0.5",
                       "--k_basis", "reset"])
    overrides = method_overrides(args)
    assert overrides == {"salun": {"alpha": 0.5}, "l1sparse": {"alpha": 0.5}, "scissorhands": {"k_basis": "reset"}}
    with pytest.raises(SystemExit, match="--topk is an option of scissorhands, none of which is in --methods salun"):
        parse_args(["--output_dir", str(tmp_path / "o"), "--methods", "salun", "--topk", "5"])
    assert not (tmp_path / "o").exists()


def test_option_types_come_from_the_annotations():
    hints = typing.get_type_hints(get_method_class("scissorhands").config_cls)
    kinds = dict((f.name, k) for f, k in option_fields("scissorhands"))
    assert kinds["topk"] is float and kinds["forget_bound"] is float and hints["forget_bound"] == float | None
    assert kinds["project"] is bool and kinds["memory_refresh"] is int and kinds["trim_only"] is str
