"""The attacks' cost per unit of work against the bare UNet passes that work needs (issue 21), and the cost of the
``unlearndiffatk-nudity`` protocol at the reference budget.

    OMP_NUM_THREADS=2 python benchmarks/attack_cost.py --output_dir /tmp/attack_cost [--parts digits,sd,cce]

Units, timed through the attacks' own code (nothing re-implemented):
  uda  one unlearndiffatk iteration of all restarts of a prompt (``eval.attack.utils.prefix_search.PrefixSearch.step``:
       projection, text encoder forward + backward with the token override, one UNet forward + backward, optimiser
       step) against the bare pass it needs: one UNet forward + backward at the same batch with the conditioning
       requiring grad (text encoder, projection and optimiser excluded). Restarts 1 and 4.
  inv  one concept-inversion step (``eval.attack.inversion.TokenInversion.step``) against one bare UNet forward +
       backward at its batch.
Each (unit, bare) pair runs interleaved ``--reps`` times after one warm-up each; the ratio is of medians. Target:
<= 1.5.

Parts:
  digits  the default digits model (``eval.digits.model.default_model_dir``), 8x8 latents, restarts 1 and 4, inversion
          batch 4.
  sd      the SD v1.4 UNet architecture (``benchmarks/sd_step.SD14_UNET``, 859.5 M parameters, random weights) and a
          CLIP ViT-L/14 text tower (123 M, random), ``--sd_latent`` x ``--sd_latent`` latents, restarts 1, inversion
          batch 1.
  cce     concept inversion's ``cce`` budget on the digits CPU: the seconds of ``--cce_steps`` steps at batch 16,
          extrapolated to 5000 steps, plus its 7 checks of 40 images.

Always: the ``unlearndiffatk-nudity`` protocol at the reference budget counted in UNet passes (batch-1 image
forwards, guidance counted as two; forward + backward as ``--fwd_bwd_factor`` forwards, measured on the SD
architecture when the ``sd`` part runs), and in GPU-hours at ``--gpu_forward_s`` seconds per pass (an estimate
given on the command line, not a measurement, until benchmarks/gpu.sh has run on a GPU).

Writes OUTPUT_DIR/attack_cost.json and prints the rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.inputs import check_counts, check_json_output, check_number, check_folder_path, has_keys, name_list  # noqa: E402
from erase.utils.files import atomic_write_json  # noqa: E402
from erase.utils.errors import UserError, cli_errors  # noqa: E402

PARTS = ("digits", "sd", "cce")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="folder for attack_cost.json")
    p.add_argument("--parts", default="digits,sd,cce", help="comma-separated: digits, sd, cce")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each unit and its bare pass (digits)")
    p.add_argument("--sd_reps", type=int, default=3, help="timed repetitions on the SD architecture")
    p.add_argument("--sd_latent", type=int, default=64, help="latent size on the SD architecture (64 = 512 px)")
    p.add_argument("--cce_steps", type=int, default=20, help="timed cce steps on the digits model")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--gpu_forward_s", type=float, default=0.03,
                   help="assumed seconds of one batch-1 fp32 SD v1.4 UNet forward at 512 px on an H100 (estimate)")
    p.add_argument("--fwd_bwd_factor", type=float, default=3.0,
                   help="forward + backward in forwards, when the sd part does not measure it")
    a = p.parse_args(argv)
    a.part_list = name_list("--parts", a.parts, PARTS, what="part")  # every check before the folder or a timing
    check_counts(a, reps=1, sd_reps=1, cce_steps=1, threads=1)
    if a.sd_latent < 8 or a.sd_latent % 8:
        raise UserError(f"--sd_latent {a.sd_latent} is not allowed: give a positive multiple of 8 (the UNet halves it three times)")
    check_number("--gpu_forward_s", a.gpu_forward_s)  # > 0 (these two have no range in OPTION_RANGES)
    check_number("--fwd_bwd_factor", a.fwd_bwd_factor)
    check_folder_path("--output_dir", a.output_dir)
    check_json_output("--output_dir", Path(a.output_dir) / "attack_cost.json", has_keys("machine", "load_average_start"))
    return a


def paired(unit, bare, reps: int) -> dict:
    """Interleaved timings of ``unit()`` and ``bare()`` (one warm-up each); medians and their ratio."""
    unit(), bare()
    u, b = [], []
    for _ in range(reps):
        t = time.perf_counter()
        unit()
        u.append(time.perf_counter() - t)
        t = time.perf_counter()
        bare()
        b.append(time.perf_counter() - t)
    mu, mb = statistics.median(u), statistics.median(b)
    return {"unit_s": [round(x, 4) for x in u], "bare_s": [round(x, 4) for x in b], "unit_median_s": round(mu, 4),
            "bare_median_s": round(mb, 4), "ratio": round(mu / mb, 3)}


def bare_pass(unet, x, t, cond):
    """One UNet forward + backward to the conditioning: the pass an attack step cannot do without."""
    def run():
        c = cond.detach().requires_grad_(True)
        unet(x, t, c).sample.float().pow(2).mean().backward()
    return run


def measure(unet, enc, sched, cand, cand_ids, ids, x0, restarts_list, inv_batch, reps) -> dict:
    import torch

    from eval.attack.inversion import TokenInversion, caption_encoder
    from eval.attack.utils.losses import Denoising
    from eval.attack.utils.prefix_search import OptimizerSpec, PrefixSearch, one_encoder

    out = {}
    unet.requires_grad_(False).eval()
    enc.requires_grad_(False).eval()
    with torch.no_grad():
        cond1 = enc(ids)[0].float()
    for R in restarts_list:
        search = PrefixSearch(unet, Denoising.sd1(sched), one_encoder(enc, ids, 5), [cand], cand_ids, x0,
                              torch.randint(0, len(cand_ids), (R, 5)), list(range(R)), OptimizerSpec("adam", 0.01, 0.1))
        rows = list(range(R))
        x = sched.add_noise(x0.expand(R, -1, -1, -1), torch.randn(R, *x0.shape[1:]), torch.full((R,), 500))
        out[f"uda_restarts{R}"] = paired(lambda: search.step(500, rows), bare_pass(unet, x, torch.full((R,), 500),
                                                                                   cond1.expand(R, -1, -1)), reps)
    n = max(inv_batch, 2)
    mean, std = x0.expand(n, -1, -1, -1).clone(), torch.full((n, *x0.shape[1:]), 0.1)
    new_id = int(cand_ids[0])
    caption = ids.clone()
    caption[0, 2] = new_id
    inv = TokenInversion(unet, Denoising.sd1(sched, 1.0), caption_encoder(enc, new_id, caption.expand(n, -1)), [cand[0]],
                         mean, std, OptimizerSpec("adam", 5e-3, 0.0))
    gen = torch.Generator().manual_seed(0)
    idx = list(range(inv_batch))
    x = sched.add_noise(mean[idx], torch.randn(inv_batch, *x0.shape[1:]), torch.full((inv_batch,), 500))
    out[f"inversion_batch{inv_batch}"] = paired(lambda: inv.step(idx, gen), bare_pass(
        unet, x, torch.full((inv_batch,), 500), cond1.expand(inv_batch, -1, -1)), reps)
    return out


def digits_part(args) -> dict:
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from eval.attack.utils.tokens import build_ids, content_ids, typable_tokens
    from eval.digits.model import default_model_dir

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model_dir()), safety_checker=None)
    tok, enc = pipe.tokenizer, pipe.text_encoder
    cand_ids, _ = typable_tokens(tok)
    cand = enc.get_input_embeddings().weight.detach()[torch.tensor(cand_ids)].clone()
    ids = torch.tensor([build_ids(tok, [tok.bos_token_id] * 5, content_ids(tok, "a handwritten digit seven"))[0]])
    s = pipe.unet.config.sample_size
    x0 = torch.randn(1, pipe.unet.config.in_channels, s, s)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    out = measure(pipe.unet, enc, sched, cand, cand_ids, ids, x0, (1, 4), 4, args.reps)
    out["params"] = {"unet": sum(p.numel() for p in pipe.unet.parameters()),
                     "text_encoder": sum(p.numel() for p in enc.parameters())}
    return out


def sd_part(args) -> dict:
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.sd_step import SD14_UNET, build_unet

    unet = build_unet(SD14_UNET)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    cand_ids = list(range(1000, 41000))  # about the size of CLIP's typable one-token vocabulary
    cand = enc.get_input_embeddings().weight.detach()[torch.tensor(cand_ids)].clone()
    ids = torch.tensor([[49406] * 6 + list(range(2000, 2012)) + [49407] * (77 - 18)])
    x0 = torch.randn(1, 4, args.sd_latent, args.sd_latent)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    out = measure(unet, enc, sched, cand, cand_ids, ids, x0, (1,), 1, args.sd_reps)
    with torch.no_grad():  # one bare forward, for the forward + backward / forward factor
        cond = enc(ids)[0]
        t = time.perf_counter()
        unet(x0, torch.tensor([500]), cond)
        out["forward_s"] = round(time.perf_counter() - t, 4)
    out["fwd_bwd_over_fwd"] = round(out["uda_restarts1"]["bare_median_s"] / out["forward_s"], 3)
    out["params"] = {"unet": sum(p.numel() for p in unet.parameters()), "text_encoder": sum(p.numel() for p in enc.parameters())}
    out["latent"] = args.sd_latent
    return out


def cce_part(args) -> dict:
    """Seconds per cce step (batch 16, AdamW) on the digits model, extrapolated to the 5000-step budget."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from eval.attack.inversion import BUDGETS, TokenInversion, caption_encoder
    from eval.attack.utils.losses import Denoising
    from eval.attack.utils.prefix_search import OptimizerSpec
    from eval.digits.model import default_model_dir

    b = BUDGETS["cce"]
    pipe = StableDiffusionPipeline.from_pretrained(str(default_model_dir()), safety_checker=None)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    tok, enc = pipe.tokenizer, pipe.text_encoder
    n, s = b["num_target_images"], pipe.unet.config.sample_size
    ids = tok(["a handwritten digit image"] * n, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    token_id = int(ids[0, 4])
    inv = TokenInversion(pipe.unet, Denoising.sd1(DDPMScheduler.from_config(pipe.scheduler.config), 1.0),
                         caption_encoder(enc, token_id, ids), [enc.get_input_embeddings().weight[token_id].detach()],
                         torch.randn(n, 4, s, s), torch.full((n, 4, s, s), 0.1),
                         OptimizerSpec(b["optimizer"], b["inversion_lr"], b["weight_decay"]))
    gen = torch.Generator().manual_seed(0)
    idx = list(range(b["inversion_batch_size"]))
    inv.step(idx, gen)
    t = time.perf_counter()
    for _ in range(args.cce_steps):
        inv.step(idx, gen)
    per_step = (time.perf_counter() - t) / args.cce_steps
    from eval.attack.utils.checks import draw

    t = time.perf_counter()
    draw(pipe, ["a handwritten digit seven"] * 40, list(range(40)), 20, 4.0, s * pipe.vae_scale_factor, 100)
    check = time.perf_counter() - t
    checks = len(b["eval_steps"])
    total = per_step * max(b["eval_steps"]) + check * checks
    return {"budget": {k: list(v) if isinstance(v, tuple) else v for k, v in b.items()}, "timed_steps": args.cce_steps,
            "step_s": round(per_step, 4), "check_s": round(check, 2), "checks": checks,
            "per_seed_s": round(total, 1), "per_seed_min": round(total / 60, 1),
            "formula": "per seed = step_s x 5000 + check_s x checks (40 images, DDIM 20 steps each)"}


def protocol_cost(args, sd: dict | None) -> dict:
    """UNet passes of the unlearndiffatk-nudity protocol at the reference budget (docs/ATTACK.md: 142 prompts, 24 over
    the 60-token limit, 1 restart, 50 blocks x 40 iterations, a check after every block, 40 random tries, LMS 50 steps
    with guidance, target images at 25 steps), worst case (no prompt ever succeeds, so every check and try runs)."""
    prompts, dropped, steps, target_steps = 142, 24, 50, 25
    blocks, iterations, random_tries = 50, 40, 40
    image = 2 * steps  # one judged image: 50 steps, conditional + unconditional
    per_kept = {"optimisation (forward + backward)": blocks * iterations, "checks after each block": blocks * image,
                "controls: stripped prompt and prefix alone, attacked and base": 4 * image,
                "random control": random_tries * image}
    per_all = {"target image (25 steps)": 2 * target_steps, "pre: attacked and base": 2 * image}
    factor = sd["fwd_bwd_over_fwd"] if sd and "fwd_bwd_over_fwd" in sd else args.fwd_bwd_factor
    kept = prompts - dropped
    fwd_bwd = kept * per_kept["optimisation (forward + backward)"]
    forwards = kept * sum(v for k, v in per_kept.items() if "forward + backward" not in k) + prompts * sum(per_all.values())
    equivalent = forwards + factor * fwd_bwd
    return {"prompts": prompts, "attacked": kept, "per_attacked_prompt": per_kept, "per_prompt": per_all,
            "forward_backward_passes": fwd_bwd, "forward_passes": forwards, "fwd_bwd_factor": factor,
            "forward_equivalents": round(equivalent), "gpu_forward_s_assumed": args.gpu_forward_s,
            "gpu_hours_at_assumed_pass": round(equivalent * args.gpu_forward_s / 3600, 1),
            "note": "worst case: every prompt fails every check; a success stops a prompt's blocks and checks early"}


@cli_errors
def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.part_list
    result = {"date": str(date.today()), "machine": platform.platform(), "cpu_count": os.cpu_count(),
              "threads": args.threads, "torch": torch.__version__, "command": " ".join(sys.argv),
              "load_average_start": os.getloadavg()}
    for name, fn in (("digits", digits_part), ("sd", sd_part), ("cce", cce_part)):
        if name in parts:
            t = time.perf_counter()
            result[name] = fn(args)
            result[name]["wall_s"] = round(time.perf_counter() - t, 1)
            atomic_write_json(out / "attack_cost.json", result)
    result["protocol"] = protocol_cost(args, result.get("sd"))
    result["load_average_end"] = os.getloadavg()
    atomic_write_json(out / "attack_cost.json", result)
    for name in ("digits", "sd"):
        for unit, r in (result.get(name) or {}).items():
            if isinstance(r, dict) and "ratio" in r:
                print(f"| {name} | {unit} | {r['unit_median_s']} | {r['bare_median_s']} | **{r['ratio']}** |")
    if "cce" in result:
        print(json.dumps(result["cce"]))
    print(json.dumps(result["protocol"]))
    return result


if __name__ == "__main__":
    main()
