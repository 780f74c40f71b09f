"""Stacked erasures: a second erasure made on the first one's exported pipeline is still audited as a world model, and
the robustness benchmark's ``--pre_edit`` builds such points (benchmarks/robust_digits.py)."""

import json

import pytest

from eval_fixtures import error_text


def test_an_erasure_stacked_on_an_exported_erasure_is_still_a_digits_model(tmp_path):
    """A second erasure made on the first one's exported pipeline: the world card is found at the first base, the
    model loads over its direct base; a folder chain that loops or ends outside a digits model is one clear line."""
    from eval.digits.model import MODEL_CARD
    from erase.utils.errors import UserError
    from eval.digits.score import resolve_digits_model as resolve_model

    base, first, second = tmp_path / "base", tmp_path / "first", tmp_path / "second"
    for folder, parent in ((first, base), (second, first)):
        (folder / "unet").mkdir(parents=True)
        (folder / "erase_config.json").write_text(json.dumps({"pretrained_model_name_or_path": str(parent)}))
    (first / "model_index.json").write_text("{}")  # exported with --export_pipeline: a pipeline of its own
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    (base / MODEL_CARD).write_text(json.dumps({"kind": "digits", "fingerprint": "f"}))
    card, loads_over, record = resolve_model(str(second))
    assert card["fingerprint"] == "f" and loads_over == str(first) and record["pretrained_model_name_or_path"] == str(first)

    (base / MODEL_CARD).unlink()  # the chain ends outside a digits model
    with pytest.raises(UserError, match=r"second \(base '.*first'\) is not a digits model"):
        resolve_model(str(second))
    (first / "erase_config.json").write_text(json.dumps({"pretrained_model_name_or_path": str(first)}))  # a loop
    with pytest.raises(UserError, match="is not a digits model"):
        resolve_model(str(second))


def test_robust_benchmark_points_can_stack_on_a_closed_form_edit(tmp_path):
    """robust_digits.py's own --pre_edit is taken out of the flags erase/sd.py gets; only a closed-form method is one."""
    from benchmarks.robust_digits import parse_args

    a = parse_args(["--output_dir", str(tmp_path), "--grid", "plain=scissorhands",
                    "--grid", "u=scissorhands --robust --pre_edit uce --targets attn"])
    assert a.points["u"] == {"method": "scissorhands", "flags": "--robust --targets attn", "pre_edit": "uce"}
    assert a.points["plain"]["pre_edit"] is None
    for bad, says in (("x=scissorhands --pre_edit esd", "'esd' is not a closed-form method"),
                      ("x=scissorhands --pre_edit", "needs a closed-form method")):
        with pytest.raises(SystemExit) as e:
            parse_args(["--output_dir", str(tmp_path), "--grid", bad])
        assert says in error_text(e)
