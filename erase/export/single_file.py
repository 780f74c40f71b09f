"""The ``single_file`` export format: ``erased.safetensors``, the erased UNet with the base VAE and text encoder(s) in
the original key layout of the model's family (:mod:`erase.export.layouts`), for A1111 / ComfyUI and diffusers'
``from_single_file``."""

from __future__ import annotations

import importlib
from pathlib import Path

from erase.export.formats import ARCHITECTURES, DTYPES, SINGLE_FILE_NAME, ExportSpec, base_kwargs, save_tensors, settings_metadata
from erase.utils.errors import UserError

#: modelspec architecture ids (Stability's model metadata spec, read by A1111 / ComfyUI front ends)



def load_base_parts(config: dict) -> dict:
    """The base pipeline's VAE and text encoder(s), by the classes its ``model_index.json`` names (no UNet, no safety
    checker): ``{"vae": module, "text_encoder": module, "text_encoder_2": module?}``."""
    from diffusers import DiffusionPipeline

    name, kw = base_kwargs(config)
    index = DiffusionPipeline.load_config(name, revision=kw.get("revision"))
    parts = {}
    for part in ("vae", "text_encoder", "text_encoder_2"):
        entry = index.get(part)
        if not entry or entry[0] is None:
            continue
        cls = getattr(importlib.import_module(entry[0]), entry[1])
        parts[part] = cls.from_pretrained(name, subfolder=part, **kw)
    if "vae" not in parts or "text_encoder" not in parts:
        raise UserError(f"the base model {name} has no VAE or text encoder to put into a single file")
    return parts


def write(stage: Path, unet, base_tensors: dict, config: dict, spec: ExportSpec, family: str | None = None, parts: dict | None = None) -> dict:
    """``stage/erased.safetensors``: the erased UNet with the base VAE and text encoder(s) in the family's layout."""
    from erase.export.layouts.ldm import FAMILIES, LayoutError, detect_family, pipeline_to_ldm

    parts = parts or load_base_parts(config)
    texts = [parts[p] for p in ("text_encoder", "text_encoder_2") if p in parts]
    try:
        family, why = detect_family(dict(unet.config), [t.config.to_dict() for t in texts])
        flat = pipeline_to_ldm(family, (unet.state_dict(), dict(unet.config)), (parts["vae"].state_dict(), dict(parts["vae"].config)),
                               [t.state_dict() for t in texts], DTYPES[spec.dtype])
    except LayoutError as e:
        raise UserError(f"--export_format single_file: {e}") from None
    meta = {"format": "erase-single-file", "family": family, "dtype": spec.dtype, **settings_metadata(config),
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCHITECTURES[family],
            "modelspec.title": f"{config['pretrained_model_name_or_path']} without {config['concept']}"[:200]}
    save_tensors(flat, stage / SINGLE_FILE_NAME, meta)
    return {"files": [SINGLE_FILE_NAME], "family": family, "family_detected_from": why, "dtype": spec.dtype,
            "pipeline_class": FAMILIES[family].pipeline, "tensors": len(flat),
            "bytes": (stage / SINGLE_FILE_NAME).stat().st_size}
