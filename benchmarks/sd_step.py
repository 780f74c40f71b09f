#!/usr/bin/env python
"""Seconds and peak memory per Scissorhands repair step on a Stable Diffusion UNet (random weights, no hub).

Modes:
  ratio  (CPU): a mid-size UNet (``--unet sd14``: the SD v1.4 architecture); one Scissorhands step through the real
         engine (``erase.core.run`` with the diffusion adapter: memory refresh, retain + forget forwards, one
         backward, GEM projection, optimizer step, check of the applied step) against the bare passes that step
         needs written in plain PyTorch (same forwards / backwards / optimizer step, no adapter, no projection).
         Target: ratio <= 1.10.
  trim   (CPU): peak RSS of Scissorhands' trim (SNIP saliency + top-k + re-initialisation) on the full SD v1.4
         UNet architecture, ``--targets full``, vs the parameter bytes. Target: <= 3.2x. Small latents (8x8)
         keep the activations small; peak RSS is sampled every 2 ms by a thread.
  cuda   (GPU): the SD v1.4 UNet at 512 px (64x64 latents), bf16, batch 8 and 16: s/step and peak GPU memory
         of the repair step (target: a default nudity erasure in <= 5 min, <= 24 GB on one H100).

  python benchmarks/sd_step.py --mode ratio [--unet sd14] [--clock cpu]
  python benchmarks/sd_step.py --mode trim
  python benchmarks/sd_step.py --mode cuda --batch_sizes 8 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.inputs import check_counts, check_json_output, has_keys  # noqa: E402
from erase.utils.files import atomic_write_json  # noqa: E402
from erase.utils.errors import UserError, cli_errors  # noqa: E402

# UNet2DConditionModel config of CompVis/stable-diffusion-v1-4 (unet/config.json), written out.
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# A mid-size UNet of the same shape (about 1/10 of the SD v1.4 widths) for CPU step timings.
MID_UNET = dict(SD14_UNET, sample_size=16, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
                cross_attention_dim=128, attention_head_dim=4)


def build_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


def build_adapter(unet, latent: int, batch: int, n: int = 16, seq: int = 77, device="cpu", dtype=torch.float32):
    """A DiffusionAdapter over random latents and random prompt embeddings (SD's DDPM schedule)."""
    from diffusers import DDPMScheduler

    from erase.diffusion.adapter import DiffusionAdapter, LatentSet, PromptEmbeddings

    g = torch.Generator().manual_seed(1)
    dim = unet.config.cross_attention_dim

    def latents(prompts: int):  # prompt index: a retain image's prompt row, a forget image's group (one group here)
        return LatentSet(torch.randn(n, 4, latent, latent, generator=g), 0.05 * torch.ones(n, 4, latent, latent),
                         torch.randint(0, prompts, (n,), generator=g))

    emb = PromptEmbeddings(forget=torch.randn(4, seq, dim, generator=g).to(device, dtype), retain=torch.randn(4, seq, dim, generator=g).to(device, dtype),
                           anchor=torch.randn(1, seq, dim, generator=g).to(device, dtype), uncond=torch.randn(1, seq, dim, generator=g).to(device, dtype))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return DiffusionAdapter(unet, sched, emb, latents(1), latents(4), batch_size=batch, device=device, weight_dtype=dtype)


class PeakRSS:
    """Peak resident set size (bytes) of this process, sampled by a thread."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = self.now()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.now())


def engine_steps(unet, args, device="cpu", mixed_precision="no") -> tuple[list[float], float]:
    """Per-step seconds of Scissorhands through the real engine (time between consecutive steps) and peak GPU bytes."""
    from erase.core import EngineConfig, build_method, run
    from erase.core.engine import make_accelerator

    adapter = build_adapter(unet, args.latent, args.batch, device=device,
                            dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32))
    method = build_method("scissorhands", "diffusion", topk=args.topk, saliency_batches=1)
    stamps: list[float] = []
    inner, clock = method.before_step, CLOCKS[getattr(args, "clock", "wall")]

    def stamped(ctx, model, step):
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(clock())
        return inner(ctx, model, step)

    method.before_step = stamped
    config = EngineConfig(output_dir=args.tmp, targets=args.targets, max_train_steps=args.warmup + args.steps + 1, lr=1e-5,
                          train_batch_size=args.batch, mixed_precision=mixed_precision, log_every=10**9, progress=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(adapter, method, config, accelerator=make_accelerator(config))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    diffs = [b - a for a, b in zip(stamps, stamps[1:])]
    return diffs[args.warmup:], peak


def bare_steps(unet, args, lam: float = 1.0) -> list[float]:
    """The passes of one Scissorhands repair step in plain PyTorch: memory fwd+bwd, retain + forget fwd, one bwd, Adam."""
    from erase.core import select_parameters
    from erase.diffusion.adapter import TARGET_PRESETS

    params = select_parameters(unet, args.targets, presets=TARGET_PRESETS)
    unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=1e-5)
    g = torch.Generator().manual_seed(2)
    dim = unet.config.cross_attention_dim

    def batch():
        return (torch.randn(args.batch, 4, args.latent, args.latent, generator=g), torch.randint(0, 1000, (args.batch,), generator=g),
                torch.randn(args.batch, 77, dim, generator=g), torch.randn(args.batch, 4, args.latent, args.latent, generator=g))

    def mse(b):
        return F.mse_loss(unet(b[0], b[1], encoder_hidden_states=b[2], return_dict=False)[0], b[3])

    times, clock = [], CLOCKS[args.clock]
    for step in range(args.warmup + args.steps):
        mem, ret, fgt = batch(), batch(), batch()
        t0 = clock()
        (-mse(mem)).backward()
        for p in params.values():
            p.grad = None
        loss = mse(ret) - lam * mse(fgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(clock() - t0)
    return times[args.warmup:]


UNETS = {"mid": (MID_UNET, "mid (block_out_channels 32,64,128,128; cross_attention_dim 128)"),
         "sd14": (SD14_UNET, "SD v1.4 architecture, random weights")}


def mode_ratio(args) -> dict:
    """Interleaved repeats, each on a freshly built UNet; the figures are the ratio of the medians and of the fastest
    steps (the least disturbed by other load)."""
    import gc

    torch.set_num_threads(args.threads)
    config, name = UNETS[args.unet]
    bare_all, eng_all = [], []
    for r in range(args.repeats):
        for kind in ("bare", "engine"):
            unet = build_unet(config)
            steps = bare_steps(unet, args) if kind == "bare" else engine_steps(unet, args)[0]
            (bare_all if kind == "bare" else eng_all).extend(steps)
            del unet
            gc.collect()  # one UNet at a time (the SD v1.4 one is 3.4 GB in float32)
        print(json.dumps({"repeat": r, "bare_s": statistics.median(bare_all), "scissorhands_s": statistics.median(eng_all)}), flush=True)
    n = sum(p.numel() for p in build_unet(config).parameters())
    return {"mode": "ratio", "unet": name, "unet_parameters": n,
            "latent": args.latent, "batch": args.batch, "targets": args.targets, "threads": args.threads, "clock": args.clock,
            "steps_per_repeat": args.steps, "repeats": args.repeats,
            "bare_s_per_step": {"min": min(bare_all), "median": statistics.median(bare_all)},
            "scissorhands_s_per_step": {"min": min(eng_all), "median": statistics.median(eng_all)},
            "ratio": min(eng_all) / min(bare_all), "ratio_of_medians": statistics.median(eng_all) / statistics.median(bare_all),
            "overhead_ms": overhead_ms(args) if args.unet == "mid" else None}


def overhead_ms(args) -> dict:
    """What a Scissorhands step adds to the bare passes, timed alone: keyed batch draws (3 per step) and the projection."""
    from erase.core import select_parameters
    from erase.core.projection import project_
    from erase.diffusion.adapter import TARGET_PRESETS

    unet = build_unet(MID_UNET)
    adapter = build_adapter(unet, args.latent, args.batch)
    stream = adapter.forget_stream(0)
    t0 = time.perf_counter()
    for _ in range(30):
        adapter._noisy(next(stream), "loss")
    draws = (time.perf_counter() - t0) / 30 * 3e3
    params = select_parameters(unet, args.targets, presets=TARGET_PRESETS)
    g = [torch.randn_like(p) for p in params.values()]
    mem = [[-x.clone() for x in g]]
    t0 = time.perf_counter()
    for _ in range(30):
        project_([x.clone() for x in g], mem)
    proj = (time.perf_counter() - t0) / 30 * 1e3
    return {"batch_draws_per_step": draws, "projection_per_step": proj}


def mode_trim(args) -> dict:
    from accelerate import Accelerator

    from erase.core import EngineConfig, build_method, select_parameters
    from erase.core.engine import RunContext
    from erase.diffusion.adapter import TARGET_PRESETS

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    unet = build_unet(SD14_UNET)
    build_s = time.perf_counter() - t0
    adapter = build_adapter(unet, args.latent, args.batch)
    params = select_parameters(unet, args.targets, presets=TARGET_PRESETS)
    unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    param_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    target_bytes = sum(p.numel() * p.element_size() for p in params.values())
    acc = Accelerator(cpu=True)
    ctx = RunContext(adapter=adapter, accelerator=acc, config=EngineConfig(output_dir=args.tmp, seed=0), params=params,
                     forget=None, retain=None, memory=None, saliency=adapter.forget_stream(3), model=unet)
    method = build_method("scissorhands", "diffusion", topk=args.topk, saliency_batches=args.saliency_batches)
    import gc

    gc.collect()
    before = PeakRSS.now()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        info = method.prepare(ctx)
        trim_s = time.perf_counter() - t0
    return {"mode": "trim", "unet": "SD v1.4 architecture, random weights", "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "targets": args.targets, "latent": args.latent, "batch": args.batch, "saliency_batches": args.saliency_batches, "topk": args.topk,
            "param_bytes": param_bytes, "target_bytes": target_bytes, "rss_before_trim": before, "peak_rss_during_trim": peak.peak,
            "peak_rss_over_param_bytes": peak.peak / param_bytes, "trim_increment_over_param_bytes": (peak.peak - before) / param_bytes,
            "trim_seconds": trim_s, "build_seconds": build_s, "reset": info["trim"]["summary"]["reset"], "threads": args.threads}


def mode_cuda(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("error: --mode cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    rows = []
    for batch in args.batch_sizes:
        unet = build_unet(SD14_UNET).to("cuda")
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        a = argparse.Namespace(**{**vars(args), "batch": batch, "latent": 64})
        steps, peak = engine_steps(unet, a, device="cuda", mixed_precision="bf16")
        rows.append({"batch": batch, "s_per_step": statistics.median(steps), "peak_gpu_bytes": peak,
                     "peak_gpu_gib": peak / 2**30, "device": torch.cuda.get_device_name()})
        print(json.dumps(rows[-1]), flush=True)
        del unet
        torch.cuda.empty_cache()
    return {"mode": "cuda", "resolution": 512, "mixed_precision": "bf16", "targets": args.targets, "rows": rows}


@cli_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("ratio", "trim", "cuda"), default="ratio")
    p.add_argument("--targets", default=None, help="Target preset (default: xattn for ratio/cuda, full for trim).")
    p.add_argument("--latent", type=int, default=None, help="Latent size (default: 16 for ratio, 8 for trim).")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--topk", type=float, default=10.0)
    p.add_argument("--saliency_batches", type=int, default=1)
    p.add_argument("--unet", choices=tuple(UNETS), default="mid", help="ratio mode: the mid-size UNet or the SD v1.4 architecture.")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="ratio mode: wall time, or this process's CPU time "
                   "(with one thread, what other jobs on a shared machine disturb least).")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: on a shared machine more threads oversubscribe).")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--tmp", default="/tmp/sd_step_bench")
    p.add_argument("--json", default=None, help="Also write the result here.")
    args = p.parse_args(argv)
    from erase.utils.checks import check_numbers

    check_numbers(args)  # --topk in (0, 100], finite (erase.utils.checks.OPTION_RANGES)
    check_counts(args, batch=1, batch_sizes=1, steps=1, warmup=0, repeats=1, saliency_batches=1, threads=1)
    if args.latent is not None and (args.latent < 8 or args.latent % 8):
        raise UserError(f"--latent {args.latent} is not allowed: give a positive multiple of 8 (the UNet halves it three times)")
    if args.targets is not None:
        import re

        from erase.diffusion.adapter import TARGET_PRESETS

        try:
            args.targets in TARGET_PRESETS or re.compile(args.targets)
        except re.error as e:
            raise UserError(f"--targets {args.targets!r} is neither a preset ({', '.join(TARGET_PRESETS)}) nor a valid regex: {e}") from None
    check_json_output("--json", args.json, has_keys("mode", "command"))  # never over a file this tool did not write
    args.targets = args.targets or ("full" if args.mode == "trim" else "xattn")
    args.latent = args.latent or (8 if args.mode == "trim" else 16)
    import logging

    logging.disable(logging.WARNING)
    result = {"ratio": mode_ratio, "trim": mode_trim, "cuda": mode_cuda}[args.mode](args)
    result.update(torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv))
    print(json.dumps(result, indent=1))
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
