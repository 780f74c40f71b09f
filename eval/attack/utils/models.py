"""The attacked model: resolved over its base, loaded with finite weights only, and its text stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from erase.utils.errors import UserError

# an erase/sd.py output's denoiser folder: erase.export.formats.DENOISERS, restated so that resolving a model on the
# command line does not import torch
DENOISERS = ("unet", "transformer")


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
        if not any((path / d).is_dir() for d in DENOISERS):
            raise UserError(f"{model} has an erase_config.json but no unet/ or transformer/ folder")
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

    for path in sorted(p for d in DENOISERS for p in (Path(info.model) / d).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                check_weights(((k, f.get_tensor(k)) for k in f.keys()), f"the erased {'UNet' if path.parent.name == 'unet' else path.parent.name} of {info.model}",
                              "; an audit of it would judge black images: re-export the model")
        except (OSError, SafetensorError) as e:
            raise UserError(f"could not read {path}: {str(e).strip().splitlines()[0]}") from None


def load_attacked(info: ModelInfo, scheduler: str, device):
    """(pipeline of the base model, the attacked denoiser): the pipeline still holds the base denoiser (its UNet or
    transformer); swap it with :func:`set_denoiser` once the base model's work (drawing target images) is done.

    Non-finite weights are refused in one line (the base's by ``load_pipeline``, the erased denoiser's here): a
    denoiser with one NaN weight draws black images that a judge calls "not the concept", the worst wrong answer an
    attack audit can give."""
    import torch

    from erase.diffusion.generate import load_pipeline
    from erase.utils.checks import check_weights

    pipe = load_pipeline(info.base, scheduler=scheduler, dtype=torch.float32, device=device)
    pipe.set_progress_bar_config(disable=True)
    if not info.erased:
        return pipe, denoiser_of(pipe)
    from erase.diffusion.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    try:
        model = family.denoiser_cls().from_pretrained(info.model, subfolder=family.denoiser, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the {family.denoiser} of {info.model!r}: {str(e).strip().splitlines()[0]}") from None
    what = "UNet" if family.denoiser == "unet" else family.denoiser
    check_weights(model.state_dict().items(), f"the erased {what} of {info.model}",
                  "; an audit of it would judge black images: re-export the model")
    return pipe, model.to(device)


def denoiser_of(pipe):
    """The pipeline's denoiser: its ``unet`` (SD 1.x / 2.x / XL) or ``transformer`` (SD3, Flux)."""
    from erase.diffusion.families import denoiser_name

    return getattr(pipe, denoiser_name(pipe))


def set_denoiser(pipe, model) -> None:
    """Put ``model`` into the pipeline as its denoiser (a no-op when it already is)."""
    from erase.diffusion.families import denoiser_name

    if denoiser_of(pipe) is not model:
        pipe.register_modules(**{denoiser_name(pipe): model})


def resolution_of(pipe) -> int:
    """The image size the attacks draw and learn at: the denoiser's sample size x the VAE's scale factor (the UNet
    families' rule, unchanged); a transformer without one (Flux): the VAE's sample size, else the family's native size."""
    sample = denoiser_of(pipe).config.get("sample_size")
    if getattr(pipe, "unet", None) is not None or sample:
        return sample * pipe.vae_scale_factor
    from erase.diffusion.families import family_of_pipeline

    return int(pipe.vae.config.get("sample_size") or family_of_pipeline(pipe).native_resolution)


def pipeline_text(pipe):
    """(family, text stack) of a loaded pipeline: prompts encoded as its family conditions the denoiser
    (erase.diffusion.families)."""
    from erase.diffusion.families import family_of_pipeline, text_from_pipeline

    family = family_of_pipeline(pipe)
    return family, text_from_pipeline(family, pipe)


def require_one_text_encoder(pipe, what: str, family=None) -> None:
    """A replayed token embedding is one vector for one text encoder; a family with several is refused."""
    family = family or pipeline_text(pipe)[0]
    if len(family.text_encoders) != 1:
        raise UserError(f"{what} is learned for one text encoder; {family.title} conditions on "
                        f"{len(family.text_encoders)}: not supported yet")


def check_family(info: ModelInfo, scheduler: str) -> None:
    """The sampler against a local base's family, from its denoiser config alone (before any output is written): a
    flow family (SD3, Flux) draws only with ``flow_euler``, a UNet never with it."""
    import json

    from erase.diffusion.families import FAMILIES, family_of
    from erase.diffusion.generate import check_sampler

    for kind in DENOISERS:
        config = Path(info.base) / kind / "config.json"
        if config.is_file():
            try:
                family = FAMILIES[family_of(json.loads(config.read_text(encoding="utf-8")), kind)]
            except (OSError, ValueError, KeyError):
                return  # loading the pipeline will say what is wrong with it
            check_sampler(scheduler, family)
            return
