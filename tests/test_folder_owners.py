"""Who may write where: one command's folder is not another's (the marker's ``written_by``), and Ctrl-C is one line.
The shared rails of the other promises are in test_safety.py (docs/RELIABILITY.md §1)."""

from __future__ import annotations

import json

import pytest

from erase.utils.folders import check_output_dir, claim_output_dir, MARKER_NAME
from eval_fixtures import USER_FACING, error_text


def one_line(err) -> str:
    msg = error_text(err)
    assert "\n" not in msg and msg.strip(), msg
    return msg


def test_ctrl_c_is_one_line_and_status_130(capsys):
    from erase.utils.errors import cli_errors

    @cli_errors
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as err:
        main()
    assert err.value.code == 130
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: ")


def test_a_command_writes_only_into_its_own_folders(tmp_path):
    """One command never replaces another's results: an audit folder is refused to an attack (and the other way
    round) unless --overwrite; the same command reruns; erase.export adds formats to an erase/sd.py export."""
    audit = tmp_path / "audit"
    with claim_output_dir(audit, by="eval.digits score"):
        (audit / "summary.json").write_text("{}")
    check_output_dir(audit, by="eval.digits score")
    with pytest.raises(USER_FACING) as err:
        claim_output_dir(audit, by="eval.attack replay")
    assert "holds the output of eval.digits score, not of eval.attack replay" in one_line(err)
    assert sorted(p.name for p in audit.iterdir()) == [MARKER_NAME, "summary.json"]  # untouched, no lock left
    check_output_dir(audit, by="eval.attack replay", overwrite=True)
    check_output_dir(audit)  # a claim that names no command: as before
    erased = tmp_path / "erased"
    with claim_output_dir(erased, by="erase/sd.py"):
        (erased / "erase_config.json").write_text("{}")
    check_output_dir(erased, by="erase.export")
    with pytest.raises(USER_FACING):
        check_output_dir(erased, by="eval.i2p")
    older = tmp_path / "older"  # an erased model of an older version: a record of ours, no marker
    older.mkdir()
    (older / "erase_config.json").write_text(json.dumps({"pretrained_model_name_or_path": "m", "method": "ft"}))
    check_output_dir(older, by="erase.export")
    with pytest.raises(USER_FACING) as err:
        check_output_dir(older, by="eval.i2p")
    assert "holds the output of erase/sd.py" in one_line(err)
