"""End to end: ``classify.run`` on digits with tiny settings; asserts on the contents of what it writes."""

from __future__ import annotations

import json

import pytest

from classify.metrics import METRICS
from classify.run import main, parse_args

ROWS = ["original", "retrain", "retrain2", "ft", "ga", "scissorhands", "scissorhands_no_trim"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify_run")
    main(parse_args(["--dataset", "digits", "--forget", "random:0.1", "--methods", "retrain,ft,ga,scissorhands", "--seeds", "0,1",
                     "--ablations", "no_trim", "--ref_epochs", "2", "--max_train_steps", "3", "--topk", "0.2",
                     "--output_dir", str(root / "out"), "--cache_dir", str(root / "cache")]))
    out = root / "out"
    return json.loads((out / "results.json").read_text()), json.loads((out / "per_seed.json").read_text()), out


def test_results_json_schema_and_ranges(outputs):
    results, _, _ = outputs
    assert set(results) == {"methods", "settings"}
    assert set(results["methods"]) == set(ROWS)
    for name, entry in results["methods"].items():
        for key in (*METRICS, "AvgGap", "RTE"):
            assert {"mean", "std"} <= set(entry[key]), (name, key)
            assert entry[key]["std"] >= 0
        for key in METRICS:
            assert 0.0 <= entry[key]["mean"] <= 100.0
        assert entry["seeds"] == 2 and 0 <= entry["collapsed"] <= 2
    retrain = results["methods"]["retrain"]
    assert retrain["AvgGap"] == {"mean": 0.0, "std": 0.0, "median": 0.0} and retrain["RTE_ratio"]["mean"] == pytest.approx(1.0)
    assert results["methods"]["original"]["RTE"]["mean"] == 0.0
    assert results["methods"]["ft"]["RTE"]["mean"] > 0


def test_avg_gap_is_consistent_with_the_metrics(outputs):
    results, per_seed, _ = outputs
    assert len(per_seed) == 2 * len(ROWS)
    ref = {r["seed"]: r for r in per_seed if r["method"] == "retrain"}
    for r in per_seed:
        expected = sum(abs(r[m] - ref[r["seed"]][m]) for m in METRICS) / 4
        assert r["AvgGap"] == pytest.approx(expected)
    for name, entry in results["methods"].items():
        gaps = [r["AvgGap"] for r in per_seed if r["method"] == name]
        assert entry["AvgGap"]["mean"] == pytest.approx(sum(gaps) / 2)
        # the mean of per-seed gaps bounds the gap of the means (triangle inequality)
        gap_of_means = sum(abs(entry[m]["mean"] - results["methods"]["retrain"][m]["mean"]) for m in METRICS) / 4
        assert entry["AvgGap"]["mean"] >= gap_of_means - 1e-9
    sciss = {r["seed"]: r["AvgGap"] for r in per_seed if r["method"] == "scissorhands"}
    ft = [r["AvgGap"] - sciss[r["seed"]] for r in per_seed if r["method"] == "ft"]
    assert results["methods"]["ft"]["paired_vs_scissorhands"]["mean"] == pytest.approx(sum(ft) / 2)


def test_protocol_per_seed(outputs):
    _, per_seed, _ = outputs
    for seed in (0, 1):
        rows = {r["method"]: r for r in per_seed if r["seed"] == seed}
        assert len({rows["original"]["init_seed"], rows["retrain"]["init_seed"], rows["retrain2"]["init_seed"]}) == 3
        assert rows["scissorhands"]["trim"]["reset"] == round(0.002 * rows["scissorhands"]["trim"]["targeted"])
        assert "reset" not in rows["scissorhands_no_trim"]["trim"]
    assert per_seed[0]["forget_size"] == round(0.1 * (per_seed[0]["forget_size"] + per_seed[0]["retain_size"]))


def test_settings_markdown_and_chart(outputs):
    results, _, out = outputs
    s = results["settings"]
    assert s["seeds"] == [0, 1] and s["forget"] == "random:0.1" and s["dataset"] == "digits"
    assert s["scissorhands"]["topk"] == 0.2 and s["scissorhands"]["margin"] == 0.0 and "trim_only" in s["scissorhands"]
    assert s["hparams"]["scissorhands_no_trim"]["ablation"] == "no_trim" and s["hparams"]["ga"]["max_train_steps"] == 3
    assert s["reference_training"]["epochs"] == 2
    md = (out / "results.md").read_text()
    assert "| scissorhands_no_trim |" in md and "±" in md and "| retrain2 |" in md
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
