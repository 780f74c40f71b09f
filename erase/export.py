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
import platform
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def changed_tensors(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of ``state`` that differ from ``base`` (bitwise), as contiguous CPU copies."""
    out = {}
    for name, ref in base.items():
        cur = state[name].detach()
        if cur.shape != ref.shape or not torch.equal(cur.cpu(), ref.to(cur.dtype)):
            out[name] = cur.contiguous().cpu()
    return out


def delta_stats(delta: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    per = {n: {"numel": t.numel(), "changed": int((t != base[n].to(t.dtype)).sum()),
               "max_abs_change": float((t.float() - base[n].float()).abs().max())} for n, t in delta.items()}
    return {"tensors_changed": len(delta), "entries_changed": sum(p["changed"] for p in per.values()), "per_tensor": per}


def model_card(config: dict) -> str:
    """README.md: what was erased, how, and how to load it."""
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

## Load

```python
import torch
from diffusers import {pipe_cls}, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("path/to/this/folder", subfolder="unet")
pipe = {pipe_cls}.from_pretrained({load_args}, unet=unet)
image = pipe("a photo of a church").images[0]
```

{pipe_note}Erasure lowers, but does not guarantee the absence of, the concept: audit with adversarial prompts before relying on it.
"""


def export(output_dir: str | Path, unet, base_tensors: dict[str, torch.Tensor], config: dict, pipeline=None) -> dict:
    """Build the export beside ``output_dir`` and swap it in whole; returns the delta statistics (also stored in
    ``config['delta']``). On any failure the staged export is removed and the folder is as it was."""
    out = Path(output_dir).resolve()
    clean_stale_stages(out)
    stage = staging_dir(out)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        state = unet.state_dict()
        delta = changed_tensors(state, base_tensors)
        config["delta"] = delta_stats(delta, base_tensors)
        meta = {"format": "erase-unet-delta", "base_model": str(config["pretrained_model_name_or_path"]),
                "concept": str(config["concept"]), "method": str(config["method"]),
                "settings": json.dumps(config["settings"], sort_keys=True, default=str)}
        save_file(delta, str(stage / DELTA_NAME), metadata=meta)
        if pipeline is not None:
            pipeline.save_pretrained(str(stage), safe_serialization=True)
        else:
            unet.save_pretrained(str(stage / "unet"), safe_serialization=True)
        (stage / "README.md").write_text(model_card(config), encoding="utf-8")
        config["export"] = {"files": sorted({p.name for p in stage.iterdir()} | {CONFIG_NAME}),
                            "swap": "built beside the folder and swapped in whole"}
        (stage / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    swap_in(out, stage, previous_export(out), keep_last=("model_index.json", CONFIG_NAME))
    return config["delta"]
