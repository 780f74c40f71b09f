"""The erased-model folder (docs/CONTRACTS.md): ``unet/``, ``unet_delta.safetensors``, ``erase_config.json``,
``README.md`` and, on request, a full pipeline.

The whole export is built in a hidden per-process folder beside ``output_dir`` and then swapped in whole
(:func:`erase.safety.swap_in`): entries of an earlier export that the new one does not have (an old
``model_index.json``) go with the old export, everything else in the folder (checkpoints, data) stays. A crash
leaves the old or the new export, never a mix; ``erase_config.json`` lists the files of its export and records
the resolved base model (absolute path, or hub id + revision + commit).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from erase.formats import (
    DEFAULT_LORA_ENERGY,
    DTYPES,
    EXPORT_FORMATS,
    ExportSpec,
    _base_kwargs,
    _write_json,
    changed_tensors,
    spec_from_args,
    write_formats,
)
from erase.io import OneLineParser, UserError, cli_errors
from erase.safety import md_text, stale_temp, staging_dir, swap_in, yaml_scalar

DELTA_NAME = "unet_delta.safetensors"
CONFIG_NAME = "erase_config.json"
#: What an export of an earlier version (which did not list its files) may have written.
LEGACY_EXPORT_NAMES = {"unet", DELTA_NAME, CONFIG_NAME, "README.md", "model_index.json", "vae", "text_encoder", "tokenizer",
                       "scheduler", "safety_checker", "feature_extractor", "image_encoder", ".export.tmp"}


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
            if names <= LEGACY_EXPORT_NAMES:
                shutil.rmtree(p, ignore_errors=True)
            else:
                import logging

                logging.getLogger(__name__).warning("%s was left by an interrupted export and holds %s; move back what you "
                                                    "need, then delete it", p, ", ".join(sorted(names - LEGACY_EXPORT_NAMES)))


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


def model_card(config: dict) -> str:
    """README.md: what was erased, how, and how to load it."""
    from erase.formats import card_section

    c = config
    concept = md_text(c["concept"])
    base_raw = c["pretrained_model_name_or_path"]
    base = md_text(base_raw)
    s = c["settings"]
    concepts = c.get("concepts") or [c["concept_prompts"]]
    lines = "".join(f"- Concept: **{md_text(k['name'])}** ({md_text(k.get('category', 'custom'))}); forget prompts: "
                    f"{'; '.join(md_text(p, 120) for p in k['forget_prompts'][:8])}; anchor prompt: {md_text(k.get('anchor_prompt') or '-')}\n"
                    for k in concepts)
    revision = (c.get("base_model") or {}).get("commit") or (c.get("base_model") or {}).get("revision")
    load_args = json.dumps(base_raw).replace("`", "\\u0060") + (f", revision={json.dumps(revision)}" if revision else "")
    trim = (c.get("prepare") or {}).get("trim", {}).get("summary")
    trim_line = (f"- Trim: {trim['reset']:,} of {trim['targeted']:,} targeted weights re-initialised "
                 f"({100 * trim['fraction']:.2f} %, {trim['tensors_touched']} tensors).\n") if trim else ""
    pipe_cls = c.get("pipeline_class") or "StableDiffusionPipeline"  # the model family's pipeline (erase.families)
    formats = (c.get("export") or {}).get("formats") or ["diffusers"]
    unet_load = ("unet = UNet2DConditionModel.from_pretrained(\"path/to/this/folder\", subfolder=\"unet\")"
                 if "diffusers" in formats or s.get("export_pipeline") else
                 "unet = UNet2DConditionModel.from_pretrained(" + load_args + ", subfolder=\"unet\")\n"
                 f"unet.load_state_dict(load_file(\"path/to/this/folder/{DELTA_NAME}\"), strict=False)  # the changed tensors")
    pipe_note = (f"This folder is also a complete pipeline:\n\n```python\nfrom diffusers import {pipe_cls}\n\n"
                 f"pipe = {pipe_cls}.from_pretrained(\"path/to/this/folder\")\n```\n\n") if s.get("export_pipeline") else ""
    return f"""---
library_name: diffusers
base_model: {yaml_scalar(base_raw)}
tags:
- stable-diffusion
- {c.get('model_family') or 'sd1'}
- concept-erasure
- {c['method']}
---

# {base} with the concept{'s' if len(concepts) > 1 else ''} "{concept}" erased

