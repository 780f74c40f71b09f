#!/usr/bin/env python
"""Seconds per concept of the closed-form editors (UCE, SPEED) on the real text-input layers of SD v1.4, SDXL,
SD3.5-medium and FLUX.1-dev, for 1, 10 and 50 concepts at once, against one Scissorhands repair step.

What is timed is the method's whole edit, ``prepare`` (``erase/core/methods/uce.py`` / ``speed.py``, its own
``edit_seconds``): gathering the inputs at the paper's positions, the sums, the solves and writing every layer. The
layers are the family's text-input layers (``Family.text_layers``) at the real architecture's shapes: the denoiser is
built from its released config on the meta device and only those layers get (random) weights; the rest of the
denoiser plays no part in the edit. Their inputs are random token features with the family's real layout (SD 1.x /
XL: one 77-token CLIP window, SD3: CLIP's 77 then T5's 256, Flux: T5's 512, plus the pooled vectors), 6 forget
prompts and one anchor per concept and ``--preserve`` retain prompts, as the digits presets have. Encoding the prompts
(stage 3) is not in the figure: every method pays it.

Baseline, interleaved in every repeat: one Scissorhands repair step through the real engine on benchmarks/sd_step.py's
mid-size UNet (5.9 M parameters, 16x16 latents, batch 2, ``xattn`` targets), a unit of this machine's speed under its
load at the time (a trained method's default is 100 such steps at its own model's size, plus generating its images).
The full SD v1.4 UNet is not built: a shared 24 GB machine cannot hold it beside other jobs.

    python benchmarks/closed_form_speed.py --json /tmp/closed_form.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.architectures import FLUX_DEV, SD35_MEDIUM, SDXL_UNET
from benchmarks.inputs import check_counts, check_json_output, check_folder_path, has_keys, name_list
from benchmarks.sd_step import MID_UNET, SD14_UNET, build_unet, engine_steps
from erase.utils.checks import check_int_list
from erase.utils.files import atomic_write_json
from erase.core.adapter import Adapter
from erase.core.closed_form import TextFeatures
from erase.utils.errors import cli_errors

#: name -> (family, denoiser class, config, token segments as (length, begin token?), token width, pooled width)
ARCHS = {
    "sd14": ("sd1", "UNet2DConditionModel", SD14_UNET, [(77, True)], 768, 0),
    "sdxl": ("sdxl", "UNet2DConditionModel", SDXL_UNET, [(77, True)], 2048, 0),
    "sd35_medium": ("sd3", "SD3Transformer2DModel", SD35_MEDIUM, [(77, True), (256, False)], 4096, 2048),
    "flux_dev": ("flux", "FluxTransformer2DModel", FLUX_DEV, [(512, False)], 4096, 768),
}
FORGET_PER_CONCEPT = 6


def text_layer_stub(arch: str) -> torch.nn.Module:
    """The denoiser on the meta device with its text-input layers materialised (random weights, real shapes)."""
    import diffusers
    from accelerate import init_empty_weights

    from erase.diffusion.families import FAMILIES

    family, cls, config, *_ = ARCHS[arch]
    with init_empty_weights():
        model = getattr(diffusers, cls)(**config)
    import re

    for name, module in list(model.named_modules()):
        if any(re.fullmatch(p, name) for p, _, _ in FAMILIES[family].text_layers) and isinstance(module, torch.nn.Linear):
            model.set_submodule(name, torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None))
    return model


class BenchAdapter(Adapter):
    """The closed-form hook (erase.core.adapter.Adapter.text_layers / text_features) over random features."""

    task = "diffusion"

    def __init__(self, arch: str, model, concepts: int, preserve: int, seed: int = 0):
        from erase.diffusion.families import FAMILIES

        family, _, _, segments, width, pooled = ARCHS[arch]
        self.model, self.patterns = model, FAMILIES[family].text_layers
        g = torch.Generator().manual_seed(seed)
        n_forget = concepts * FORGET_PER_CONCEPT
        sizes = {"forget": n_forget, "anchor": concepts, "preserve": preserve, "uncond": 1}
        layout, start = [], 0
        for length, bos in segments:
            layout.append((start, start + int(bos), start + length))
            start += length
        self.tables = {}
        for table, n in sizes.items():
            last = torch.stack([torch.randint(f + 2, f + 12, (n,), generator=g) if table != "uncond" else torch.full((n,), s)
                                for s, f, _ in layout], dim=1)
            extra = {"group": [i // FORGET_PER_CONCEPT for i in range(n)], "anchor": [i // FORGET_PER_CONCEPT for i in range(n)],
                     "concepts": [f"c{k}" for k in range(concepts)]} if table == "forget" else {}
            prompts = [f"{table} {i}" for i in range(n)]
            self.tables[table, "tokens"] = TextFeatures(torch.randn(n, start, width, generator=g), last, layout, prompts, **extra)
            if pooled:
                self.tables[table, "pooled"] = TextFeatures(torch.randn(n, 1, pooled, generator=g), torch.zeros(n, 1, dtype=torch.long),
                                                            [(0, 0, 1)], prompts, **extra)

    def text_layers(self, params):
        from erase.diffusion.closed_form import find_text_layers

        return find_text_layers(self.model, self.patterns, params)

    def text_features(self, table, stream):
        return self.tables[table, stream]


def edit_seconds(arch: str, model, method: str, concepts: int, preserve: int) -> tuple[float, float]:
    """One closed-form edit through the method's ``prepare``, on fresh copies of the layers: its own edit_seconds (wall)
    and the process CPU seconds it took (one thread: what a loaded shared machine does not inflate)."""
    from erase.core import EngineConfig, build_method
    from erase.core.method import RunContext

    adapter = BenchAdapter(arch, model, concepts, preserve)
    layers = adapter.text_layers({n: p for n, p in model.named_parameters() if not p.is_meta})
    params = {f"{x.name}.weight": x.module.weight for x in layers}
    saved = {n: p.detach().clone() for n, p in params.items()}
    ctx = RunContext(adapter=adapter, accelerator=None, config=EngineConfig(max_train_steps=0, progress=False), params=params,
                     forget=None, retain=None, memory=None, saliency=None, model=model)
    cpu = time.process_time()
    info = build_method(method, "diffusion").prepare(ctx)
    cpu = time.process_time() - cpu
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    return float(info["edit_seconds"]), cpu


def repair_step(unet, tmp: str) -> tuple[float, float]:
    """Median wall seconds of a mid-UNet Scissorhands step, and CPU seconds per step over the run (trim included)."""
    args = SimpleNamespace(latent=16, batch=2, topk=2.0, targets="xattn", warmup=1, steps=3, tmp=tmp)
    cpu = time.process_time()
    steps, _ = engine_steps(unet, args)
    return statistics.median(steps), (time.process_time() - cpu) / (args.warmup + args.steps + 1)


def closed_form_methods() -> list[str]:
    from erase.core import available_methods, get_method_class

    return [m for m in available_methods("diffusion") if getattr(get_method_class(m, "diffusion"), "closed_form", False)]


@cli_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="sd14,sdxl,sd35_medium,flux_dev")
    p.add_argument("--methods", default="uce,speed")
    p.add_argument("--concepts", default="1,10,50", help="Concept counts (each: 6 forget prompts, one anchor).")
    p.add_argument("--max_concepts_mmdit", type=int, default=10, help="Largest count run on SD3.5 / Flux (their token streams are long).")
    p.add_argument("--preserve", type=int, default=54, help="Retain prompts kept (the digit presets' 54).")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: more oversubscribe a shared machine).")
    p.add_argument("--tmp", default="/tmp/closed_form_bench")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    archs = name_list("--archs", args.archs, ARCHS, what="architecture")
    methods = name_list("--methods", args.methods, closed_form_methods(), what="closed-form method")
    counts = check_int_list("--concepts", args.concepts, lo=1, hi=10_000)
    check_counts(args, max_concepts_mmdit=1, preserve=1, repeats=1, threads=1)
    check_folder_path("--tmp", args.tmp)
    check_json_output("--json", args.json, has_keys("rows", "mid_unet_repair_step_s_median"))  # never over a file this tool did not write
    torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)
    models = {a: text_layer_stub(a) for a in archs}
    unet = build_unet(MID_UNET)
    rows: dict = {}
    for r in range(args.repeats):
        step, step_cpu = repair_step(unet, f"{args.tmp}/r{r}")
        rows.setdefault("repair_step", []).append((step, step_cpu))
        for a in archs:
            for n in counts:
                if ARCHS[a][5] and n > args.max_concepts_mmdit:
                    continue
                for m in methods:
                    s, cpu = edit_seconds(a, models[a], m, n, args.preserve)
                    rows.setdefault(f"{a}/{m}/{n}", []).append((s, cpu, s / step))
                    print(json.dumps({"repeat": r, "arch": a, "method": m, "concepts": n, "edit_s": s, "edit_cpu_s": cpu,
                                      "step_s": step, "step_cpu_s": step_cpu}), flush=True)
    table = {}
    for key, vals in rows.items():
        if key == "repair_step":
            continue
        a, m, n = key.split("/")
        secs, cpus = [v[0] for v in vals], [v[1] for v in vals]
        table[key] = {"arch": a, "method": m, "concepts": int(n), "edit_s_median": statistics.median(secs),
                      "edit_cpu_s_median": statistics.median(cpus), "cpu_s_per_concept": statistics.median(cpus) / int(n),
                      "in_mid_unet_steps": statistics.median(v[2] for v in vals)}
    result = {"mid_unet_repair_step_s_median": statistics.median(v[0] for v in rows["repair_step"]),
              "mid_unet_repair_step_cpu_s": statistics.median(v[1] for v in rows["repair_step"]), "rows": table, "preserve_prompts": args.preserve,
              "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    print(json.dumps(result, indent=1))
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
