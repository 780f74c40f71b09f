"""The digits benchmark's pure parts: the tuning rule, the grid's waves, the tables and the gaps (no model)."""

from __future__ import annotations

import pytest


def test_tuning_rule_admits_then_ranks_then_breaks_ties_by_fd():
    """benchmarks/digits_tune.py's fixed rule: forget / held-out forget <= 2 % and FD <= 1.3x base on each tuning
    digit; then the highest mean retain; within 0.25 points the lowest FD ratio, then grid order."""
    from benchmarks.digits_tune import choose

    bases = {7: {"retain_fd": 100.0, "retain_acc": 0.99}, 1: {"retain_fd": 200.0, "retain_acc": 0.99}}

    def runs(point, retain, fd_ratio, forget=0.0, held=0.0):
        return [{"point": point, "digit": d, "seed": s, "forget_acc": forget, "heldout_forget_acc": held,
                 "retain_acc": retain, "retain_fd": fd_ratio * bases[d]["retain_fd"]} for d in (7, 1) for s in (0, 1)]

    points = ["a", "b", "c", "d", "e"]
    all_runs = (runs("a", 0.995, 1.20) + runs("b", 0.9935, 1.05)  # b ties a (0.15 points) with a lower FD ratio
                + runs("c", 0.999, 1.0, forget=0.05)  # best retain, but does not forget
                + runs("d", 0.999, 1.35)  # best retain, but the FD is past 1.3x
                + runs("e", 0.990, 1.0))  # admissible, 0.5 points behind
    agg, chosen = choose(points, all_runs, bases)
    assert chosen == "b"
    assert [agg[p]["admissible"] for p in points] == [True, True, False, False, True]
    assert agg["a"]["per_digit"]["seven"]["fd_ratio"] == pytest.approx(1.2)
    assert choose(["c", "d"], runs("c", 0.999, 1.0, forget=0.05) + runs("d", 0.999, 1.35), bases)[1] is None


def _grid_job(name, case, seed):
    return {"point": name, "case": case, "seed": seed}


def test_tuning_waves_run_the_first_point_first_and_every_cell():
    """benchmarks/grid.py: every (point, case, seed) once, the first point's jobs before the others (they make each data
    folder), the base of each case alongside, each row reported in order."""
    from benchmarks.grid import parse_points, run_waves

    assert parse_points(["a=--lr 1e-3", "b = --topk 5 "]) == {"a": "--lr 1e-3", "b": "--topk 5"}
    seen = []  # one worker runs in this process (the suite's process is too large to fork reliably)
    runs, bases = run_waves(1, ["a", "b"], [(1, 0), (2, 0), (1, 1)], _grid_job, str, [1, 2], seen.append)
    assert [(r["point"], r["case"], r["seed"]) for r in runs] == [("a", 1, 0), ("a", 2, 0), ("a", 1, 1), ("b", 1, 0),
                                                                   ("b", 2, 0), ("b", 1, 1)]
    assert seen == runs and bases == {1: "1", 2: "2"}


def test_bench_tables_show_budget_curves_gaps_and_the_robustness_targets(tmp_path):
    """From a results dict: the gap targets of issue 17 are checked on the gap columns, the markdown has the gap table
    and chart.png has a budget-curve panel per attack (retrain beside the methods)."""
    from PIL import Image

    from eval.digits.tables import chart, markdown, targets

    def cell(x):
        return {"mean": x, "std": 0.0, "n": 1}

    base = {"forget_acc": 1.0, "retain_acc": 0.99, "retain_fd": 100.0, "heldout_forget_acc": 1.0, "heldout_retain_acc": 0.99,
            "per_digit_acc": {str(d): 1.0 for d in range(10)}}
    cols = ["relearn_0", "relearn_25", "inversion_0", "inversion_500", "inversion_2000", "uda_asr_40", "uda_asr_2000",
            "uda_minus_control"]
    retrain = {"relearn_0": 0.0, "relearn_25": 0.5, "inversion_0": 0.0, "inversion_500": 0.2, "inversion_2000": 0.3,
               "uda_asr_40": 0.0, "uda_asr_2000": 0.1, "uda_minus_control": 0.0}
    sh = {"relearn_0": 0.0, "relearn_25": 0.55, "inversion_0": 0.05, "inversion_500": 0.9, "inversion_2000": 1.0,
          "uda_asr_40": 0.1, "uda_asr_2000": 0.2, "uda_minus_control": 0.04}
    methods = {"scissorhands": {**{k: cell(v) for k, v in sh.items()}, **{f"{k}_gap": cell(sh[k] - retrain[k]) for k in cols},
                                "forget_acc": cell(0.0), "retain_acc": cell(0.99), "retain_fd": cell(101.0)}}
    results = {"concept": "seven", "digits": [7], "base_model": "m", "base": base, "methods": methods,
               "retrain": {**{k: cell(v) for k, v in retrain.items()}, "forget_acc": cell(0.0), "retain_acc": cell(0.99),
                           "retain_fd": cell(99.0)},
               "base_attacks": {k: cell(1.0) for k in cols}, "attack_columns": cols,
               "settings": {"max_train_steps": 1, "seeds": [0], "num_images": 1, "steps": 2, "guidance": 4.0,
                            "attacks": {"relearn": {"options": {}}}}}
    results["targets"] = targets(results)
    got = {t["target"]: t["met"] for t in results["targets"] if "retrain reference" in t["target"]}
    assert got == {"Scissorhands inversion at 500 steps: gap to the retrain reference <= 10 points": False,
                   "Scissorhands inversion at 2000 steps: gap to the retrain reference <= 10 points": False,
                   "Scissorhands relearning at 25 steps: gap to the retrain reference <= 10 points": True,
                   "Scissorhands unlearndiffatk asr_minus_control: gap to the retrain reference <= 5 points": True}
    md = markdown(results)
    assert "### Gap to the retrain reference" in md and "| scissorhands | 0.0 ± 0.0 | 5.0 ± 0.0 | 5.0 ± 0.0 | 70.0 ± 0.0 |" in md
    chart(results, tmp_path / "chart.png")
    with Image.open(tmp_path / "chart.png") as im:
        assert im.size[1] > 700  # two rows: the bars and the three budget-curve panels


def test_gaps_pair_each_erasure_with_the_retrain_model_of_its_seed():
    from eval.digits.bench import add_gaps

    results = {"runs": {"retrain": [{"seed": 0, "inversion_500": 0.2}, {"seed": 1, "inversion_500": 0.4}],
                        "esd": [{"seed": 0, "inversion_500": 0.9}, {"seed": 2, "inversion_500": 0.5}]},
               "base_attacks": {"inversion_500": 1.0}}
    assert add_gaps(results, ["inversion_500", "uda_asr"]) == ["inversion_500_gap"]  # no retrain value: no gap
    esd = results["runs"]["esd"]
    assert esd[0]["inversion_500_gap"] == pytest.approx(0.7)  # seed 0 against retrain seed 0
    assert esd[1]["inversion_500_gap"] == pytest.approx(0.2)  # no retrain seed 2: against the retrain mean 0.3
    assert results["base_attacks"]["inversion_500_gap"] == pytest.approx(0.7)
    assert "inversion_500_gap" not in results["runs"]["retrain"][0]
