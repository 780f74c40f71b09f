"""The adaptive forget weight (``--forget_target``): λ follows the constraint F̄ ≤ ρ·F₀ by dual ascent."""

import math

import pytest
import torch
from accelerate import Accelerator

from erase.core import EngineConfig, build_method, run
from erase.core.engine import list_checkpoints
from erase.core.forget_weight import EMA, WARMUP, ForgetWeight
from test_core_engine import trained_adapter as adapter  # a fresh copy of the trained digits MLP, forgetting the threes


def feed(w: ForgetWeight, values) -> list[dict]:
    logs = []
    for v in values:
        w.observe(torch.tensor(v))
        logs.append(w.update())
    return logs


def test_lambda_is_held_in_the_warmup_then_rises_while_the_term_stays_and_falls_once_it_is_met():
    w = ForgetWeight(0.03, target=0.25, gain=0.1)
    logs = feed(w, [1.0, 3.0, 2.0, 2.0, 2.0])  # warm-up: F₀ is their mean, λ does not move
    assert [row["lam"] for row in logs] == [0.03] * WARMUP and w.f0 == pytest.approx(2.0)
    logs = feed(w, [2.0] * 10)  # the term does not fall: ratio 1 > 0.25, error clipped at 1
    assert logs[-1]["lam"] == pytest.approx(0.03 * math.exp(0.1 * 10)) and logs[-1]["forget_ratio"] == pytest.approx(1.0)
    high = w.lam
    logs = feed(w, [0.0] * 40)  # the concept is gone: F̄ decays to below ρF₀, so λ comes down again
    assert logs[-1]["forget_ratio"] == pytest.approx(EMA ** 40) and w.lam < high <= w.largest
    lams = [row["lam"] for row in logs]
    turn = next(i for i, row in enumerate(logs) if row["forget_ratio"] < 0.25)
    assert all(b > a for a, b in zip(lams[:turn], lams[1:turn])) and all(b < a for a, b in zip(lams[turn:], lams[turn + 1:]))
    s = w.summary()["forget_weight"]
    assert s["lam_start"] == 0.03 and s["lam_final"] == w.lam and s["forget_steps"] == WARMUP + 50


def test_micro_batches_of_a_step_are_averaged_and_reduce_is_applied():
    w = ForgetWeight(1.0, target=0.5)
    seen = []
    for value in (4.0, 2.0):
        w.observe(torch.tensor(value))
    w.update(lambda t: seen.append(float(t)) or t * 0 + 5.0)  # the processes' mean: every process takes the same λ
    assert seen == [3.0] and w.f0 == 5.0 and w.updates == 1


def test_a_fixed_weight_changes_nothing_and_a_term_that_is_not_positive_is_refused():
    fixed = ForgetWeight(0.3)
    assert feed(fixed, [1.0] * 10) == [{}] * 10 and fixed.lam == 0.3 and fixed.summary() == {}
    ascent = ForgetWeight(0.3, target=0.5)
    with pytest.raises(ValueError, match=r"forget_target needs a forget term that is positive.*-1"):
        feed(ascent, [-1.0] * WARMUP)


@pytest.mark.parametrize("kw,match", [
    (dict(forget_target=0.0), "forget_target must lie in"), (dict(forget_target=1.5), "forget_target must lie in"),
    (dict(forget_target=0.2, forget_loss="ascent"), "forget_loss other than ascent"),
    (dict(forget_target=0.2, forget_loss="relabel", lam=0.0), "needs lam > 0"),
    (dict(forget_gain=0.0), "forget_gain must lie in"),
])
def test_bad_settings_are_one_clear_error(kw, match):
    kw = {"forget_loss": "relabel", **kw}
    with pytest.raises(ValueError, match=match):
        build_method("scissorhands", **kw)


def test_the_flags_reach_the_command_line():
    from erase.sd import build_parser

    args = build_parser().parse_args(["--concept", "nudity", "--forget_target", "0.2", "--forget_gain", "0.1"])
    assert args.forget_target == 0.2 and args.forget_gain == 0.1


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def config(out, steps, resume=None):
    return EngineConfig(output_dir=str(out), max_train_steps=steps, lr=1e-2, checkpointing_steps=10, progress=False,
                        resume_from_checkpoint=resume, seed=5, log_every=1)


KW = dict(topk=5.0, lam=0.01, forget_loss="relabel", forget_target=0.2, forget_gain=0.2)


def test_the_repair_raises_lambda_until_the_forget_term_meets_its_target(trained_mlp, digits_tensors, accelerator, tmp_path):
    """On the digits MLP a weak fixed λ hardly moves the relabel term; the adaptive run raises λ and drives it down."""
    fixed = run(adapter(trained_mlp, digits_tensors), build_method("scissorhands", **{**KW, "forget_target": None}),
                config(tmp_path / "fixed", 40), accelerator=accelerator)
    adaptive = run(adapter(trained_mlp, digits_tensors), build_method("scissorhands", **KW), config(tmp_path / "adaptive", 40),
                   accelerator=accelerator)
    s = adaptive.method_summary["forget_weight"]
    assert s["lam_max"] > 10 * s["lam_start"] and s["forget_steps"] == 40
    lams = [row["lam"] for row in adaptive.history]
    assert lams[:WARMUP] == [0.01] * WARMUP and max(lams) == pytest.approx(s["lam_max"])
    assert "lam" not in fixed.history[-1] and "forget_weight" not in fixed.method_summary

    def last(res):
        return sum(row["forget_term"] for row in res.history[-10:]) / 10

    assert last(adaptive) < 0.7 * last(fixed)


def test_a_resumed_adaptive_run_equals_an_uninterrupted_one(trained_mlp, digits_tensors, accelerator, tmp_path):
    full = run(adapter(trained_mlp, digits_tensors), build_method("scissorhands", **KW), config(tmp_path / "a", 25), accelerator=accelerator)
    run(adapter(trained_mlp, digits_tensors), build_method("scissorhands", **KW), config(tmp_path / "b", 20), accelerator=accelerator)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-10"]
    resumed = run(adapter(trained_mlp, digits_tensors), build_method("scissorhands", **KW), config(tmp_path / "b", 25, resume="latest"),
                  accelerator=accelerator)
    assert resumed.resumed_from.endswith("checkpoint-10")
    assert resumed.method_summary == full.method_summary and full.method_summary["forget_weight"]["lam_final"] != KW["lam"]
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
