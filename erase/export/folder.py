"""The erased-model folder (docs/CONTRACTS.md): ``unet/``, ``unet_delta.safetensors``, ``erase_config.json``,
``README.md`` and, on request, a full pipeline and the other formats (:mod:`erase.export.formats`). A transformer
denoiser (SD3, SD3.5, Flux) writes ``transformer/`` and ``transformer_delta.safetensors`` instead
(:func:`erase.export.formats.denoiser_folder`, :func:`~erase.export.formats.delta_name`); ``erase_config.json``
records which (``export.denoiser``).

The whole export is built in a hidden per-process folder beside ``output_dir`` and then swapped in whole
(:func:`erase.utils.folders.swap_in`): entries of an earlier export that the new one does not have (an old
``model_index.json``) go with the old export, everything else in the folder (checkpoints, data) stays. A crash
leaves the old or the new export, never a mix; ``erase_config.json`` lists the files of its export and records
the resolved base model (absolute path, or hub id + revision + commit).
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from erase.export.card import model_card
from erase.export.local import LOCAL_NAME, shared, write_record
from erase.export.formats import (CONFIG_NAME, DELTA_NAME, LORA_NAME, LORA_STATS_NAME, SINGLE_FILE_NAME, ExportSpec, changed_tensors,
                                  delta_name, denoiser_folder, layout_family, write_formats, write_json)
from erase.utils.folders import stale_temp, staging_dir, swap_in

#: What an export of an earlier version (which did not list its files) may have written.
LEGACY_EXPORT_NAMES = {"unet", DELTA_NAME, CONFIG_NAME, "README.md", "model_index.json", "vae", "text_encoder", "tokenizer",
                       "scheduler", "safety_checker", "feature_extractor", "image_encoder", ".export.tmp"}
#: What an export of this version may write besides those: a half-built one made only of these is removed.
EXPORT_NAMES = LEGACY_EXPORT_NAMES | {"transformer", delta_name("transformer"), "text_encoder_2", "text_encoder_3", "tokenizer_2",
                                      "tokenizer_3", SINGLE_FILE_NAME, LORA_NAME, LORA_STATS_NAME, LOCAL_NAME}


def base_identity(name: str, revision: str | None = None, variant: str | None = None) -> dict:
    """The base model as resolved now: ``{"path": absolute}`` for a folder, else ``{"hub_id", "revision", "commit"}``
    (the commit of the cached snapshot, when it is in the local cache)."""
    path = Path(name).expanduser()
    if path.exists():
        return {"path": str(path.resolve()), "variant": variant}
    out = {"hub_id": name, "revision": revision or "main", "commit": None, "variant": variant}
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "model_index.json", revision=revision)
        if isinstance(found, str) and Path(found).parent.parent.name == "snapshots":
            out["commit"] = Path(found).parent.name
    except Exception:  # not cached, or an older huggingface_hub: the id and revision are still recorded
        pass
    return out


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def base_folder(base: dict) -> Path | None:
    """The folder the recorded base loads from on this machine: its path, or its hub snapshot in the local cache."""
    if base.get("path"):
        path = Path(base["path"]).expanduser()
        return path if path.is_dir() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base["hub_id"], "model_index.json", revision=base.get("commit") or base.get("revision"))
    except Exception:  # not cached, or an older huggingface_hub
        return None
    return Path(found).parent if isinstance(found, str) else None


def base_weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every weights file of the base's components (``vae/...safetensors``, ``text_encoder/...``), by path
    in the folder: what identifies the base behind an export where its path stays the same (a replaced folder, file
    times kept)."""
    from erase.utils.files import sha256_file

    return {f"{p.parent.name}/{p.name}": sha256_file(p) for p in sorted(folder.glob("*/*"))
            if p.suffix in WEIGHT_SUFFIXES and p.is_file()}


def check_base_weights(base: dict, skip: tuple[str, ...] = ()) -> None:
    """One line when the base the record names now holds other weights than at export (components in ``skip``, the
    erased denoiser an export carries itself, are not compared). Records of older versions hold no digests."""
    recorded = base.get("weights_sha256")
    folder = base_folder(base)
    if not isinstance(recorded, dict) or folder is None:
        return
    from erase.utils.errors import UserError

    now = base_weights_sha256(folder)
    differ = sorted(k for k, v in recorded.items() if k.split("/")[0] not in skip and now.get(k) != v)
    if differ:
        raise UserError(f"the base model at {folder} is not the one this export was made from: {', '.join(differ[:3])}"
                        f"{' and more' if len(differ) > 3 else ''} changed or went missing since; restore that base "
                        "(or pass the right one) before loading")


