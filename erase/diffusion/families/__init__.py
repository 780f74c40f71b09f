"""Model families: one module per family (``sd1``, ``sd2``, ``sdxl`` UNets; ``sd3`` (SD3 / SD3.5) and ``flux`` MMDiT
transformers; what they share in ``base`` and ``mmdit``), the table of them (:data:`FAMILIES`) and their detection.

A family is a row, not a code path (peft's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, k-diffusion's one
wrapper per family). A row says which text encoders condition the UNet and how their outputs are taken, whether the
UNet takes extra conditioning (SDXL: ``added_cond_kwargs``), which diffusers pipeline class generates, the target
presets, the native resolution and how its UNet config is recognised. The prediction type (epsilon / v) is not a
family property: it comes from the scheduler config of each model (SD 2.x base is epsilon, SD 2.x 768 is v).

Detection (:func:`detect`) reads ``model_index.json`` and the denoiser's config (``unet/config.json`` or
``transformer/config.json``) and asks the families in :data:`DETECTION_ORDER` (SD3: an ``SD3Transformer2DModel``; Flux:
a ``FluxTransformer2DModel``; SDXL: ``addition_embed_type == "text_time"``; SD 2.x: ``cross_attention_dim == 1024`` or
linear projections; any other UNet is SD 1.x). Another transformer (PixArt, Sana, ...) is refused in one line naming
the supported families.

Adding a family: a module here with its ``FAMILY`` row, its name in :data:`DETECTION_ORDER` (docs/FAMILIES.md).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from erase.diffusion.families.base import UNET_PRESETS, Conditioner, Family, TextStack, pack
from erase.utils.errors import UserError

#: The families, most specific first: detection takes the first whose ``matches`` accepts the denoiser's config.
DETECTION_ORDER = ("sd3", "flux", "sdxl", "sd2", "sd1")
#: name -> family row, in the order they are listed to users
FAMILIES: dict[str, Family] = {name: importlib.import_module(f"{__name__}.{name}").FAMILY for name in ("sd1", "sd2", "sdxl", "sd3", "flux")}

__all__ = ["DETECTION_ORDER", "FAMILIES", "UNET_PRESETS", "ConfigUnreadable", "Conditioner", "Family", "TextStack", "build_pipeline",
           "denoiser_name", "detect", "family_of", "family_of_pipeline", "load_text", "pack", "supported", "text_from_pipeline"]


class ConfigUnreadable(UserError):
    """A model's config files could not be read (offline without a cache, a bad hub id, unreadable JSON)."""




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


def family_of(config: dict, denoiser: str = "unet") -> str | None:
    """The family a denoiser config belongs to: the first of :data:`DETECTION_ORDER` with that denoiser that matches."""
    return next((n for n in DETECTION_ORDER if FAMILIES[n].denoiser == denoiser and FAMILIES[n].matches(config)), None)


def denoiser_name(pipe) -> str:
    """The pipeline component that denoises: ``unet`` (SD 1.x / 2.x / XL) or ``transformer`` (SD3, Flux)."""
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline, from its denoiser's config (its ``unet`` or ``transformer``)."""
    kind = denoiser_name(pipe)
    found = family_of(dict(getattr(pipe, kind).config), kind)
    if found is None:
        raise UserError(f"the pipeline's {kind} is none this toolkit knows; supported families: {supported()}")
    return FAMILIES[found]


