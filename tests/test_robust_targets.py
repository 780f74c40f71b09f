"""benchmarks/robust_targets.py: issue 17's targets checked per (point, digit, seed) against the retrain reference of
the same digit and seed, counted over digit-seeds, from robust_digits.py results files; and the gates of an
eval.shapes / eval.digits bench run with --attacks, from the bench's own gaps."""

import json

import pytest


def _row(point, digit, seed, **values):
    base = {"kind": "point", "method": "scissorhands"} if point not in ("base", "retrain") else {"kind": point}
    return {**base, "point": point, "digit": digit, "seed": seed, **values}


def _results(path, rows, points=None):
    path.write_text(json.dumps({"rows": rows, "points": points or {"plain": {"method": "scissorhands", "flags": ""},
                                                                       "robust": {"method": "scissorhands", "flags": "--robust"}}}))
    return str(path)


AUDIT = {"forget_acc": 0.0, "heldout_forget_acc": 0.0, "retain_acc": 0.99, "retain_fd": 100.0}


def test_targets_per_digit_seed_against_the_same_seeds_reference(tmp_path, capsys):
    from benchmarks.robust_targets import main

    seed0 = [_row("base", 3, 0, **AUDIT, inversion_500=1.0),
             _row("retrain", 3, 0, **AUDIT, inversion_500=0.20, inversion_2000=0.10, relearn_25=0.50, uda_minus_control=0.0),
             _row("plain", 3, 0, **AUDIT, cpu_seconds=20.0, inversion_500=0.90, inversion_2000=0.95, relearn_25=0.55),
             # inversion within 10 of seed 0's reference, relearning 30 above it, FD 1.2 x, held-out 5 %
             _row("robust", 3, 0, **{**AUDIT, "retain_fd": 120.0, "heldout_forget_acc": 0.05}, cpu_seconds=30.0,
                  inversion_500=0.25, inversion_2000=0.20, relearn_25=0.80, uda_minus_control=0.10)]
    seed1 = [_row("base", 3, 0, **AUDIT),
             # seed 1's reference relearns faster: the same 0.80 is within 10 of it
             _row("retrain", 3, 1, **AUDIT, inversion_500=0.0, inversion_2000=0.0, relearn_25=0.75, uda_minus_control=0.0),
             _row("plain", 3, 1, **AUDIT, cpu_seconds=10.0, relearn_25=0.70),
             _row("robust", 3, 1, **{**AUDIT, "retain_acc": 0.975}, cpu_seconds=60.0, inversion_500=0.05,
                  inversion_2000=0.15, relearn_25=0.80, uda_minus_control=0.05)]
    out = main([_results(tmp_path / "s0.json", seed0), _results(tmp_path / "s1.json", seed1), "--json", str(tmp_path / "t.json")])
    robust = {(c["unit"], c["seed"]): c["checks"] for c in out["robust"]["cells"]}
    s0, s1 = robust[("three", 0)], robust[("three", 1)]
    assert s0["inversion at 500 steps"] == {"met": True, "value": "+5.0", "limit": "<= 10 points"}
    assert s0["inversion at 2000 steps"]["met"] and s0["inversion at 2000 steps"]["value"] == "+10.0"  # the limit is met
    assert not s0["relearning at 25 steps"]["met"] and s0["relearning at 25 steps"]["value"] == "+30.0"
    assert not s0["unlearndiffatk asr_minus_control"]["met"] and s0["unlearndiffatk asr_minus_control"]["value"] == "+10.0"
    assert not s0["FD"]["met"] and not s0["held-out forget"]["met"] and s0["retain"]["met"]
    assert s0["cost"] == {"met": True, "value": "1.50 x", "limit": "<= 5 x plain"}
    assert not s0["every gap measured"]["met"] and s0["every gap measured"]["value"] == "2/4"
    assert s1["relearning at 25 steps"]["met"] and s1["relearning at 25 steps"]["value"] == "+5.0"
    assert not s1["inversion at 2000 steps"]["met"]  # 15 points above a reference that never draws it
    assert s1["unlearndiffatk asr_minus_control"]["met"]  # +5.0: within
    assert not s1["retain"]["met"]  # 97.5 < 99.0 - 1
    assert not s1["cost"]["met"] and s1["cost"]["value"] == "6.00 x"
    counts = out["robust"]["counts"]
    assert counts["relearning at 25 steps"] == {"met": 1, "of": 2}
    assert counts["inversion at 500 steps"] == {"met": 2, "of": 2}
    assert counts["every gap measured"] == {"met": 0, "of": 2}
    # the plain rows: no cost check against themselves; only the gaps their attacks measured
    plain = {(c["unit"], c["seed"]): c["checks"] for c in out["plain"]["cells"]}
    assert "cost" not in plain[("three", 0)] and "unlearndiffatk asr_minus_control" not in plain[("three", 0)]
    assert plain[("three", 1)]["relearning at 25 steps"]["value"] == "-5.0"
    assert json.loads((tmp_path / "t.json").read_text())["tally"]["robust"]["counts"] == counts
    text = capsys.readouterr().out
    assert "| three | 1 |" in text and "| relearning at 25 steps | 1 of 2 rows |" in text


