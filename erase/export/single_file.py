"""The ``single_file`` export format: ``erased.safetensors``, the erased denoiser with the base VAE and text encoder(s)
in the original key layout of the model's family (:mod:`erase.export.layouts`): CompVis / SGM for SD 1.x / 2.x / XL
(A1111, ComfyUI, Forge), Stability's for SD3 / SD3.5, Black Forest Labs' (as ComfyUI's Flux checkpoints) for Flux; all
read back by diffusers' ``from_single_file``."""

from __future__ import annotations

import importlib
from pathlib import Path

from erase.export.formats import (DTYPES, SINGLE_FILE_NAME, TEXT_PARTS, ExportSpec, base_kwargs, save_tensors, scheduler_config,
                                  settings_metadata)
from erase.export.local import shared
from erase.utils.errors import UserError


def load_base_parts(config: dict, dtype=None) -> dict:
    """The base pipeline's VAE and text encoder(s), by the classes its ``model_index.json`` names (no denoiser, no
    safety checker), in ``dtype`` when given: ``{"vae": module, "text_encoder": module, "text_encoder_2": ..., ...}``,
    and ``"scheduler"``: its scheduler config."""
    from diffusers import DiffusionPipeline

    name, kw = base_kwargs(config)
    index = DiffusionPipeline.load_config(name, revision=kw.get("revision"))
    parts = {}
    for part in ("vae", *TEXT_PARTS):
        entry = index.get(part)
        if not entry or entry[0] is None:
            continue
        cls = getattr(importlib.import_module(entry[0]), entry[1])
        cast = {} if dtype is None else {"dtype" if entry[0] == "transformers" else "torch_dtype": dtype}
        parts[part] = cls.from_pretrained(name, subfolder=part, **kw, **cast)
    if "vae" not in parts or "text_encoder" not in parts:
        raise UserError(f"the base model {name} has no VAE or text encoder to put into a single file")
    parts["scheduler"] = scheduler_config(config)
    return parts


def write(stage: Path, model, base_tensors: dict, config: dict, spec: ExportSpec, family: str | None = None, parts: dict | None = None) -> dict:
    """``stage/erased.safetensors``: the erased denoiser with the base VAE and text encoder(s) in the family's layout."""
    from erase.export.layouts import LAYOUTS, architecture, detect, markers, materialize, pipeline_to_file
    from erase.export.layouts.ldm import LayoutError

    parts = parts or load_base_parts(config, DTYPES[spec.dtype])
    texts = [parts[p] for p in TEXT_PARTS if p in parts]
    model_config = dict(model.config)
    try:
        family, why = detect(model_config, [t.config.to_dict() for t in texts])
        flat = pipeline_to_file(family, (model.state_dict(), model_config), (parts["vae"].state_dict(), dict(parts["vae"].config)),
                                [t.state_dict() for t in texts])
    except LayoutError as e:
        raise UserError(f"--export_format single_file: {e}") from None
    flat.update(markers(family, parts.get("scheduler")))
    flat = materialize(flat, DTYPES[spec.dtype])
    meta = {"format": "erase-single-file", "family": family, "dtype": spec.dtype, **settings_metadata(config),
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture(family, model_config, parts.get("scheduler")),
            "modelspec.title": f"{shared(config)['pretrained_model_name_or_path']} without {config['concept']}"[:200]}
    save_tensors(flat, stage / SINGLE_FILE_NAME, meta)
    return {"files": [SINGLE_FILE_NAME], "family": family, "family_detected_from": why, "dtype": spec.dtype,
            "pipeline_class": LAYOUTS[family].pipeline, "tensors": len(flat), "bytes": (stage / SINGLE_FILE_NAME).stat().st_size}
