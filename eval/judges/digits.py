"""The digits judge: ``zero`` .. ``nine`` (aliases ``0`` .. ``9``), the digits CNN of ``eval.digits.judge``.

An image is a hit when its predicted digit is the concept's (a CNN trained on real sklearn digits). Generation as
``eval.digits score`` (20 steps of the family's sampler: DDIM, flow-Euler for the transformer; guidance 4, 40 images per check). Only meaningful on a digits model: any other
model is rejected. The words naming a digit in a prompt: its word and its numeral ("three", "3").
"""

from __future__ import annotations

from eval.judges.registry import Judge, register_judge


def _digit_judge(digit: int):
    def build() -> Judge:
        from eval.digits.judge import JUDGE_VERSION, load_judge
        from eval.digits.model import DIGIT_WORDS

        judge = load_judge()

        def flag(images):
            pred, _ = judge.predict(images)
            return pred == digit, pred

        return Judge(DIGIT_WORDS[digit], flag, {
            "name": "digits-cnn", "module": "eval.digits.judge", "version": JUDGE_VERSION,
            "fingerprint": judge.config.fingerprint(), "test_accuracy": judge.meta.get("test_accuracy"),
            "hit": f"predicted digit == {digit}", "labels": "predicted digit"})

    return build


def _check_digits_model(model: str) -> None:
    from eval.digits.score import resolve_digits_model

    resolve_digits_model(model)  # UserError unless the model (or its base) is a digits model


def _register() -> None:
    from eval.digits.model import DIGIT_WORDS
    from eval.digits.score import SCORE_DEFAULTS

    generation = {k: SCORE_DEFAULTS[k] for k in ("num_images", "steps", "guidance", "scheduler", "batch_size")}
    for d, word in enumerate(DIGIT_WORDS):
        register_judge(word, factory=_digit_judge(d), generation=generation, check_model=_check_digits_model,
                       aliases=(str(d),), words=(word, str(d)), builtin=True)


_register()
