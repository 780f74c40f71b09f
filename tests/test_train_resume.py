"""An interrupted world-model training resumes (eval/digits/training.py): the state saved beside the folder after the
autoencoder phase and during the denoiser phase is picked up by the next call, which ends bit-identical to an
uninterrupted training and removes the state; a state of other settings is not used."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_digits import TINY
from test_shapes import TINY_MODEL

from eval_fixtures import private_erase_cache

STEPS = dict(vae_steps=3, unet_steps=6)  # an interruption at denoiser step 3 leaves a state after step 2


class Stop(Exception):
    pass


def _stop_at_denoiser_step(monkeypatch, step: int, n_modules: int):
    """Interrupt the training inside denoiser step ``step`` (its EMA update: ``n_modules`` calls per step)."""
    import eval.digits.training as training

    real, calls = training._ema_update, []

    def ema_update(*args):
        calls.append(1)
        if len(calls) > step * n_modules:
            raise Stop(f"interrupted at denoiser step {step}")
        return real(*args)

    monkeypatch.setattr(training, "_ema_update", ema_update)


def _weights(folder) -> dict:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


def _same(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 10
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def digits_reference(tmp_path_factory):
    from eval.digits.model import DigitsModelConfig, train_digits_model

    torch.set_num_threads(1)
    cfg = DigitsModelConfig(**{**TINY, **STEPS})
    return cfg, train_digits_model(cfg, tmp_path_factory.mktemp("ref") / "model", progress=False)


@pytest.mark.parametrize("every", [0.0, 1e9], ids=["denoiser-state", "autoencoder-state"])
def test_an_interrupted_digits_training_resumes_bit_identical(digits_reference, tmp_path, monkeypatch, every):
    import eval.digits.training as training
    from eval.digits.model import train_digits_model

    cfg, reference = digits_reference
    out = tmp_path / "model"
    partial = tmp_path / ".model.partial"
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", every)  # 0: a state after every denoiser step
    _stop_at_denoiser_step(monkeypatch, 3, 2)
    with pytest.raises(Stop):
        train_digits_model(cfg, out, progress=False)
    assert not out.exists()  # nothing half-written where the model goes
    record = json.loads((partial / "state.json").read_text())
    expect = ("denoiser", 2) if every == 0 else ("autoencoder", 0)
    assert (record["phase"], record["step"]) == expect and record["fingerprint"] == cfg.fingerprint()
    assert len(list(partial.glob("state-*.safetensors"))) == 1  # older states removed once a newer one is complete
    monkeypatch.undo()
    train_digits_model(cfg, out, progress=False)
    _same(reference, out)
    card = json.loads((out / "digits_model.json").read_text())
    assert card["resumed_from"]["phase"] == expect[0] and card["resumed_from"]["step"] == expect[1]
    assert card["vae_scaling_factor"] == json.loads((reference / "digits_model.json").read_text())["vae_scaling_factor"]
    assert not partial.exists()


def test_a_state_of_other_settings_a_damaged_state_or_a_forced_training_starts_over(digits_reference, tmp_path, monkeypatch):
    import eval.digits.training as training
    from eval.digits.model import DigitsModelConfig, train_digits_model

    cfg, reference = digits_reference
    out, partial = tmp_path / "model", tmp_path / ".model.partial"
    other = DigitsModelConfig(**{**TINY, **STEPS, "lr": cfg.lr * 2})
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
    _stop_at_denoiser_step(monkeypatch, 3, 2)
    with pytest.raises(Stop):
        train_digits_model(other, out, progress=False)
    assert json.loads((partial / "state.json").read_text())["fingerprint"] == other.fingerprint()
    monkeypatch.undo()
    train_digits_model(cfg, out, progress=False)  # the other settings' state is discarded, not resumed
    _same(reference, out)
    assert "resumed_from" not in json.loads((out / "digits_model.json").read_text()) and not partial.exists()
    # a damaged state (a cut file) is discarded too
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
    _stop_at_denoiser_step(monkeypatch, 3, 2)
    with pytest.raises(Stop):
        train_digits_model(cfg, tmp_path / "cut" / "model", progress=False)
    monkeypatch.undo()
    (state_file,) = (tmp_path / "cut" / ".model.partial").glob("state-*.safetensors")
    state_file.write_bytes(state_file.read_bytes()[:100])
    train_digits_model(cfg, tmp_path / "cut" / "model", progress=False)
    _same(reference, tmp_path / "cut" / "model")
    assert "resumed_from" not in json.loads((tmp_path / "cut" / "model" / "digits_model.json").read_text())
    # a forced training discards a state of its own settings too
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
    _stop_at_denoiser_step(monkeypatch, 3, 2)
    with pytest.raises(Stop):
        train_digits_model(cfg, out, progress=False, force=True)
    monkeypatch.undo()
    train_digits_model(cfg, out, progress=False, force=True)
    assert "resumed_from" not in json.loads((out / "digits_model.json").read_text())
    _same(reference, out)


def test_an_interrupted_shapes_training_resumes_bit_identical(tmp_path, monkeypatch):
    import eval.digits.training as training
    from eval.shapes.model import ShapesModelConfig
    from eval.shapes.train import train_shapes_model

    torch.set_num_threads(1)
    cfg = ShapesModelConfig(**{**TINY_MODEL, **STEPS})
    with private_erase_cache(tmp_path / "cache"):
        reference = train_shapes_model(cfg, tmp_path / "ref" / "model", progress=False)
        out = tmp_path / "run" / "model"
        monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
        _stop_at_denoiser_step(monkeypatch, 4, 2)
        with pytest.raises(Stop):
            train_shapes_model(cfg, out, progress=False)
        assert json.loads((tmp_path / "run" / ".model.partial" / "state.json").read_text())["step"] == 3
        monkeypatch.undo()
        train_shapes_model(cfg, out, progress=False)
    _same(reference, out)
    card = json.loads((out / "shapes_model.json").read_text())
    ref_card = json.loads((reference / "shapes_model.json").read_text())
    assert card["resumed_from"]["step"] == 3 and card["final_unet_loss"] == ref_card["final_unet_loss"]
    assert card["vae_reconstruction_mse"] == ref_card["vae_reconstruction_mse"]
    assert not (tmp_path / "run" / ".model.partial").exists()


def test_an_interrupted_transformer_training_resumes_bit_identical(tmp_path, monkeypatch):
    """The SD3 kind: a shifted latent scale and the rectified-flow loss drawing from the same generator."""
    import eval.digits.training as training
    from eval.digits.model import DigitsModelConfig, train_digits_model
    from test_digits_transformer import TINY_DIT

    torch.set_num_threads(1)
    cfg = DigitsModelConfig(**{**TINY_DIT, **STEPS})
    reference = train_digits_model(cfg, tmp_path / "ref" / "model", progress=False)
    out = tmp_path / "run" / "model"
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
    _stop_at_denoiser_step(monkeypatch, 2, 4)  # the transformer and its three text encoders
    with pytest.raises(Stop):
        train_digits_model(cfg, out, progress=False)
    monkeypatch.undo()
    train_digits_model(cfg, out, progress=False)
    _same(reference, out)
    card, ref_card = (json.loads((p / "digits_model.json").read_text()) for p in (out, reference))
    assert card["resumed_from"]["step"] == 1 and card["vae_shift_factor"] == ref_card["vae_shift_factor"] is not None
