"""Export formats of an erased model (``--export_format diffusers,single_file,lora``) and the offline converter.

* ``diffusers``: ``unet/`` (the erased UNet, ``save_pretrained``) beside ``unet_delta.safetensors``; load it into the
  base pipeline. Written today by :func:`erase.export.export`.
* ``single_file``: ``erased.safetensors``, the whole pipeline (erased UNet, the base VAE and text encoder(s)) in the
  original LDM / SGM key layout of its family (:mod:`erase.ldm`): what A1111 / ComfyUI put in ``models/Stable-diffusion``
  / ``models/checkpoints`` and diffusers loads with ``from_single_file``.
* ``lora``: ``erased_lora.safetensors``, the change ``erased - base`` as a kohya LoRA (:mod:`erase.lora`), with
  ``erased_lora.json`` (rank and relative error per tensor) beside it.

Every file records the erase settings in its safetensors metadata and is written under a temporary name inside the
export's staging folder, then renamed: with the staging folder swapped in whole (:func:`erase.safety.swap_in`), a
killed export never leaves a file that loads as a model.

``python -m erase.export DIR --export_format single_file,lora`` adds formats to a finished export (:func:`main`).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from erase.safety import Range, UserError, check_finite


EXPORT_FORMATS = ("diffusers", "single_file", "lora")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SINGLE_FILE_NAME = "erased.safetensors"
LORA_NAME = "erased_lora.safetensors"
LORA_STATS_NAME = "erased_lora.json"
DEFAULT_LORA_ENERGY = 0.99
ENERGY_RANGE = Range(0, 1, lo_open=True)
#: modelspec architecture ids (Stability's model metadata spec, read by A1111 / ComfyUI front ends)
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


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
    formats = parse_formats(getattr(args, "export_format", "diffusers") or "diffusers")
    dtype = getattr(args, "export_dtype", None) or "fp16"
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


# ------------------------------------------------------------------------------------------------ writing
def _save(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors under a temporary name, then renamed: a half-written file never carries the final name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _base_kwargs(config: dict) -> tuple[str, dict]:
    base = config.get("base_model") or {}
    name = base.get("path") or base.get("hub_id") or config["pretrained_model_name_or_path"]
    kw = {}
    if base.get("hub_id"):
        kw["revision"] = base.get("commit") or base.get("revision")
    if base.get("variant"):
        kw["variant"] = base["variant"]
    return name, kw


def load_base_parts(config: dict) -> dict:
    """The base pipeline's VAE and text encoder(s), by the classes its ``model_index.json`` names (no UNet, no safety
    checker): ``{"vae": module, "text_encoder": module, "text_encoder_2": module?}``."""
    from diffusers import DiffusionPipeline

    name, kw = _base_kwargs(config)
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


def _settings_metadata(config: dict) -> dict:
    return {"base_model": str(config["pretrained_model_name_or_path"]), "concept": str(config["concept"]),
            "method": str(config["method"]), "settings": json.dumps(config.get("settings", {}), sort_keys=True, default=str)}


def write_single_file(stage: Path, unet, config: dict, spec: ExportSpec, parts: dict | None = None) -> dict:
    """``stage/erased.safetensors``: the erased UNet with the base VAE and text encoder(s) in the family's layout."""
    from erase.ldm import FAMILIES, LayoutError, detect_family, pipeline_to_ldm

    parts = parts or load_base_parts(config)
    texts = [parts[p] for p in ("text_encoder", "text_encoder_2") if p in parts]
    try:
        family, why = detect_family(dict(unet.config), [t.config.to_dict() for t in texts])
        flat = pipeline_to_ldm(family, (unet.state_dict(), dict(unet.config)), (parts["vae"].state_dict(), dict(parts["vae"].config)),
                               [t.state_dict() for t in texts], DTYPES[spec.dtype])
    except LayoutError as e:
        raise UserError(f"--export_format single_file: {e}") from None
    meta = {"format": "erase-single-file", "family": family, "dtype": spec.dtype, **_settings_metadata(config),
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCHITECTURES[family],
            "modelspec.title": f"{config['pretrained_model_name_or_path']} without {config['concept']}"[:200]}
    _save(flat, stage / SINGLE_FILE_NAME, meta)
    return {"files": [SINGLE_FILE_NAME], "family": family, "family_detected_from": why, "dtype": spec.dtype,
            "pipeline_class": FAMILIES[family].pipeline, "tensors": len(flat),
            "bytes": (stage / SINGLE_FILE_NAME).stat().st_size}


