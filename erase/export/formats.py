"""Export formats of an erased model (``--export_format diffusers,single_file,lora``): the spec and the seam.

* ``diffusers``: ``unet/`` (the erased UNet, ``save_pretrained``) beside ``unet_delta.safetensors``; load it into the
  base pipeline. Written by :func:`erase.export.folder.export`. A transformer denoiser (SD3, SD3.5, Flux) goes to
  ``transformer/`` beside ``transformer_delta.safetensors``: the names come from :func:`delta_name` /
  :func:`denoiser_folder`, one place.
* ``single_file``: ``erased.safetensors``, the whole pipeline in the original key layout of its family
  (:mod:`erase.export.single_file`, layouts in :mod:`erase.export.layouts`).
* ``lora``: ``erased_lora.safetensors``, the change ``erased - base`` as a kohya LoRA (:mod:`erase.export.lora`), with
  ``erased_lora.json`` (rank and relative error per tensor) beside it.

A format besides ``diffusers`` is one module with a ``write(stage, denoiser, base_tensors, config, spec, family)`` function,
named in :data:`WRITERS`. Every file records the erase settings in its safetensors metadata and is written under a
temporary name inside the export's staging folder, then renamed: with the staging folder swapped in whole
(:func:`erase.utils.folders.swap_in`), a killed export never leaves a file that loads as a model.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from erase.utils.checks import Range, check_finite
from erase.utils.errors import UserError


EXPORT_FORMATS = ("diffusers", "single_file", "lora")
#: format -> the module whose ``write`` adds it to a staged export (diffusers is the folder's own ``unet/``)
WRITERS = {"single_file": "erase.export.single_file", "lora": "erase.export.lora"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DENOISERS = ("unet", "transformer")
CONFIG_NAME = "erase_config.json"
SINGLE_FILE_NAME = "erased.safetensors"
LORA_NAME = "erased_lora.safetensors"
LORA_STATS_NAME = "erased_lora.json"
DEFAULT_LORA_ENERGY = 0.99
ENERGY_RANGE = Range(0, 1, lo_open=True)


def delta_name(denoiser: str = "unet") -> str:
    """The file of the changed tensors of a ``denoiser`` (``unet`` or ``transformer``): ``unet_delta.safetensors``."""
    if denoiser not in DENOISERS:
        raise ValueError(f"denoiser {denoiser!r}; allowed: {', '.join(DENOISERS)}")
    return f"{denoiser}_delta.safetensors"


DELTA_NAME = delta_name("unet")


def denoiser_folder(model) -> str:
    """The pipeline subfolder of a denoiser module: ``unet`` for a UNet, ``transformer`` for a transformer (SD3, Flux),
    from its diffusers class as ``model_index.json`` names it."""
    name = type(model).__name__
    if "UNet" in name:
        return "unet"
    if "Transformer" in name:
        return "transformer"
    raise ValueError(f"{name} is neither a UNet nor a transformer denoiser")


def changed_tensors(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of ``state`` that differ from ``base`` (bitwise), as contiguous CPU copies."""
    out = {}
    for name, ref in base.items():
        cur = state[name].detach()
        if cur.shape != ref.shape or not torch.equal(cur.cpu(), ref.to(cur.dtype)):
            out[name] = cur.contiguous().cpu()
    return out


def parse_formats(text: str) -> tuple[str, ...]:
    """``"single_file, lora"`` -> ("single_file", "lora") in :data:`EXPORT_FORMATS` order; one line on a bad name."""
    names = [n.strip() for n in str(text).split(",")]
    if not text or not str(text).strip() or any(not n for n in names):
        raise UserError(f"--export_format {text!r} has an empty name; allowed: a comma list of {', '.join(EXPORT_FORMATS)}")
    bad = [n for n in names if n not in EXPORT_FORMATS]
    if bad:
        raise UserError(f"--export_format {bad[0]!r} is not an export format; allowed: a comma list of {', '.join(EXPORT_FORMATS)}")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice:
        raise UserError(f"--export_format {text!r} names {twice!r} twice; name each format once")
    return tuple(f for f in EXPORT_FORMATS if f in names)


@dataclass
class ExportSpec:
    """What to export besides the delta: formats, the dtype of the single file and the LoRA, the LoRA's rank rule."""
    formats: tuple[str, ...] = ("diffusers",)
    dtype: str = "fp16"
    lora_rank: int | None = None
    lora_energy: float = DEFAULT_LORA_ENERGY

    def to_dict(self) -> dict:
        return {"formats": list(self.formats), "dtype": self.dtype, "lora_rank": self.lora_rank,
                "lora_energy": None if self.lora_rank is not None else self.lora_energy}


