"""The model card (``README.md``) of an erased-model folder: what was erased, how, which files hold it and how to
load each. Every piece of user text goes through :func:`erase.utils.text.md_text` first."""

from __future__ import annotations

import json

from erase.export.formats import CONFIG_NAME, LORA_NAME, LORA_STATS_NAME, SINGLE_FILE_NAME, delta_name
from erase.utils.text import md_text, yaml_scalar


def model_card(config: dict) -> str:
    """README.md: what was erased, how, and how to load it."""
    from erase.export.card import card_section

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
    prep = c.get("prepare") or {}
    repair_line = (f"- Repair: {s['max_train_steps']} steps, lr {s['lr']}, batch {s['train_batch_size']} x {c['num_processes']} process(es) x "
                   f"{s['gradient_accumulation_steps']} accumulation, forget loss `{c['method_config'].get('forget_loss') or '-'}`, retain loss "
                   f"`{c['data'].get('retain_loss', 'data')}`, seed {s['seed']}\n")
    if prep.get("closed_form"):  # uce, speed: one closed-form edit of the text-input layers from prompts, no repair steps
        repair_line = (f"- Edit: closed form, no repair steps: {prep.get('layers_edited', 0)} text-input layers in "
                       f"{prep.get('edit_seconds', 0.0):.2f} s ({prep.get('seconds_per_concept', 0.0):.2f} s a concept)\n")
    family = c.get("model_family") or (c.get("export") or {}).get("family") or "sd1"
    pipe_cls = c.get("pipeline_class") or _layout_pipeline((c.get("export") or {}).get("family"))  # the family's pipeline
    formats = (c.get("export") or {}).get("formats") or ["diffusers"]
    part = (c.get("export") or {}).get("denoiser") or "unet"  # unet / transformer (erase.export.formats.denoiser_folder)
    model_cls = (c.get("export") or {}).get("denoiser_class") or "UNet2DConditionModel"
    delta_file = delta_name(part)
    unet_load = (f"{part} = {model_cls}.from_pretrained(\"path/to/this/folder\", subfolder=\"{part}\")"
                 if "diffusers" in formats or s.get("export_pipeline") else
                 f"{part} = {model_cls}.from_pretrained(" + load_args + f", subfolder=\"{part}\")\n"
                 f"{part}.load_state_dict(load_file(\"path/to/this/folder/{delta_file}\"), strict=False)  # the changed tensors")
    pipe_note = (f"This folder is also a complete pipeline:\n\n```python\nfrom diffusers import {pipe_cls}\n\n"
                 f"pipe = {pipe_cls}.from_pretrained(\"path/to/this/folder\")\n```\n\n") if s.get("export_pipeline") else ""
    return f"""---
library_name: diffusers
base_model: {yaml_scalar(base_raw)}
tags:
- {'flux' if str(family).startswith('flux') else 'stable-diffusion'}
- {family}
- concept-erasure
- {c['method']}
---

# {base} with the concept{'s' if len(concepts) > 1 else ''} "{concept}" erased

{lines}- Method: **{c['method']}** on the {md_text(s['targets'])} targets ({c['targets']['num_tensors']} tensors, {c['targets']['num_parameters']:,} parameters)
{trim_line}{repair_line}- Data: {c['data']['forget']['count']} forget and {c['data']['retain']['count'] if c['data'].get('retain') else 0} retain images ({md_text(c['data']['forget']['source'])})
- Changed: {c['delta']['tensors_changed']} tensors, {c['delta']['entries_changed']:,} entries (`{delta_file}` holds only those)
- Wall time: {c['wall_seconds']:.1f} s; diffusers {c['versions']['diffusers']}, torch {c['versions']['torch']}

Every setting is in `{CONFIG_NAME}`.

{card_section(c)}
## Load

```python
import torch
from diffusers import {pipe_cls}, {model_cls}
from safetensors.torch import load_file

{unet_load}
pipe = {pipe_cls}.from_pretrained({load_args}, {part}={part})
image = pipe("a photo of a church").images[0]
```

{pipe_note}Erasure lowers, but does not guarantee the absence of, the concept: audit with adversarial prompts before relying on it.
"""


def _layout_pipeline(family: str | None) -> str:
    from erase.export.layouts import LAYOUTS

    return LAYOUTS[family].pipeline if family in LAYOUTS else "StableDiffusionPipeline"