def detect(name: str, revision: str | None = None, force: str | None = None) -> Family:
    """The family of the model folder or hub id ``name``; ``force`` names it instead (checked against the denoiser)."""
    if force is not None and force not in FAMILIES:
        raise UserError(f"unknown model family {force!r}; supported: {supported()}")
    index = _read_json(name, "model_index.json", None, revision)
    cls = (index or {}).get("_class_name", "")
    folder = Path(name).expanduser()
    has_transformer = (index is not None and "transformer" in index and "unet" not in index) or \
        (folder.is_dir() and (folder / "transformer").is_dir() and not (folder / "unet").is_dir())
    if has_transformer:
        config = _read_json(name, "config.json", "transformer", revision) or {}
        found = family_of(config, "transformer")
        if found is None:
            what = cls or config.get("_class_name") or "transformer-denoiser pipeline"
            raise UserError(f"{name!r} is a {what} model, whose transformer is none this toolkit erases from; "
                            f"supported families: {supported()}")
    else:
        unet = _read_json(name, "config.json", "unet", revision)
        if unet is None:
            raise UserError(f"{name!r} has no unet/config.json or transformer/config.json: not a diffusers text-to-image model; "
                            f"supported families: {supported()}")
        found = family_of(unet, "unet")
    if force is None or force == found:
        return FAMILIES[found]
    # sd1 and sd2 share every code path (one CLIP-style encoder, no added conditioning): either may be forced on the
    # other; every other family either is the model's or is not.
    if {force, found} <= {"sd1", "sd2"}:
        return FAMILIES[force]
    why = {"sdxl": "its UNet takes the text_time added conditioning", "sd3": "its transformer is an SD3Transformer2DModel",
           "flux": "its transformer is a FluxTransformer2DModel"}.get(found, f"its {FAMILIES[found].denoiser} is {found}'s")
    if force == "sdxl" and found in ("sd1", "sd2"):
        why = "its UNet has no text_time added conditioning"
    raise UserError(f"model family {force!r} contradicts {name!r}: {why}, so it is {found} ({FAMILIES[found].title})")


def _tokenizer_cls(encoder_cls: str):
    import transformers

    return transformers.T5TokenizerFast if encoder_cls.startswith("T5") else transformers.CLIPTokenizer


def load_text(family: Family, name: str, revision: str | None = None, variant: str | None = None) -> "TextStack":
    """The family's tokenizers and text encoders from a folder or hub id."""
    import transformers

    tokenizers, encoders = [], []
    for tok, enc, cls in family.text_encoders:
        tokenizers.append(_tokenizer_cls(cls).from_pretrained(name, subfolder=tok, revision=revision))
        encoders.append(getattr(transformers, cls).from_pretrained(name, subfolder=enc, revision=revision, variant=variant))
    index = _read_json(name, "model_index.json", None, revision) or {}
    return family.make_text(tokenizers, encoders, zero_uncond=family.pooled and bool(index.get("force_zeros_for_empty_prompt", True)))


def text_from_pipeline(family: Family, pipe) -> "TextStack":
    """The family's tokenizers and text encoders of an already loaded pipeline (shared, not copied)."""
    tokenizers = [getattr(pipe, tok, None) for tok, _, _ in family.text_encoders]
    encoders = [getattr(pipe, enc, None) for _, enc, _ in family.text_encoders]
    missing = [name for (tok, enc, _), t, e in zip(family.text_encoders, tokenizers, encoders) for name, part in ((tok, t), (enc, e)) if part is None]
    if missing:
        raise UserError(f"the pipeline has no {missing[0]}, which a {family.title} model needs")
    zero = family.pooled and bool(getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", True))
    return family.make_text(tokenizers, encoders, zero_uncond=zero)


def build_pipeline(family: Family, text: TextStack, vae, denoiser, scheduler):
    """The family's pipeline over already loaded components (data generation by the base model)."""
    parts = {"vae": vae, family.denoiser: denoiser, "scheduler": scheduler}
    if family.denoiser == "unet":
        parts["feature_extractor"] = None
    for (tok, enc, _), t, e in zip(family.text_encoders, text.tokenizers, text.encoders):
        parts[tok], parts[enc] = t, e
    kwargs = family.pipeline_kwargs()
    if family.pooled and family.denoiser == "unet":
        kwargs["force_zeros_for_empty_prompt"] = text.zero_uncond
        kwargs["image_encoder"] = None
    return family.pipeline_cls()(**parts, **kwargs)
