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
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
    from erase.export import changed_tensors
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


# ------------------------------------------------------------------------------------------------ offline converter
def parse_args(input_args=None):
    from erase.sd import _Parser

    p = _Parser(prog="python -m erase.export", description="Add export formats (single file, LoRA) to a finished erase/sd.py "
                                                           "output folder; the formats it has stay.")
    p.add_argument("output_dir", help="A folder written by erase/sd.py (it holds erase_config.json).")
    p.add_argument("--export_format", default="single_file,lora",
                   help=f"Comma list of {', '.join(EXPORT_FORMATS)} to add (default: single_file,lora).")
    p.add_argument("--export_dtype", default=None, choices=tuple(DTYPES), help="dtype of the single file and the LoRA (default fp16).")
    p.add_argument("--lora_rank", type=int, default=None, help="Rank of every LoRA tensor (capped at its full rank).")
    p.add_argument("--lora_energy", type=float, default=None,
                   help=f"Share of each change's energy (squared Frobenius norm) the LoRA keeps, in (0, 1] (default {DEFAULT_LORA_ENERGY}).")
    args = p.parse_args(input_args)
    try:
        args.spec = spec_from_args(args)
    except UserError as e:
        p.error(str(e.code).removeprefix("error: "))
    return args


def erased_unet(folder: Path, config: dict):
    """The erased UNet of an export: ``unet/`` when present, else the base UNet with ``unet_delta.safetensors`` applied."""
    from diffusers import UNet2DConditionModel

    from erase.export import DELTA_NAME

    if (folder / "unet" / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    name, kw = _base_kwargs(config)
    unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kw)
    delta = load_file(str(folder / DELTA_NAME))
    missing = unet.load_state_dict(delta, strict=False).unexpected_keys
    if missing:
        raise UserError(f"{folder / DELTA_NAME} names tensors the base UNet does not have (first: {missing[0]})")
    return unet


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def convert(folder: str | os.PathLike, spec: ExportSpec) -> dict:
    """Add ``spec.formats`` to the export in ``folder`` (the formats it has stay); built beside and swapped in whole."""
    from erase.export import CONFIG_NAME, DELTA_NAME, clean_stale_stages, model_card, previous_export
    from erase.safety import check_weights, hold_output_dir, staging_dir, swap_in

    out = Path(folder).expanduser()
    try:
        config = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no {CONFIG_NAME}; give a folder written by erase/sd.py") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{out / CONFIG_NAME} cannot be read ({e}); give a folder written by erase/sd.py") from None
    if not isinstance(config, dict) or "method" not in config or not (out / DELTA_NAME).is_file():
        raise UserError(f"{folder} is not an erase/sd.py export (needs {CONFIG_NAME} and {DELTA_NAME})")
    base_path = (config.get("base_model") or {}).get("path")
    with hold_output_dir(out, base=base_path, by="erase.export") as claim:
        out = claim.path
        unet = erased_unet(out, config)
        check_weights(unet.state_dict().items(), f"the erased UNet of {out}", "; nothing was converted")
        delta = load_file(str(out / DELTA_NAME))
        name, kw = _base_kwargs(config)
        from diffusers import UNet2DConditionModel

        base_unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kw)
        base_state = base_unet.state_dict()
        base_tensors = {n: base_state[n].detach().clone() for n in delta}
        del base_unet, base_state
        had = list((config.get("export") or {}).get("formats") or ["diffusers"])
        wanted = tuple(f for f in EXPORT_FORMATS if f in set(had) | set(spec.formats))
        clean_stale_stages(out)
        stage = staging_dir(out)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            keep = previous_export(out) - {CONFIG_NAME, "README.md"}
            for entry in sorted(keep):
                if (out / entry).exists():
                    _link_or_copy(out / entry, stage / entry)
            if "diffusers" in spec.formats and not (stage / "unet").exists() and not (stage / "model_index.json").exists():
                unet.save_pretrained(str(stage / "unet"), safe_serialization=True)
            new = write_formats(stage, unet, base_tensors, config, ExportSpec(tuple(f for f in spec.formats if f != "diffusers"),
                                                                             spec.dtype, spec.lora_rank, spec.lora_energy))
            details = {**(config.get("export") or {}).get("details", {}), **new}
            config["export"] = {**(config.get("export") or {}), "formats": list(wanted), "details": details,
                                "spec": spec.to_dict(), "converted_by": "python -m erase.export"}
            (stage / "README.md").write_text(model_card(config), encoding="utf-8")
            config["export"]["files"] = sorted({p.name for p in stage.iterdir()} | {CONFIG_NAME})
            _write_json(stage / CONFIG_NAME, config)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        swap_in(out, stage, previous_export(out), keep_last=("model_index.json", CONFIG_NAME))
    return config["export"]


def main(input_args=None) -> int:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    args = parse_args(input_args)
    record = convert(args.output_dir, args.spec)
    print(f"{args.output_dir}: formats {', '.join(record['formats'])}; files {', '.join(record['files'])}")
    return 0


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
