"""The benches' erasure runner (eval.digits.bench.run_recorded, shared by the digits and shapes tables): one process per
erasure, its cost recorded beside it, a finished run of the same command reused, a failed one named in one line."""

import json
import sys

import pytest

from erase.utils.errors import UserError
from eval.digits.bench import run_recorded

# stands in for erase/sd.py: counts its runs, then writes the erasure's record (or fails with a last line of its own)
WRITER = ("import json, pathlib, sys; out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True); "
          "runs = out.parent / 'runs.txt'; runs.write_text(runs.read_text() + 'x' if runs.exists() else 'x'); "
          "print('step 1 of 1'); (out / 'erase_config.json').write_text(json.dumps({'train_seconds': 0.25}))")
FAILER = "import sys; print('loading'); print('error: --lam -1 is out of range (allowed: >= 0)'); sys.exit(2)"


def test_a_run_is_recorded_then_reused_for_the_same_command_only(tmp_path):
    out = tmp_path / "runs" / "scissorhands-seed0"
    cmd = [sys.executable, "-c", WRITER, str(out)]
    info = run_recorded(cmd, out, "erase/sd.py --method scissorhands --seed 0")
    record = json.loads((tmp_path / "runs" / "scissorhands-seed0.json").read_text())
    assert record == info and info["command"] == cmd and info["wall_seconds"] > 0 and info["cpu_seconds"] > 0
    assert info["peak_rss_mb"] > 1 and "step 1 of 1" in (tmp_path / "runs" / "scissorhands-seed0.log").read_text()
    assert run_recorded(cmd, out, "again") == info and (tmp_path / "runs" / "runs.txt").read_text() == "x"  # reused
    other = cmd + ["--another-flag"]  # another command is run again, and its record replaces the first
    assert run_recorded(other, out, "again")["command"] == other and (tmp_path / "runs" / "runs.txt").read_text() == "xx"
    (out / "erase_config.json").unlink()  # a record without the finished erasure beside it is not trusted
    run_recorded(other, out, "again")
    assert (tmp_path / "runs" / "runs.txt").read_text() == "xxx"
    for garbage in ("{not json", "[1, 2]"):  # a record that is not one of ours is not trusted either: run again
        (tmp_path / "runs" / "scissorhands-seed0.json").write_text(garbage)
        assert run_recorded(other, out, "again")["command"] == other
    assert (tmp_path / "runs" / "runs.txt").read_text() == "xxxxx"


def test_a_bench_names_its_own_fields(tmp_path):
    out = tmp_path / "uce-seed1"

    def describe(info):
        seconds = json.loads((out / "erase_config.json").read_text())["train_seconds"]
        return {"erase_seconds": info.pop("wall_seconds"), "method_seconds": seconds, **info}

    info = run_recorded([sys.executable, "-c", WRITER, str(out)], out, "erase", describe)
    assert "wall_seconds" not in info and info["erase_seconds"] > 0 and info["method_seconds"] == 0.25
    assert json.loads((tmp_path / "uce-seed1.json").read_text()) == info


def test_a_failed_run_says_what_failed_with_its_last_line_and_records_nothing(tmp_path):
    out = tmp_path / "esd-seed2"
    with pytest.raises(UserError) as err:
        run_recorded([sys.executable, "-c", FAILER], out, "erase/sd.py --method esd --seed 2")
    msg = str(err.value)
    assert msg.startswith("erase/sd.py --method esd --seed 2 failed (exit 2): error: --lam -1 is out of range")
    assert "esd-seed2.log" in msg and "\n" not in msg and not (tmp_path / "esd-seed2.json").exists()
