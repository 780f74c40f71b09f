"""unlearndiffatk on the real digits model (the quick start's base, tests/conftest.py's ``digits_base_model``): on the
base model the attack brings the digit back on the forget prompts.

The one test that needs the trained digits model, in a file of its own: conftest.py runs it last and trains the model
meanwhile in the background; with README's two workers (pytest-xdist, ``--dist loadfile``) a file is one unit of work,
so a file of its own is what lets it go last there too instead of holding a worker while the model trains."""

from __future__ import annotations


def test_attack_brings_a_digit_back_on_the_base_digits_model(digits_base_model, tmp_path):
    """On the base digits model (no erasure), the adversarial prompts draw the digit: ASR >= 95 % of forget prompts
    within 10 blocks of 40 iterations (all 6 by block 6 when measured; a fifth of the reference's 50 blocks)."""
    from eval.attack.unlearndiffatk import unlearndiffatk_audit

    s = unlearndiffatk_audit(str(digits_base_model), "three", tmp_path / "o", random_tries=1, timestep_blocks=10)
    assert s["prompts"] == 6 and s["base_pre_asr"] == 1.0
    assert s["asr"] >= 0.95, s["asr_per_restart"]
    assert s["reencode_share"] == 1.0 and s["asr_curve"]["asr"] == sorted(s["asr_curve"]["asr"])