{lines}- Method: **{c['method']}** on the {md_text(s['targets'])} targets ({c['targets']['num_tensors']} tensors, {c['targets']['num_parameters']:,} parameters)
{trim_line}- Repair: {s['max_train_steps']} steps, lr {s['lr']}, batch {s['train_batch_size']} x {c['num_processes']} process(es) x {s['gradient_accumulation_steps']} accumulation, forget loss `{c['method_config'].get('forget_loss') or '-'}`, retain loss `{c['data'].get('retain_loss', 'data')}`, seed {s['seed']}
- Data: {c['data']['forget']['count']} forget and {c['data']['retain']['count'] if c['data'].get('retain') else 0} retain images ({md_text(c['data']['forget']['source'])})
- Changed: {c['delta']['tensors_changed']} tensors, {c['delta']['entries_changed']:,} entries (`{DELTA_NAME}` holds only those)
- Wall time: {c['wall_seconds']:.1f} s; diffusers {c['versions']['diffusers']}, torch {c['versions']['torch']}

Every setting is in `{CONFIG_NAME}`.

{card_section(c)}
## Load

```python
import torch
from diffusers import {pipe_cls}, UNet2DConditionModel
from safetensors.torch import load_file

{unet_load}
pipe = {pipe_cls}.from_pretrained({load_args}, unet=unet)
image = pipe("a photo of a church").images[0]
```

{pipe_note}Erasure lowers, but does not guarantee the absence of, the concept: audit with adversarial prompts before relying on it.
"""


def export(output_dir: str | Path, unet, base_tensors: dict[str, torch.Tensor], config: dict, pipeline=None, spec=None) -> dict:
    """Build the export beside ``output_dir`` and swap it in whole; returns the delta statistics (also stored in
    ``config['delta']``). ``spec`` (:class:`erase.formats.ExportSpec`, default diffusers only) names the formats
    besides the delta. On any failure the staged export is removed and the folder is as it was."""

    spec = spec or ExportSpec()
    out = Path(output_dir).resolve()
    with staged_export(out) as stage:
        state = unet.state_dict()
        delta = changed_tensors(state, base_tensors)
        config["delta"] = delta_stats(delta, base_tensors)
        meta = {"format": "erase-unet-delta", "base_model": str(config["pretrained_model_name_or_path"]),
                "concept": str(config["concept"]), "method": str(config["method"]),
                "settings": json.dumps(config["settings"], sort_keys=True, default=str)}
        save_file(delta, str(stage / DELTA_NAME), metadata=meta)
        if pipeline is not None:
            pipeline.save_pretrained(str(stage), safe_serialization=True)
        elif "diffusers" in spec.formats:
            unet.save_pretrained(str(stage / "unet"), safe_serialization=True)
        details = write_formats(stage, unet, base_tensors, config, spec)
        config["export"] = {"formats": list(spec.formats), "spec": spec.to_dict(), "details": details}
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
    """The model card and ``erase_config.json`` of a staged export, whose ``export`` entry lists its files."""
    (stage / "README.md").write_text(model_card(config), encoding="utf-8")
    config["export"].update(files=sorted({p.name for p in stage.iterdir()} | {CONFIG_NAME}), **record)
    _write_json(stage / CONFIG_NAME, config)


# ------------------------------------------------------------------------------------------------ offline converter
@cli_errors
def parse_args(input_args=None):
    p = OneLineParser(prog="python -m erase.export", description="Add export formats (single file, LoRA) to a finished erase/sd.py "
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
        p.error(str(e))
    return args


def erased_unet(folder: Path, config: dict):
    """The erased UNet of an export: ``unet/`` when present, else the base UNet with ``unet_delta.safetensors`` applied."""
    from diffusers import UNet2DConditionModel

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
    from erase.safety import check_weights, hold_output_dir

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
        with staged_export(out) as stage:
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
            finish_stage(stage, config)
    return config["export"]


@cli_errors
def main(input_args=None) -> int:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    args = parse_args(input_args)
    record = convert(args.output_dir, args.spec)
    print(f"{args.output_dir}: formats {', '.join(record['formats'])}; files {', '.join(record['files'])}")
    return 0


if __name__ == "__main__":  # python -m erase.export DIR --export_format single_file,lora (the offline converter)
    raise SystemExit(main())