#: Where each family's single file goes in the UIs that read it.
SINGLE_FILE_CLIENTS = {
    **dict.fromkeys(("sd1", "sd2", "sdxl"), "A1111 / Forge: put it in `models/Stable-diffusion/`; ComfyUI: `models/checkpoints/`."),
    **dict.fromkeys(("sd3", "sd35"), "ComfyUI: `models/checkpoints/` (Load Checkpoint: MMDiT, VAE, CLIP-L, CLIP-G and T5 in one file)."),
    **dict.fromkeys(("flux_dev", "flux_schnell"), "ComfyUI: `models/checkpoints/` (Load Checkpoint), or `models/diffusion_models/` "
                    "for Load Diffusion Model; Forge: `models/Stable-diffusion/`."),
}
LORA_KEYS = {"kohya": "kohya keys `lora_unet_*`", "kohya_sgm": "kohya keys `lora_unet_*` in the original SGM names",
             "peft": "diffusers keys `transformer.*.lora_A` / `lora_B`"}


def card_section(config: dict) -> str:
    """The model card's "Files" section: each format, its files, how to load it, and how far the LoRA is from the full
    export. Empty for an export without a format record (older versions)."""
    from erase.utils.text import md_text

    export = config.get("export") or {}
    formats = export.get("formats")
    if not formats:
        return ""
    details = export.get("details") or {}
    base = json.dumps(config["pretrained_model_name_or_path"]).replace("`", "\\u0060")
    lines = ["## Files\n"]
    part = export.get("denoiser") or "unet"
    if "diffusers" in formats:
        lines.append(f"- **diffusers**: `{part}/` (the erased {'UNet' if part == 'unet' else 'transformer'}) and "
                     f"`{delta_name(part)}` (only the changed tensors); load below.")
    sf = details.get("single_file")
    if "single_file" in formats and sf:
        lines.append(f"- **single file**: `{SINGLE_FILE_NAME}` ({sf['bytes'] / 2**20:,.1f} MiB, {sf['dtype']}, "
                     f"{md_text(sf['family'])} layout: the erased {'UNet' if part == 'unet' else 'transformer'} with the base VAE and "
                     f"text encoder(s)). {SINGLE_FILE_CLIENTS.get(sf['family'], SINGLE_FILE_CLIENTS['sd1'])} diffusers:\n\n"
                     f"  ```python\n  from diffusers import {sf['pipeline_class']}\n\n"
                     f"  pipe = {sf['pipeline_class']}.from_single_file(\"{SINGLE_FILE_NAME}\", config={base})\n  ```")
    lo = details.get("lora")
    if "lora" in formats and lo:
        rule = f"rank {lo['rank']}" if lo.get("rank") is not None else f"{100 * lo['energy']:g} % of each change's energy kept"
        ranks = f"rank {lo['rank_min']}" if lo["rank_min"] == lo["rank_max"] else f"ranks {lo['rank_min']}-{lo['rank_max']}"
        left = (f"; {len(lo['left_out'])} changed bias / norm tensor(s) a LoRA cannot hold are left out and counted in the error"
                if lo["left_out"] else "")
        keys = LORA_KEYS.get(lo.get("style") or "kohya")
        lines.append(f"- **LoRA**: `{LORA_NAME}` ({lo['bytes'] / 2**20:,.2f} MiB, {lo['dtype']}, {keys}) with "
                     f"`{LORA_STATS_NAME}`: the change from the base as {lo['tensors']} low-rank "
                     f"factors ({rule}: {ranks}). **It is not the full export**: its relative error against the full change is "
                     f"{100 * lo['rel_error']:.2f} % (worst tensor {100 * lo['max_rel_error']:.2f} %){left}. Scissorhands "
                     "re-initialises single weights, a sparse change that is full-rank, so a LoRA only approximates it; "
                     "audit the LoRA itself before relying on it. "
                     f"{'A1111: `models/Lora/`; ' if (lo.get('style') or 'kohya') != 'peft' else ''}ComfyUI: `models/loras/` on the "
                     "base model. diffusers:\n\n"
                     f"  ```python\n  pipe = DiffusionPipeline.from_pretrained({base})\n"
                     f"  pipe.load_lora_weights(\"path/to/this/folder\", weight_name=\"{LORA_NAME}\")\n  ```")
    lines.append("\nOr `from erase import load_erased; pipe = load_erased(\"path/to/this/folder\")` picks a format "
                 "(diffusers, then single file, then LoRA).\n")
    return "\n".join(lines) + "\n"