def spec_from_args(args) -> ExportSpec:
    """The :class:`ExportSpec` of parsed flags (``export_format``, ``export_dtype``, ``lora_rank``, ``lora_energy``),
    checked: every bad value is one :class:`UserError` line naming it and what is allowed."""
    given = getattr(args, "export_format", None)  # absent: the default; given empty ('', []): one line, never the default
    formats = parse_formats("diffusers" if given is None else ",".join(map(str, given)) if isinstance(given, (list, tuple)) else given)
    dtype = getattr(args, "export_dtype", None)
    dtype = "fp16" if dtype is None else dtype
    if dtype not in DTYPES:
        raise UserError(f"--export_dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    rank, energy = getattr(args, "lora_rank", None), getattr(args, "lora_energy", None)
    if rank is not None and energy is not None:
        raise UserError(f"--lora_rank {rank} and --lora_energy {energy:g} both given; give one (a fixed rank, or the share of "
                        "the change's energy to keep)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UserError(f"--lora_rank {rank!r} is not allowed; allowed: an integer >= 1")
    if energy is not None:
        check_finite("--lora_energy", energy, ENERGY_RANGE)
    return ExportSpec(formats, dtype, rank, DEFAULT_LORA_ENERGY if energy is None else float(energy))


def damaged(path, error: Exception) -> UserError:
    """The one line for a safetensors file that cannot be read (cut short by a killed copy or a full disk)."""
    return UserError(f"{path} is damaged or incomplete (not a readable safetensors file: {str(error).splitlines()[0]}); "
                     "copy it again or re-export the model")


def check_readable(path) -> None:
    """A :func:`damaged` line, before any work, when the header of the safetensors file ``path`` cannot be read (the
    header check covers the whole file: a file cut short fails it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except SafetensorError as e:
        raise damaged(path, e) from None


def load_tensors(path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a :func:`damaged` line instead of a traceback for a file cut short."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise damaged(path, e) from None


def save_tensors(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors under a temporary name, then renamed: a half-written file never carries the final name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def base_kwargs(config: dict) -> tuple[str, dict]:
    base = config.get("base_model") or {}
    name = base.get("path") or base.get("hub_id") or config["pretrained_model_name_or_path"]
    kw = {}
    if base.get("hub_id"):
        kw["revision"] = base.get("commit") or base.get("revision")
    if base.get("variant"):
        kw["variant"] = base["variant"]
    return name, kw


def settings_metadata(config: dict) -> dict:
    from erase.export.local import shared

    config = shared(config)  # no local path in a shared file
    return {"base_model": str(config["pretrained_model_name_or_path"]), "concept": str(config["concept"]),
            "method": str(config["method"]), "settings": json.dumps(config.get("settings", {}), sort_keys=True, default=str)}


def write_formats(stage: Path, denoiser, base_tensors: dict, config: dict, spec: ExportSpec) -> dict:
    """Every format of ``spec`` that has a writer (:data:`WRITERS`) into ``stage``, in :data:`EXPORT_FORMATS` order;
    returns one record per format written. A writer learns the layout family from the single file written before it,
    else from the denoiser's config and the base's text encoders."""
    out, family = {}, None
    for fmt in spec.formats:
        if fmt not in WRITERS:
            continue
        if family is None and fmt != "single_file":
            family = layout_family(denoiser, config)
        out[fmt] = importlib.import_module(WRITERS[fmt]).write(stage, denoiser, base_tensors, config, spec, family)
        family = family or out[fmt].get("family")
    return out


def layout_family(denoiser, config: dict) -> str | None:
    """The original-layout family (:data:`erase.export.layouts.LAYOUTS`) of the erased denoiser (and, for a UNet, its
    base's text encoders); None when it cannot be read (a LoRA's keys then follow the denoiser's type alone)."""
    from erase.export.layouts import detect
    from erase.export.layouts.ldm import LayoutError

    try:
        texts = text_configs(config) if denoiser_folder(denoiser) == "unet" else []
        return detect(dict(denoiser.config), texts)[0]
    except (LayoutError, OSError, ValueError):
        return None


TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def text_configs(config: dict) -> list[dict]:
    """The base's text encoder configs in pipeline order (``model_index.json`` names them)."""
    from diffusers import DiffusionPipeline
    from transformers import AutoConfig

    name, kw = base_kwargs(config)
    index = DiffusionPipeline.load_config(name, revision=kw.get("revision"))
    return [AutoConfig.from_pretrained(name, subfolder=p, revision=kw.get("revision")).to_dict()
            for p in TEXT_PARTS if (index.get(p) or [None])[0]]


def scheduler_config(config: dict) -> dict | None:
    """The base's ``scheduler/scheduler_config.json`` (its prediction type), None when it cannot be read."""
    from diffusers import DDPMScheduler  # any scheduler class reads scheduler_config.json; the dict is as written

    name, kw = base_kwargs(config)
    try:
        return dict(DDPMScheduler.load_config(name, subfolder="scheduler", revision=kw.get("revision")))
    except (OSError, ValueError):
        return None