def write_lora(stage: Path, state: dict, base_tensors: dict, config: dict, spec: ExportSpec, family: str | None = None) -> dict:
    """``stage/erased_lora.safetensors`` (kohya layout) and ``stage/erased_lora.json`` (per-tensor rank and error)."""
    from erase.lora import ALPHA, extract_lora

    delta = changed_tensors(state, base_tensors)
    if not delta:
        raise UserError("--export_format lora: the erased UNet equals the base in every targeted tensor; there is no change to export")
    tensors, stats = extract_lora(delta, base_tensors, spec.lora_rank, spec.lora_energy, DTYPES[spec.dtype])
    if not tensors:
        raise UserError("--export_format lora: only biases / norms changed, which a LoRA cannot hold; use diffusers or single_file")
    compact = {n: {"rank": p["rank"], "rel_error": round(p["rel_error"], 6)} for n, p in stats["per_tensor"].items()}
    ranks = {p["rank"] for p in stats["per_tensor"].values()}
    meta = {"format": "erase-lora-kohya", **_settings_metadata(config), "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "dynamic",
            "ss_network_alpha": str(ALPHA), "lora_rank": str(spec.lora_rank),
            "lora_energy": str(None if spec.lora_rank is not None else spec.lora_energy),
            "rel_error": f"{stats['rel_error']:.6g}", "per_tensor": json.dumps(compact, sort_keys=True),
            "left_out": json.dumps(sorted(stats["left_out"]))}
    if family:
        meta["ss_base_model_version"] = KOHYA_BASE_VERSION[family]
        meta["modelspec.architecture"] = ARCHITECTURES[family] + "/lora"
    _save(tensors, stage / LORA_NAME, meta)
    _write_json(stage / LORA_STATS_NAME, {"format": "kohya LoRA (lora_unet_<diffusers module>.lora_down/lora_up/alpha)",
                                          "settings": spec.to_dict(), **stats})
    return {"files": [LORA_NAME, LORA_STATS_NAME], "dtype": spec.dtype, "rank": spec.lora_rank,
            "energy": None if spec.lora_rank is not None else spec.lora_energy, "tensors": stats["tensors"],
            "rank_min": stats["rank_min"], "rank_max": stats["rank_max"], "rel_error": stats["rel_error"],
            "max_rel_error": stats["max_rel_error"], "left_out": sorted(stats["left_out"]),
            "params": stats["params"], "dense_params": stats["dense_params"], "bytes": (stage / LORA_NAME).stat().st_size}


def write_formats(stage: Path, unet, base_tensors: dict, config: dict, spec: ExportSpec) -> dict:
    """The single-file and LoRA parts of ``spec`` into ``stage``; returns one record per format written."""
    out = {}
    family = None
    if "single_file" in spec.formats:
        out["single_file"] = write_single_file(stage, unet, config, spec)
        family = out["single_file"]["family"]
    if "lora" in spec.formats:
        if family is None:
            from erase.ldm import LayoutError, detect_family

            try:
                name, kw = _base_kwargs(config)
                from diffusers import DiffusionPipeline

                index = DiffusionPipeline.load_config(name, revision=kw.get("revision"))
                texts = [_text_config(name, p, kw) for p in ("text_encoder", "text_encoder_2") if (index.get(p) or [None])[0]]
                family = detect_family(dict(unet.config), texts)[0]
            except (LayoutError, OSError, ValueError):
                family = None  # the LoRA keys do not depend on it; only its metadata does
        out["lora"] = write_lora(stage, unet.state_dict(), base_tensors, config, spec, family)
    return out


def _text_config(name: str, part: str, kw: dict) -> dict:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, subfolder=part, revision=kw.get("revision")).to_dict()


# ------------------------------------------------------------------------------------------------ model card
def card_section(config: dict) -> str:
    """The model card's "Files" section: each format, its files, how to load it, and how far the LoRA is from the full
    export. Empty for an export without a format record (older versions)."""
    from erase.safety import md_text

    export = config.get("export") or {}
    formats = export.get("formats")
    if not formats:
        return ""
    details = export.get("details") or {}
    base = json.dumps(config["pretrained_model_name_or_path"]).replace("`", "\\u0060")
    lines = ["## Files\n"]
    if "diffusers" in formats:
        lines.append("- **diffusers**: `unet/` (the erased UNet) and `unet_delta.safetensors` (only the changed tensors); "
                     "load below.")
    sf = details.get("single_file")
    if "single_file" in formats and sf:
        lines.append(f"- **single file**: `{SINGLE_FILE_NAME}` ({sf['bytes'] / 2**20:,.1f} MiB, {sf['dtype']}, "
                     f"{md_text(sf['family'])} layout: the erased UNet with the base VAE and text encoder(s)). A1111: put it "
                     "in `models/Stable-diffusion/`; ComfyUI: `models/checkpoints/`. diffusers:\n\n"
                     f"  ```python\n  from diffusers import {sf['pipeline_class']}\n\n"
                     f"  pipe = {sf['pipeline_class']}.from_single_file(\"{SINGLE_FILE_NAME}\", config={base})\n  ```")
    lo = details.get("lora")
    if "lora" in formats and lo:
        rule = f"rank {lo['rank']}" if lo.get("rank") is not None else f"{100 * lo['energy']:g} % of each change's energy kept"
        ranks = f"rank {lo['rank_min']}" if lo["rank_min"] == lo["rank_max"] else f"ranks {lo['rank_min']}-{lo['rank_max']}"
        left = (f"; {len(lo['left_out'])} changed bias / norm tensor(s) a LoRA cannot hold are left out and counted in the error"
                if lo["left_out"] else "")
        lines.append(f"- **LoRA**: `{LORA_NAME}` ({lo['bytes'] / 2**20:,.2f} MiB, {lo['dtype']}, kohya keys "
                     f"`lora_unet_*`) with `{LORA_STATS_NAME}`: the change from the base as {lo['tensors']} low-rank "
                     f"factors ({rule}: {ranks}). **It is not the full export**: its relative error against the full change is "
                     f"{100 * lo['rel_error']:.2f} % (worst tensor {100 * lo['max_rel_error']:.2f} %){left}. Scissorhands "
                     "re-initialises single weights, a sparse change that is full-rank, so a LoRA only approximates it; "
                     "audit the LoRA itself before relying on it. A1111: `models/Lora/`; ComfyUI: `models/loras/` on the "
                     "base model. diffusers:\n\n"
                     f"  ```python\n  pipe = DiffusionPipeline.from_pretrained({base})\n"
                     f"  pipe.load_lora_weights(\"path/to/this/folder\", weight_name=\"{LORA_NAME}\")\n  ```")
    lines.append("\nOr `from erase import load_erased; pipe = load_erased(\"path/to/this/folder\")` picks a format "
                 "(diffusers, then single file, then LoRA).\n")
    return "\n".join(lines) + "\n"
