"""The retrain reference of the digits benchmark: the base model's settings trained from scratch without the
erased digits' images (``python -m eval.digits retrain --digits three``), cached like the base. What a model that
never knew the concept looks like, so every erasure can be read against it."""

from __future__ import annotations

from pathlib import Path

from erase.utils.errors import UserError
from eval.digits.model import DigitsModelConfig, default_model_dir
from eval.digits.score import resolve_digits_model


def retrain_config(base_model: str | None, digits, seed: int | None = None) -> DigitsModelConfig:
    """The settings of ``base_model`` (default: the default digits model's) with ``digits`` held out of training."""
    if base_model is None:
        base = DigitsModelConfig()
    else:
        card, base_dir, erase_config = resolve_digits_model(base_model)
        if erase_config is not None:
            raise UserError(f"{base_model} is an erased model; give the base digits model whose settings to reuse")
        try:
            base = DigitsModelConfig(**card["config"])
        except (TypeError, ValueError) as e:
            raise UserError(f"{base_dir}: its digits_model.json config is not one this version can train ({e})") from None
    changes = {"held_out_digits": tuple(digits)}
    if seed is not None:
        changes["seed"] = seed
    from dataclasses import replace

    return replace(base, **changes)


def retrain_model(base_model: str | None, digits, seed: int | None = None, output_dir: str | None = None,
                  force: bool = False, progress: bool = True) -> Path:
    """Train (or find cached) the retrain reference: the base settings without ``digits``' images."""
    from eval.digits.model import train_digits_model

    cfg = retrain_config(base_model, digits, seed)
    out = Path(output_dir) if output_dir else default_model_dir(cfg)
    try:
        return train_digits_model(cfg, out, progress=progress, force=force)
    except FileExistsError as e:
        raise UserError(str(e)) from None
