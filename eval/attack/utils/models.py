"""The attacked model: resolved over its base, loaded with finite weights only, and its text stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from erase.utils.errors import UserError


@dataclass
class ModelInfo:
    model: str
    base: str
    erase_config: dict | None

    @property
    def erased(self) -> bool:
        return self.erase_config is not None


def resolve_model(model: str) -> ModelInfo:
    """Base and erase config of an erase/sd.py output; a pipeline folder or hub id is its own base."""
    path = Path(model)
    if path.is_dir() and (path / "erase_config.json").is_file():
        from erase.export.local import read_record

        config = read_record(path)  # with this machine's local paths (erase_local.json) put back
        base = config.get("pretrained_model_name_or_path") if isinstance(config, dict) else None
        if not base:
            raise UserError(f"{path / 'erase_config.json'} has no 'pretrained_model_name_or_path' naming the base model")
        if not (path / "unet").is_dir():
            raise UserError(f"{model} has an erase_config.json but no unet/ folder")
        return ModelInfo(str(model), str(base), config)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{model} is neither a diffusers pipeline folder (model_index.json) nor an erase/sd.py "
                            "output (erase_config.json)")
        return ModelInfo(str(model), str(model), None)
    if str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise UserError(f"model not found: {model} (give a pipeline folder, an erase/sd.py output or a hub id)")
    return ModelInfo(str(model), str(model), None)


def check_unet_file(info: ModelInfo) -> None:
    """Refuse an erased UNet with non-finite weights from its safetensors files alone (no model is built), so the
    refusal comes before any output is written; ``load_attacked`` checks the loaded weights again."""
    if not info.erased:
        return
    from safetensors import SafetensorError, safe_open

    from erase.utils.checks import check_weights

    for path in sorted((Path(info.model) / "unet").glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                check_weights(((k, f.get_tensor(k)) for k in f.keys()), f"the erased UNet of {info.model}",
                              "; an audit of it would judge black images: re-export the model")
        except (OSError, SafetensorError) as e:
            raise UserError(f"could not read {path}: {str(e).strip().splitlines()[0]}") from None


def load_attacked(info: ModelInfo, scheduler: str, device):
    """(pipeline of the base model, the attacked UNet): the pipeline still holds the base UNet; swap it with
    ``pipe.register_modules(unet=...)`` once the base model's work (drawing target images) is done.

    Non-finite weights are refused in one line (the base's by ``load_pipeline``, the erased UNet's here): a UNet
    with one NaN weight draws black images that a judge calls "not the concept", the worst wrong answer an attack
    audit can give."""
    import torch

    from erase.diffusion.generate import load_pipeline
    from erase.utils.checks import check_weights

    pipe = load_pipeline(info.base, scheduler=scheduler, dtype=torch.float32, device=device)
    pipe.set_progress_bar_config(disable=True)
    if not info.erased:
        return pipe, pipe.unet
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(info.model, subfolder="unet", dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the UNet of {info.model!r}: {str(e).strip().splitlines()[0]}") from None
    check_weights(unet.state_dict().items(), f"the erased UNet of {info.model}",
                  "; an audit of it would judge black images: re-export the model")
    return pipe, unet.to(device)


def pipeline_text(pipe):
    """(family, text stack) of a loaded pipeline: prompts encoded as its family conditions the UNet (erase.diffusion.families)."""
    from erase.diffusion.families import FAMILIES, family_of, text_from_pipeline

    family = FAMILIES[family_of(dict(pipe.unet.config))]
    return family, text_from_pipeline(family, pipe)


def require_one_text_encoder(pipe, attack: str, family=None) -> None:
    """The prompt attacks optimise the input tokens of one text encoder; a family with two (SDXL) is refused."""
    family = family or pipeline_text(pipe)[0]
    if len(family.text_encoders) != 1:
        raise UserError(f"{attack} optimises the tokens of one text encoder; {family.title} conditions on "
                        f"{len(family.text_encoders)}: not supported yet (relearn works on every family)")


def check_family(info: ModelInfo, attack: str) -> None:
    """``require_one_text_encoder`` from a local base's UNet config alone (before any output is written)."""
    import json

    from erase.diffusion.families import FAMILIES, family_of

    config = Path(info.base) / "unet" / "config.json"
    if config.is_file():
        try:
            family = FAMILIES[family_of(json.loads(config.read_text(encoding="utf-8")))]
        except (OSError, ValueError, KeyError):
            return  # loading the pipeline will say what is wrong with it
        require_one_text_encoder(None, attack, family)