def previous_export(out: Path) -> set[str]:
    """Names of the export ``out`` holds now (from its ``erase_config.json``), which a new export replaces."""
    try:
        config = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(config, dict) or "method" not in config:
        return set()
    files = (config.get("export") or {}).get("files")
    return set(files) if isinstance(files, list) else set(LEGACY_EXPORT_NAMES)


def clean_stale_stages(out: Path) -> None:
    """Remove exports that a killed process left half-built beside ``out`` (never one that holds anything else)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(new|old)\.\d+\.tmp")
    for p in out.parent.glob(f".{out.name}.*.tmp"):
        if pattern.fullmatch(p.name) and p.is_dir() and stale_temp(p):
            names = {e.name for e in p.iterdir()}
            if names <= EXPORT_NAMES:
                shutil.rmtree(p, ignore_errors=True)
            else:
                import logging

                logging.getLogger(__name__).warning("%s was left by an interrupted export and holds %s; move back what you "
                                                    "need, then delete it", p, ", ".join(sorted(names - EXPORT_NAMES)))


def versions() -> dict:
    import accelerate
    import diffusers
    import safetensors
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__, "platform": platform.platform()}


def delta_stats(delta: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    per = {n: {"numel": t.numel(), "changed": int((t != base[n].to(t.dtype)).sum()),
               "max_abs_change": float((t.float() - base[n].float()).abs().max())} for n, t in delta.items()}
    return {"tensors_changed": len(delta), "entries_changed": sum(p["changed"] for p in per.values()), "per_tensor": per}


def export(output_dir: str | Path, model, base_tensors: dict[str, torch.Tensor], config: dict, pipeline=None, spec=None,
           denoiser: str | None = None) -> dict:
    """Build the export beside ``output_dir`` and swap it in whole; returns the delta statistics (also stored in
    ``config['delta']``). ``model`` is the erased denoiser (a UNet, or an SD3 / Flux transformer); ``denoiser`` its
    subfolder and delta name (``unet`` / ``transformer``; default from its class, :func:`denoiser_folder`). ``spec``
    (:class:`erase.export.formats.ExportSpec`, default diffusers only) names the formats besides the delta. On any
    failure the staged export is removed and the folder is as it was."""

    spec = spec or ExportSpec()
    denoiser = denoiser or denoiser_folder(model)
    out = Path(output_dir).resolve()
    with staged_export(out) as stage:
        state = model.state_dict()
        delta = changed_tensors(state, base_tensors)
        config["delta"] = delta_stats(delta, base_tensors)
        public = shared(config)  # no local path in a file meant to be shared (erase.export.local)
        meta = {"format": f"erase-{denoiser}-delta", "base_model": str(public["pretrained_model_name_or_path"]),
                "concept": str(config["concept"]), "method": str(config["method"]),
                "settings": json.dumps(public["settings"], sort_keys=True, default=str)}
        save_file(delta, str(stage / delta_name(denoiser)), metadata=meta)
        if pipeline is not None:
            pipeline.save_pretrained(str(stage), safe_serialization=True)
        elif "diffusers" in spec.formats:
            model.save_pretrained(str(stage / denoiser), safe_serialization=True)
        details = write_formats(stage, model, base_tensors, config, spec)
        family = (details.get("single_file") or {}).get("family") or layout_family(model, config)
        config["export"] = {"formats": list(spec.formats), "spec": spec.to_dict(), "details": details, "denoiser": denoiser,
                            "denoiser_class": type(model).__name__, "family": family}
        finish_stage(stage, config, swap="built beside the folder and swapped in whole")
    return config["delta"]


@contextmanager
def staged_export(out: Path):
    """A fresh staging folder beside ``out`` to build an export in: removed on any failure (the folder stays as it
    was), swapped in whole when the block ends."""
    clean_stale_stages(out)
    stage = staging_dir(out)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    swap_in(out, stage, previous_export(out), keep_last=("model_index.json", CONFIG_NAME))


def finish_stage(stage: Path, config: dict, **record) -> None:
    """The model card, ``erase_config.json`` and the local record (``erase_local.json``, :mod:`erase.export.local`) of a
    staged export, whose ``export`` entry lists its files."""
    (stage / "README.md").write_text(model_card(shared(config)), encoding="utf-8")
    local = {LOCAL_NAME} if shared(config) != config else set()
    config["export"].update(files=sorted({p.name for p in stage.iterdir()} | {CONFIG_NAME} | local), **record)
    write_record(stage, config, write_json)
