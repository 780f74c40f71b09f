"""The erased-model folder (docs/CONTRACTS.md): ``unet/``, ``unet_delta.safetensors``, ``erase_config.json``,
``README.md`` and, on request, a full pipeline.

Everything is written into ``output_dir/.export.tmp`` first and then renamed into place, ``erase_config.json``
last: a crash never leaves a half-written file, and a folder with ``erase_config.json`` holds a complete export.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

DELTA_NAME = "unet_delta.safetensors"
CONFIG_NAME = "erase_config.json"


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
    concept = c["concept"]
    base = c["pretrained_model_name_or_path"]
    s = c["settings"]
    concepts = c.get("concepts") or [c["concept_prompts"]]
    lines = "".join(f"- Concept: **{k['name']}** ({k.get('category', 'custom')}); forget prompts: "
                    f"{', '.join(f'`{p}`' for p in k['forget_prompts'][:8])}; anchor prompt: `{k.get('anchor_prompt') or '-'}`\n"
                    for k in concepts)
    trim = (c.get("prepare") or {}).get("trim", {}).get("summary")
    trim_line = (f"- Trim: {trim['reset']:,} of {trim['targeted']:,} targeted weights re-initialised "
                 f"({100 * trim['fraction']:.2f} %, {trim['tensors_touched']} tensors).\n") if trim else ""
    pipe_note = ("This folder is also a complete pipeline:\n\n```python\nfrom diffusers import StableDiffusionPipeline\n\n"
                 "pipe = StableDiffusionPipeline.from_pretrained(\"path/to/this/folder\")\n```\n\n") if s.get("export_pipeline") else ""
    return f"""---
library_name: diffusers
base_model: {base}
tags:
- stable-diffusion
- concept-erasure
- {c['method']}
---

# {base} with the concept{'s' if len(concepts) > 1 else ''} "{concept}" erased

{lines}- Method: **{c['method']}** on the `{s['targets']}` targets ({c['targets']['num_tensors']} tensors, {c['targets']['num_parameters']:,} parameters)
{trim_line}- Repair: {s['max_train_steps']} steps, lr {s['lr']}, batch {s['train_batch_size']} x {c['num_processes']} process(es) x {s['gradient_accumulation_steps']} accumulation, forget loss `{c['method_config'].get('forget_loss') or '-'}`, retain loss `{c['data'].get('retain_loss', 'data')}`, seed {s['seed']}
- Data: {c['data']['forget']['count']} forget and {c['data']['retain']['count'] if c['data'].get('retain') else 0} retain images ({c['data']['forget']['source']})
- Changed: {c['delta']['tensors_changed']} tensors, {c['delta']['entries_changed']:,} entries (`{DELTA_NAME}` holds only those)
- Wall time: {c['wall_seconds']:.1f} s; diffusers {c['versions']['diffusers']}, torch {c['versions']['torch']}

Every setting is in `{CONFIG_NAME}`.

## Load

```python
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("path/to/this/folder", subfolder="unet")
pipe = StableDiffusionPipeline.from_pretrained("{base}", unet=unet)
image = pipe("a photo of a church").images[0]
```

{pipe_note}Erasure lowers, but does not guarantee the absence of, the concept: audit with adversarial prompts before relying on it.
"""


def export(output_dir: str | Path, unet, base_tensors: dict[str, torch.Tensor], config: dict, pipeline=None) -> dict:
    """Write the final export atomically; returns the delta statistics (also stored in ``config['delta']``)."""
    out = Path(output_dir)
    tmp = out / ".export.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = unet.state_dict()
    delta = changed_tensors(state, base_tensors)
    config["delta"] = delta_stats(delta, base_tensors)
    meta = {"format": "erase-unet-delta", "base_model": str(config["pretrained_model_name_or_path"]),
            "concept": str(config["concept"]), "method": str(config["method"]),
            "settings": json.dumps(config["settings"], sort_keys=True, default=str)}
    save_file(delta, str(tmp / DELTA_NAME), metadata=meta)
    if pipeline is not None:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
    else:
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
    (tmp / "README.md").write_text(model_card(config))
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    # Commit: drop the old marker, move every entry into place, the marker last.
    (out / CONFIG_NAME).unlink(missing_ok=True)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_NAME):
        dest = out / entry.name
        if dest.is_dir() and entry.is_dir():
            shutil.rmtree(dest)
        entry.replace(dest)
    tmp.rmdir()
    return config["delta"]
