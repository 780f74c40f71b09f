#!/usr/bin/env python
"""Expected GPU memory of a default erasure on the big transformer families, computed from their real architectures.

The parameter counts are exact (each model is built from its written-out config on the meta device, benchmarks/
architectures.py, and the family's ``--targets`` preset is applied to it); the rest is the arithmetic of what a run holds
at its peak, in bytes per parameter, with the run's defaults (bf16 mixed precision, Adam, one projection memory, batch 1,
gradient checkpointing on, native resolution 1024 px):

* the untrained weights of the denoiser in bf16 (2 B each: erase/diffusion/load.py casts them under mixed precision);
* the targeted weights as fp32 masters (4 B), their gradients (4 B; DDP adds a 4 B bucket copy when processes > 1), Adam's
  two moments (8 B), the frozen base's copy of them (4 B: erase/diffusion/adapter.py FrozenBase), the projection memory
  (4 B) and the applied-update check's copy (4 B);
* the text encoders in bf16 when they stay on the GPU (``robust`` runs use them during the repair; a plain run moves them
  and the VAE to the CPU once the prompts are encoded), the VAE, the cached prompt embeddings (bf16);
* activations with gradient checkpointing: the input of every block kept (tokens x width x 2 B) plus one block recomputed
  in full (about 20 such tensors: q, k, v, attention output, the 4x MLP in bf16, norms, residuals); attention itself
  through PyTorch's fused kernels keeps no tokens x tokens matrix. This part is an estimate, not a measurement.

    python benchmarks/memory_plan.py [--processes 8] [--json OUT]
    python benchmarks/memory_plan.py --fsdp [--processes 8]     # sharded (docs/accelerate/fsdp_bf16.yaml): 2, 4, 8 GPUs

Under FSDP (erase/core/sharding.py) the untrained weights are divided over the processes, the targeted ones and all
that goes with them stay whole on each (their gradients are averaged in place: no bucket copy), and each process holds
up to two blocks gathered whole at a time (the one running and the next, prefetched) in bf16.

The trim's peak (saliency accumulator + the top-k's one boolean of the largest tensor, before Adam's moments exist) is
below the repair's and is printed for completeness.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.architectures import FLOW_VAE, MMDIT  # noqa: E402
from benchmarks.inputs import check_counts, check_json_output  # noqa: E402
from erase.utils.files import atomic_write_json  # noqa: E402
from erase.utils.errors import cli_errors  # noqa: E402

GiB = 2**30


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def plan(name: str, processes: int = 1, batch: int = 1, resolution: int = 1024, prompts: int = 120, keep_text: bool = False,
         fsdp: bool = False) -> dict:
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from erase.core.targets import select_parameters
    from erase.diffusion.families import FAMILIES

    family_name, cls, cfg, texts, t5_tokens, clip_tokens = MMDIT[name]
    family = FAMILIES[family_name]
    with init_empty_weights():
        denoiser = getattr(diffusers, cls)(**cfg)
        encoders = [getattr(transformers, c)(getattr(transformers, c).config_class(**conf)) for c, conf in texts]
        vae = diffusers.AutoencoderKL(**FLOW_VAE)
    total = count(denoiser)
    targeted = sum(p.numel() for p in select_parameters(denoiser, "xattn", None, family.target_presets).values())
    text_params = sum(count(e) for e in encoders)
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    blocks = cfg["num_layers"] + cfg.get("num_single_layers", 0)
    img_tokens = (resolution // 8 // 2) ** 2  # 8x VAE, 2x2 patches (SD3's patch_size 2, Flux's packing)
    tokens = batch * (img_tokens + t5_tokens + clip_tokens)
    blocks_of = [m for m in denoiser.modules() if type(m).__name__ in set(denoiser._no_split_modules)]
    largest_block = max(count(m) for m in blocks_of)
    b = {
        "untrained weights (bf16)": (total - targeted) * 2 // (processes if fsdp else 1),
        **({"gathered blocks (bf16, two at a time)": 2 * largest_block * 2} if fsdp else {}),
        "targeted fp32 masters": targeted * 4,
        "gradients": targeted * 4 * (2 if processes > 1 and not fsdp else 1),
        "Adam moments": targeted * 8,
        "frozen base (targeted copy)": targeted * 4,
        "projection memory": targeted * 4,
        "applied-update check": targeted * 4,
        "text encoders (bf16)": text_params * 2 if keep_text else 0,
        "VAE (bf16)": count(vae) * 2 if keep_text else 0,
        "prompt embeddings (bf16)": prompts * (t5_tokens + clip_tokens + 1) * cfg["joint_attention_dim"] * 2,
        "activations (checkpointing, est.)": blocks * tokens * width * 2 + 20 * tokens * width * 2 * (4 if cls.startswith("Flux") else 3) // 3,
        "CUDA context and allocator slack (est.)": int(1.5 * GiB),
    }
    trim = (b["untrained weights (bf16)"] + b.get("gathered blocks (bf16, two at a time)", 0) + targeted * 4 * 2 + targeted // 8
            + b["text encoders (bf16)"] + b["VAE (bf16)"])
    return {"model": name, "family": family_name, "parameters": total, "targeted": targeted, "text_encoder_parameters": text_params,
            "processes": processes, "fsdp": fsdp, "batch": batch, "resolution": resolution, "text_on_gpu": keep_text,
            "bytes": b, "total_gib": sum(b.values()) / GiB, "trim_peak_gib": trim / GiB}


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=None,
                   help="GPUs (DDP: each holds everything above; >1 adds DDP's gradient buckets). Default 1; with --fsdp 2, 4 and 8.")
    p.add_argument("--fsdp", action="store_true", help="The sharded run (docs/accelerate/fsdp_bf16.yaml) instead of data parallelism.")
    p.add_argument("--json", default=None, help="Also write the figures here.")
    args = p.parse_args(argv)
    check_counts(args, processes=1)
    check_json_output("--json", args.json, _ours)  # never over a file this tool did not write
    counts = [args.processes] if args.processes else ([2, 4, 8] if args.fsdp else [1])
    rows = [plan(n, k, keep_text=keep, fsdp=args.fsdp) for n in MMDIT for keep in (False, True) for k in counts]
    print(f"| model | parameters | targeted (xattn = the token stream) | text on GPU | {'FSDP GPUs' if args.fsdp else 'GPUs'} "
          "| expected peak per GPU | trim peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e9:.2f} B | {r['targeted'] / 1e6:.0f} M | {'yes (robust)' if r['text_on_gpu'] else 'no'} "
              f"| {r['processes']} | {r['total_gib']:.1f} GiB | {r['trim_peak_gib']:.1f} GiB |")
    for r in rows[:1] + rows[-1:]:
        print(f"\n{r['model']} (text on GPU: {r['text_on_gpu']}, {r['processes']} {'FSDP ' if r['fsdp'] else ''}GPU(s)):")
        for k, v in r["bytes"].items():
            print(f"  {k:42s} {v / GiB:7.2f} GiB")
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


def _ours(old) -> bool:
    """Whether an existing --json file is a plan this tool wrote (a list of rows with a model and its total)."""
    return isinstance(old, list) and all(isinstance(r, dict) and {"model", "total_gib"} <= r.keys() for r in old)


if __name__ == "__main__":
    raise SystemExit(main())