def test_a_row_given_twice_or_a_file_that_is_not_a_table_is_refused(tmp_path, capsys):
    from benchmarks.robust_targets import main

    rows = [_row("base", 3, 0, **AUDIT), _row("retrain", 3, 0, **AUDIT), _row("robust", 3, 0, **AUDIT, cpu_seconds=1.0)]
    a, b = _results(tmp_path / "a.json", rows), _results(tmp_path / "b.json", rows)
    with pytest.raises(SystemExit) as e:  # cli_errors: one line "error: ...", exit status 1
        main([a, b])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    assert "point retrain three seed 0" in msg and "a.json" in msg and "b.json" in msg
    (tmp_path / "c.json").write_text(json.dumps({"methods": {}}))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "c.json")])
    assert "c.json is neither a benchmarks/robust_digits.py results.json" in str(e.value.code)
    assert capsys.readouterr().out == ""  # nothing printed before the refusal


def test_a_bench_with_attacks_is_read_from_its_own_gaps(tmp_path):
    """eval.shapes bench results: each method's run is a row; its <column>_gap (the bench's, against the same seed's
    retrain model) is what the gate reads; the retrain runs are references, not rows."""
    from benchmarks.robust_targets import main

    def run(seed, **gaps):
        return {"seed": seed, "forget_acc": 0.0, **{f"{k}_gap": v for k, v in gaps.items()}, "inversion_500": 0.9}

    bench = {"concept": "circle", "attack_columns": ["inversion_500", "inversion_2000", "relearn_25"],
             "runs": {"retrain": [{"seed": 0, "forget_acc": 0.0, "inversion_500": 0.6}],
                      "scissorhands": [run(0, inversion_500=0.0, inversion_2000=0.125, relearn_25=0.367)],
                      "uce": [run(0, inversion_500=0.2, inversion_2000=0.1, relearn_25=-0.017)],
                      "scissorhands+robust": [run(0, inversion_500=-0.05, inversion_2000=-0.075, relearn_25=-0.1)]}}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    out = main([str(tmp_path / "b.json")])
    assert set(out) == {"scissorhands", "uce", "scissorhands+robust"}
    assert out["uce"]["method"] == "uce" and out["scissorhands+robust"]["method"] == "scissorhands"
    sh = out["scissorhands"]["cells"][0]
    assert sh["unit"] == "circle" and sh["seed"] == 0
    assert sh["checks"]["inversion at 500 steps"]["met"] and not sh["checks"]["inversion at 2000 steps"]["met"]
    assert sh["checks"]["relearning at 25 steps"]["value"] == "+36.7"
    assert not out["uce"]["cells"][0]["checks"]["inversion at 500 steps"]["met"]
    assert out["scissorhands+robust"]["counts"]["every gap measured"] == {"met": 1, "of": 1}
    assert "unlearndiffatk asr_minus_control" not in sh["checks"]  # not run: not a check
