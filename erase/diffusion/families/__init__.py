"""Model families: one module per Stable Diffusion family (``sd1``, ``sd2``, ``sdxl``; what they share in ``base``),
the table of them (:data:`FAMILIES`) and their detection.

A family is a row, not a code path (peft's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, k-diffusion's one
wrapper per family). A row says which text encoders condition the UNet and how their outputs are taken, whether the
UNet takes extra conditioning (SDXL: ``added_cond_kwargs``), which diffusers pipeline class generates, the target
presets, the native resolution and how its UNet config is recognised. The prediction type (epsilon / v) is not a
family property: it comes from the scheduler config of each model (SD 2.x base is epsilon, SD 2.x 768 is v).

Detection (:func:`detect`) reads ``model_index.json`` and ``unet/config.json`` and asks the families in
:data:`DETECTION_ORDER` (SDXL: ``addition_embed_type == "text_time"``; SD 2.x: ``cross_attention_dim == 1024`` or linear
projections; any other UNet is SD 1.x). A folder whose denoiser is a transformer (Flux, SD3, PixArt: ``transformer/``
and no ``unet/``) is refused in one line naming the supported families.

Adding a family: a module here with its ``FAMILY`` row, its name in :data:`DETECTION_ORDER` (docs/FAMILIES.md).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from erase.diffusion.families.base import UNET_PRESETS, Conditioner, Family, TextStack, pack
from erase.utils.errors import UserError

#: The families, most specific first: detection takes the first whose ``matches`` accepts the UNet config.
DETECTION_ORDER = ("sdxl", "sd2", "sd1")
#: name -> family row, in the order they are listed to users
FAMILIES: dict[str, Family] = {name: importlib.import_module(f"{__name__}.{name}").FAMILY for name in ("sd1", "sd2", "sdxl")}

__all__ = ["DETECTION_ORDER", "FAMILIES", "UNET_PRESETS", "ConfigUnreadable", "Conditioner", "Family", "TextStack", "build_pipeline",
           "detect", "family_of", "load_text", "pack", "supported", "text_from_pipeline"]


class ConfigUnreadable(UserError):
    """A model's config files could not be read (offline without a cache, a bad hub id, unreadable JSON)."""


#: Pipelines of other denoisers, named in the refusal (their folders have transformer/ instead of unet/).
_TRANSFORMER_PIPELINES = ("Flux", "StableDiffusion3", "PixArt", "Sana", "HunyuanDiT", "Lumina", "CogView", "AuraFlow")


def supported() -> str:
    return ", ".join(f"{f.name} ({f.title})" for f in FAMILIES.values())


def _read_json(name: str, filename: str, subfolder: str | None, revision: str | None) -> dict | None:
    """A config file of a local folder or a hub id (through the hub cache); None when it does not exist."""
    path = Path(name).expanduser()
    if path.is_dir():
        p = path / subfolder / filename if subfolder else path / filename
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigUnreadable(f"{p} is not readable JSON ({e})") from None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        found = hf_hub_download(name, filename, subfolder=subfolder, revision=revision)
    except Exception as e:  # not on the hub / offline without a cache
        missing = isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError)
        if missing or subfolder is None:
            return None  # the repository has no such file (or model_index.json is unreachable): the UNet config decides
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigUnreadable(f"could not read {subfolder}/{filename} of {name!r}: {message}") from None
    return json.loads(Path(found).read_text(encoding="utf-8"))


def family_of(unet_config: dict) -> str:
    """The family a UNet config belongs to: the first of :data:`DETECTION_ORDER` that matches it."""
    return next(name for name in DETECTION_ORDER if FAMILIES[name].matches(unet_config))


def detect(name: str, revision: str | None = None, force: str | None = None) -> Family:
    """The family of the model folder or hub id ``name``; ``force`` names it instead (checked against the UNet)."""
    if force is not None and force not in FAMILIES:
        raise UserError(f"unknown model family {force!r}; supported: {supported()}")
    index = _read_json(name, "model_index.json", None, revision)
    cls = (index or {}).get("_class_name", "")
    other = cls if any(cls.startswith(p) for p in _TRANSFORMER_PIPELINES) else None
    if other is None and index is not None and "transformer" in index and "unet" not in index:
        other = cls or "transformer-denoiser pipeline"
    if other is None and Path(name).expanduser().is_dir() and (Path(name).expanduser() / "transformer").is_dir() \
            and not (Path(name).expanduser() / "unet").is_dir():
        other = cls or "transformer-denoiser pipeline"
    if other:
        raise UserError(f"{name!r} is a {other} model (its denoiser is a transformer, not a UNet); "
                        f"supported families: {supported()}")
    unet = _read_json(name, "config.json", "unet", revision)
    if unet is None:
        raise UserError(f"{name!r} has no unet/config.json: not a diffusers Stable Diffusion model; supported families: {supported()}")
    found = family_of(unet)
    if force is None:
        return FAMILIES[found]
    # sd1 and sd2 share every code path (one CLIP-style encoder, no added conditioning): either may be forced on
    # the other; SDXL's added conditioning either is in the UNet or is not.
    if (force == "sdxl") != (found == "sdxl"):
        why = "its UNet takes the text_time added conditioning" if found == "sdxl" else "its UNet has no text_time added conditioning"
        raise UserError(f"model family {force!r} contradicts {name!r}: {why}, so it is {found} ({FAMILIES[found].title})")
    return FAMILIES[force]


def load_text(family: Family, name: str, revision: str | None = None, variant: str | None = None) -> "TextStack":
    """The family's tokenizers and text encoders from a folder or hub id."""
    import transformers
    from transformers import CLIPTokenizer

    tokenizers, encoders = [], []
    for tok, enc, cls in family.text_encoders:
        tokenizers.append(CLIPTokenizer.from_pretrained(name, subfolder=tok, revision=revision))
        encoders.append(getattr(transformers, cls).from_pretrained(name, subfolder=enc, revision=revision, variant=variant))
    index = _read_json(name, "model_index.json", None, revision) or {}
    return TextStack(family, tokenizers, encoders, zero_uncond=family.pooled and bool(index.get("force_zeros_for_empty_prompt", True)))


def text_from_pipeline(family: Family, pipe) -> "TextStack":
    """The family's tokenizers and text encoders of an already loaded pipeline (shared, not copied)."""
    tokenizers = [getattr(pipe, tok, None) for tok, _, _ in family.text_encoders]
    encoders = [getattr(pipe, enc, None) for _, enc, _ in family.text_encoders]
    missing = [name for (tok, enc, _), t, e in zip(family.text_encoders, tokenizers, encoders) for name, part in ((tok, t), (enc, e)) if part is None]
    if missing:
        raise UserError(f"the pipeline has no {missing[0]}, which a {family.title} model needs")
    zero = family.pooled and bool(getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", True))
    return TextStack(family, tokenizers, encoders, zero_uncond=zero)


def build_pipeline(family: Family, text: TextStack, vae, unet, scheduler):
    """The family's pipeline over already loaded components (data generation by the base model)."""
    parts = {"vae": vae, "unet": unet, "scheduler": scheduler, "feature_extractor": None}
    for (tok, enc, _), t, e in zip(family.text_encoders, text.tokenizers, text.encoders):
        parts[tok], parts[enc] = t, e
    kwargs = family.pipeline_kwargs()
    if family.pooled:
        kwargs["force_zeros_for_empty_prompt"] = text.zero_uncond
        kwargs["image_encoder"] = None
    return family.pipeline_cls()(**parts, **kwargs)
