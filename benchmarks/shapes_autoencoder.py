"""Why the shapes model has a 2x autoencoder: held-out reconstruction error against steps for 2x and 4x ones.

    python benchmarks/shapes_autoencoder.py --channels 16,32 --channels 16,32,64 --steps 1500 --every 250

Each autoencoder is built as the shapes model builds it (eval.shapes.model.build_models) and trained as it is trained
(AdamW, cosine schedule over ``--steps``, sampled posterior, KL weight 1e-6) on the default training scenes minus
the last 256, which are the test set; prints the test MSE (images in [-1, 1]) and the CPU seconds every ``--every``
steps, and saves a strip of test images over their reconstructions to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erase.utils.errors import UserError, cli_errors  # noqa: E402


def check_args(args, base) -> list[tuple]:
    """Every check before the scenes are rendered: counts, --lr, --output_dir, and each --channels as the shapes model
    takes it (positive widths, a downsampling that divides the resolution, each set once); the widths per set."""
    from benchmarks.inputs import check_counts, check_folder_path
    from erase.utils.checks import check_numbers

    check_counts(args, steps=1, every=1, batch_size=1)
    check_numbers(args)  # --lr: finite and > 0 (erase.utils.checks.OPTION_RANGES)
    if args.output_dir is not None:
        check_folder_path("--output_dir", args.output_dir)
    widths = []
    for text in args.channels:
        try:
            channels = tuple(int(c) for c in text.split(","))
        except ValueError:
            raise UserError(f"--channels {text!r} is not comma-separated integers (widths, e.g. 16,32)") from None
        if min(channels) < 1:
            raise UserError(f"--channels {text!r}: every width must be >= 1")
        try:
            dataclasses.replace(base, vae_channels=channels)
        except ValueError as e:
            raise UserError(f"--channels {text!r}: {e}") from None
        if channels in widths:
            raise UserError(f"--channels {text!r} is given twice; each set of widths may appear once")
        widths.append(channels)
    return widths


@cli_errors
def main(argv=None) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from eval.shapes.model import ShapesModelConfig, build_models
    from eval.shapes.tokenizer import build_clip_tokenizer
    from eval.shapes.train import scene_images

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", action="append", required=True, help="autoencoder widths, e.g. 16,32 (2x) or 16,32,64 (4x)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--output_dir", default=None)
    args = p.parse_args(argv)
    base = ShapesModelConfig()
    check_args(args, base)
    torch.set_num_threads(1)
    _, images = scene_images(base.num_scenes, base.seed, base.resolution)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    train, test = images[:-256], images[-256:].float() / 127.5 - 1
    for widths in args.channels:
        cfg = dataclasses.replace(base, vae_channels=tuple(int(c) for c in widths.split(",")))
        vae = build_models(cfg, build_clip_tokenizer(cfg.max_length))[0]
        opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
        warm = max(1, args.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, warm=warm: min(1.0, (s + 1) / warm) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / args.steps))))
        gen = torch.Generator().manual_seed(0)
        start = time.process_time()
        for step in range(args.steps):
            x = train[torch.randint(0, len(train), (args.batch_size,), generator=gen)].float() / 127.5 - 1
            post = vae.encode(x).latent_dist
            loss = F.mse_loss(vae.decode(post.sample(generator=gen)).sample, x) + 1e-6 * post.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if (step + 1) % args.every == 0 or step + 1 == args.steps:
                with torch.no_grad():
                    rec = vae.decode(vae.encode(test).latent_dist.mean).sample
                print(f"{widths} ({2 ** (len(cfg.vae_channels) - 1)}x) step {step + 1}: test MSE "
                      f"{float((rec - test).pow(2).mean()):.4f}, {time.process_time() - start:.0f} CPU s", flush=True)
        if args.output_dir:
            strip = ((torch.cat([test[:24], rec[:24]], 2) + 1) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate(list(strip), 1)).save(Path(args.output_dir) / f"autoencoder-{widths}.png")


if __name__ == "__main__":
    main()
