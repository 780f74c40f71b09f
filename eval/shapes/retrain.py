"""The retrain reference of the shapes benchmark: the base model's settings trained from scratch without any scene
that has one of the given concepts (``python -m eval.shapes retrain --concepts star``), cached like the base. What
a model that never saw the concept looks like, so every erasure can be read against it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from erase.utils.errors import UserError
from eval.shapes.model import ShapesModelConfig, default_model_dir


def retrain_config(base_model: str | None, concepts, seed: int | None = None) -> ShapesModelConfig:
    """The settings of ``base_model`` (default: the default shapes model's) with ``concepts`` held out of training."""
    if base_model is None:
        base = ShapesModelConfig()
    else:
        from eval.shapes.score import resolve_shapes_model

        card, base_dir, erase_config = resolve_shapes_model(base_model)
        if erase_config is not None:
            raise UserError(f"{base_model} is an erased model; give the base shapes model whose settings to reuse")
        try:
            base = ShapesModelConfig(**card["config"])
        except (TypeError, ValueError) as e:
            raise UserError(f"{base_dir}: its shapes_model.json config is not one this version can train ({e})") from None
    changes = {"held_out": tuple(concepts)}
    if seed is not None:
        changes["seed"] = seed
    return replace(base, **changes)


def retrain_model(base_model: str | None, concepts, seed: int | None = None, output_dir: str | None = None,
                  force: bool = False, progress: bool = True) -> Path:
    """Train (or find cached) the retrain reference: the base settings without the scenes of ``concepts``."""
    from eval.shapes.train import train_shapes_model

    cfg = retrain_config(base_model, concepts, seed)
    out = Path(output_dir) if output_dir else default_model_dir(cfg)
    try:
        return train_shapes_model(cfg, out, progress=progress, force=force)
    except FileExistsError as e:
        raise UserError(str(e)) from None
