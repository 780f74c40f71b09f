"""Seconds per training step of the default shapes model (issue 19: "trained on 2 CPU cores in <= 20 minutes"), by
torch thread count and precision, and the training time they imply.

Times the UNet + text-encoder step of ``eval.shapes train`` (``eval.digits.training.train_denoiser``'s work: forward,
noise-prediction loss, backward, gradient clipping, AdamW, the EMA update) and the autoencoder step, at the default
``ShapesModelConfig`` on random data (the step's cost does not depend on the data), each a median over ``--steps``
timed steps after two warm-up steps; ``bf16`` runs the forward under CPU autocast. Implied minutes = vae_steps x
autoencoder step + unet_steps x UNet step (rendering is cached, the rest is seconds). ``--denoisers sd3`` times the
same for ``eval.shapes train --denoiser sd3`` (the MMDiT with CLIP-L, CLIP-G and T5, its rectified-flow loss, the
16-channel autoencoder). ``--loop`` also times the training loop itself (``train_denoiser`` with its batch drawing and
noising, on random latents) beside that replica of its step; ``--trained MODEL`` instead times the loss and backward
of a trained shapes model on its own scenes and captions, with denormal floats kept and flushed to zero (a cost that
random weights never show). Run it on a quiet machine:

    python benchmarks/shapes_train_step.py --threads 1,2 --precisions fp32,bf16 [--denoisers unet,sd3] [--loop] [--json FILE]
    python benchmarks/shapes_train_step.py --threads 2 --trained $ERASE_CACHE/shapes/model-<hash> [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inputs import check_counts, check_json_output, name_list  # noqa: E402
from erase.utils.checks import check_int_list  # noqa: E402
from erase.utils.errors import UserError, cli_errors  # noqa: E402


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


class _StepClock:
    """A progress bar for :func:`eval.digits.training.train_denoiser` that keeps the time of every finished step."""

    def __init__(self):
        self.times: list[float] = []

    def update(self, n: int = 1) -> None:
        self.times.append(time.perf_counter())

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def loop_seconds(threads: int, steps: int, denoiser: str = "unet", warmup: int = 3) -> float:
    """Median seconds of a denoiser step of the training loop itself (``train_denoiser``, the code ``eval.shapes train``
    runs: batch drawing, loss, backward, clipping, the optimizer, the EMA) at the default settings on random latents."""
    import torch

    from eval.digits.training import train_denoiser
    from eval.shapes.model import ShapesModelConfig, build_flow_models, build_models
    from eval.shapes.tokenizer import build_clip_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ShapesModelConfig(denoiser=denoiser, unet_steps=warmup + steps + 1)
    tokenizer = build_clip_tokenizer(cfg.max_length)
    gen = torch.Generator().manual_seed(0)
    rows_n = 512
    ids = torch.randint(0, len(tokenizer), (rows_n, cfg.max_length))
    loss_fn = None
    if denoiser == "sd3":
        from eval.digits.transformer import flow_loss

        vae, unet, encoders, t5_tokenizer = build_flow_models(cfg, tokenizer)
        t5_ids = torch.randint(0, len(t5_tokenizer), (rows_n, t5_tokenizer.model_max_length))
        loss_fn = flow_loss(unet, encoders, ids, t5_ids, gen)
    else:
        vae, unet, text_encoder = build_models(cfg, tokenizer)
        encoders = [text_encoder]
    mean = torch.randn(2048, unet.config.in_channels, cfg.latent_size, cfg.latent_size)
    clock = _StepClock()
    train_denoiser(unet, encoders, ids, (mean, torch.full_like(mean, 0.1), 1.0), lambda idx: idx % (rows_n - 1), rows_n - 1,
                   cfg, gen, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), clock, loss_fn=loss_fn)
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])][warmup:]
    return statistics.median(gaps)


def trained_seconds(model: str, threads: int, steps: int, warmup: int = 2) -> dict:
    """Median seconds of the denoiser's loss + backward (text encoders included) of a **trained** shapes model (UNet or
    SD3 kind) on the first 64 training scenes and one caption each, with denormal floats kept (the training's
    arithmetic) and flushed to zero (``torch.set_flush_denormal``): random weights on random data, as the replica and
    the loop time them, never make denormals; a trained model's activations and gradients can."""
    import numpy as np
    import torch

    from erase.diffusion.generate import family_sampler, load_pipeline
    from eval.shapes import world
    from eval.shapes.model import read_model_card
    from eval.shapes.train import scene_images

    torch.set_num_threads(threads)
    card = read_model_card(model)  # a folder this tool did not write: its card is checked before use
    c = card.get("config") if card else None
    if not isinstance(c, dict) or not all(isinstance(c.get(k), int) for k in ("num_scenes", "seed", "resolution")):
        raise UserError(f"--trained {model!r}: not a shapes model folder (no shapes_model.json with its config)")
    scenes, images = scene_images(c["num_scenes"], c["seed"], c["resolution"])
    x = torch.from_numpy(np.array(images[:64])).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = [world.captions(s, "train")[0] for s in scenes[:64]]
    pipe = load_pipeline(model, family_sampler(model))
    vae, gen = pipe.vae, torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    if card.get("denoiser") == "sd3":
        from eval.digits.transformer import flow_loss, token_ids

        encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
        denoiser, loss = pipe.transformer, flow_loss(pipe.transformer, encoders, *token_ids(pipe.tokenizer, pipe.tokenizer_3, captions), gen)
    else:
        from eval.digits.training import noise_loss

        encoders, denoiser = [pipe.text_encoder], pipe.unet
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        loss = noise_loss(denoiser, encoders[0], ids, gen)
    modules = [denoiser] + encoders
    for m in modules:
        m.train().requires_grad_(True)
    rows = torch.arange(len(z))
    out = {"model": Path(model).name, "denoiser": card.get("denoiser", "unet"), "threads": threads}
    for flush in (False, True, False, True):
        torch.set_flush_denormal(flush)
        times = []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            loss(z, rows).backward()
            times.append(time.perf_counter() - start)
            for m in modules:
                m.zero_grad(set_to_none=True)
        out.setdefault("flushed_s" if flush else "kept_s", []).append(statistics.median(times[warmup:]))
    torch.set_flush_denormal(False)
    return out


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (CPU autocast)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (median)")
    p.add_argument("--denoisers", default="unet", help="comma-separated: unet (the default model), sd3 (--denoiser sd3)")
    p.add_argument("--loop", action="store_true", help="also time the training loop itself (train_denoiser), fp32 only")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--trained", default=None, help="instead: time loss + backward of this trained shapes model on its "
                   "own scenes, denormals kept and flushed (two rounds each)")
    a = p.parse_args(argv)
    threads_list = check_int_list("--threads", a.threads, lo=1, hi=1024)  # every value checked before the first step
    precisions = name_list("--precisions", a.precisions, ("fp32", "bf16"), what="precision")
    denoisers = name_list("--denoisers", a.denoisers, ("unet", "sd3"), what="denoiser")
    check_counts(a, steps=1)
    check_json_output("--json", a.json, _ours)  # never over a file this tool did not write
    rows = []
    if a.trained:
        for threads in threads_list:
            r = trained_seconds(a.trained, threads, a.steps)
            rows.append(r)
            print(f"{r['denoiser']} model {r['model']}, threads {threads}: loss + backward {' / '.join(f'{v:.3f}' for v in r['kept_s'])} s "
                  f"with denormals, {' / '.join(f'{v:.3f}' for v in r['flushed_s'])} s flushed", flush=True)
    for denoiser in denoisers if not a.trained else ():
        for threads in threads_list:
            for precision in precisions:
                r = step_seconds(threads, precision, a.steps, denoiser)
                rows.append(r)
                print(f"{denoiser}, threads {threads} {precision}: denoiser step {r['unet_step_s']:.3f} s, autoencoder step "
                      f"{r['vae_step_s']:.3f} s, implied training {r['implied_train_minutes']:.1f} min", flush=True)
                if a.loop and precision == "fp32":
                    r["loop_step_s"] = loop_seconds(threads, a.steps, denoiser)
                    r["loop_implied_train_minutes"] = (r["vae_steps"] * r["vae_step_s"] + r["unet_steps"] * r["loop_step_s"]) / 60
                    print(f"{denoiser}, threads {threads} {precision}: the training loop's step {r['loop_step_s']:.3f} s "
                          f"({r['loop_step_s'] / r['unet_step_s']:.2f} x the replica's), implied training "
                          f"{r['loop_implied_train_minutes']:.1f} min", flush=True)
    if a.json:
        from erase.utils.files import atomic_write_json

        atomic_write_json(a.json, rows)
    return 0


def _ours(old) -> bool:
    """Whether an existing ``--json`` file's JSON is a rows file this tool wrote (a list of rows with their thread
    count; the only kind ``--json`` replaces)."""
    return isinstance(old, list) and all(isinstance(r, dict) and "threads" in r for r in old)


if __name__ == "__main__":
    sys.exit(main())
