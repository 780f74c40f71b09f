"""Seconds per training step of the default shapes model (issue 19: "trained on 2 CPU cores in <= 20 minutes"), by
torch thread count and precision, and the training time they imply.

Times the UNet + text-encoder step of ``eval.shapes train`` (``eval.digits.training.train_denoiser``'s work: forward,
noise-prediction loss, backward, gradient clipping, AdamW, the EMA update) and the autoencoder step, at the default
``ShapesModelConfig`` on random data (the step's cost does not depend on the data), each a median over ``--steps``
timed steps after two warm-up steps; ``bf16`` runs the forward under CPU autocast. Implied minutes = vae_steps x
autoencoder step + unet_steps x UNet step (rendering is cached, the rest is seconds). ``--denoisers sd3`` times the
same for ``eval.shapes train --denoiser sd3`` (the MMDiT with CLIP-L, CLIP-G and T5, its rectified-flow loss, the
16-channel autoencoder). Run it on a quiet machine:

    python benchmarks/shapes_train_step.py --threads 1,2 --precisions fp32,bf16 [--denoisers unet,sd3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def step_seconds(threads: int, precision: str, steps: int, denoiser: str = "unet") -> dict:
    import torch
    import torch.nn.functional as F

    from eval.digits.training import _ema_update
    from eval.shapes.model import ShapesModelConfig, build_flow_models, build_models
    from eval.shapes.tokenizer import build_clip_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ShapesModelConfig(denoiser=denoiser)
    tokenizer = build_clip_tokenizer(cfg.max_length)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    ids = torch.randint(0, 49408, (cfg.batch_size, cfg.max_length))
    side = cfg.resolution // 2 ** (len(cfg.vae_channels) - 1)
    if denoiser == "sd3":  # the SD3-kind MMDiT with CLIP-L, CLIP-G and T5: eval.shapes train --denoiser sd3's step
        from eval.digits.transformer import flow_loss

        vae, unet, encoders, t5_tokenizer = build_flow_models(cfg, tokenizer)
        t5_ids = torch.randint(0, len(t5_tokenizer), (cfg.batch_size, t5_tokenizer.model_max_length))
        flow = flow_loss(unet, encoders, ids, t5_ids, torch.Generator().manual_seed(0))
        rows = torch.arange(cfg.batch_size)

        def denoiser_loss():
            with autocast:
                return flow(z, rows).float()
    else:
        vae, unet, text_encoder = build_models(cfg, tokenizer)
        encoders = [text_encoder]

        def denoiser_loss():
            t = torch.randint(0, 1000, (cfg.batch_size,))
            with autocast:
                out = unet(z, t, text_encoder(ids)[0]).sample
            return F.mse_loss(out.float(), z)
    z = torch.randn(cfg.batch_size, unet.config.in_channels, side, side)
    modules = [unet] + encoders
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    emas = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]

    def unet_step():
        loss = denoiser_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for ema, m in zip(emas, modules):
            _ema_update(ema, m, cfg.ema_decay)

    x = torch.rand(cfg.vae_batch_size, 3, cfg.resolution, cfg.resolution) * 2 - 1
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def vae_step():
        with autocast:
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec.float(), x) + cfg.vae_kl_weight * post.kl().mean()
        vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        vae_opt.step()

    out = {}
    for name, fn in (("unet_step_s", unet_step), ("vae_step_s", vae_step)):
        for _ in range(2):
            fn()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    out["implied_train_minutes"] = (cfg.vae_steps * out["vae_step_s"] + cfg.unet_steps * out["unet_step_s"]) / 60
    out.update(threads=threads, precision=precision, denoiser=denoiser, unet_steps=cfg.unet_steps, vae_steps=cfg.vae_steps,
               batch_size=cfg.batch_size, fingerprint=cfg.fingerprint(),
               trained_parameters=sum(p.numel() for p in params), vae_parameters=sum(p.numel() for p in vae.parameters()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (CPU autocast)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (median)")
    p.add_argument("--denoisers", default="unet", help="comma-separated: unet (the default model), sd3 (--denoiser sd3)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args(argv)
    rows = []
    for denoiser in a.denoisers.split(","):
        if denoiser not in ("unet", "sd3"):
            p.error(f"--denoisers {denoiser!r}: choose unet or sd3")
        for threads in [int(t) for t in a.threads.split(",")]:
            for precision in a.precisions.split(","):
                if precision not in ("fp32", "bf16"):
                    p.error(f"--precisions {precision!r}: choose fp32 or bf16")
                r = step_seconds(threads, precision, a.steps, denoiser)
                rows.append(r)
                print(f"{denoiser}, threads {threads} {precision}: denoiser step {r['unet_step_s']:.3f} s, autoencoder step "
                      f"{r['vae_step_s']:.3f} s, implied training {r['implied_train_minutes']:.1f} min", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
