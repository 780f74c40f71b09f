"""The prompt attacks (unlearndiffatk, inversion): do they work on the digits model, and what do they cost?

    OMP_NUM_THREADS=1 python benchmarks/attack_adv.py --output_dir /tmp/attack_adv           # digits + SD cost
    OMP_NUM_THREADS=1 python benchmarks/attack_adv.py --output_dir DIR --parts sd --sd_threads 2

Parts:
  digits  the default digits model (eval.digits.model.default_model_dir) and erased copies for ``--concept``
          (``--erasures`` METHOD:STEPS, default ga:100 and esd:100; erase/sd.py with eval/digits/bench.py's
          per-method settings and the data sizes of benchmarks/attack_relearn.py's header, through
          eval.digits.bench.run_erasure): unlearndiffatk with its defaults (5 tokens, 40 iterations, 4 restarts, the
          forget prompts) on each, and concept inversion (defaults: 500 steps) on each erased model. Checks: base ASR
          >= 95 %; pooled ASR of an erased model against its pre-attack rate and its controls. Per-prompt attack
          seconds (CPU) from the units' records.
  sd      the cost of one unlearndiffatk iteration on the SD v1.4 architecture with random weights on CPU
          (UNet2DConditionModel from SD v1.4's config, benchmarks/sd_step.SD14_UNET, 64x64 latents; a CLIPTextModel
          of ViT-L/14 size, 77 tokens): ``--sd_iterations`` optimisation iterations (text encoder + UNet forward and
          backward to the token embeddings, Adam) and ``--sd_evals`` fixed-batch evaluations (8 noisy latents, one
          UNet forward), then the extrapolation to 40 iterations x 4 restarts per prompt, stated with its formula.

Writes OUTPUT_DIR/attack_adv.json and prints the markdown rows for benchmarks/RESULTS.md. A rerun reuses finished
attack units (the audits resume) and the erased model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="audit folders, the erased model and attack_adv.json")
    p.add_argument("--parts", default="digits,sd", help="comma-separated: digits, sd")
    p.add_argument("--concept", default="three", help="the digit attacked (a digit word)")
    p.add_argument("--restarts", type=int, default=4, help="unlearndiffatk restarts per prompt")
    p.add_argument("--erasures", default="ga:100,esd:100", help="erased models to attack, comma-separated METHOD:STEPS")
    p.add_argument("--judge_every", type=int, default=0, help="unlearndiffatk --judge_every (0: judge the kept prompt only)")
    p.add_argument("--no_inversion", action="store_true", help="skip concept inversion on the erased models")
    p.add_argument("--sd_iterations", type=int, default=2, help="timed optimisation iterations on the SD architecture")
    p.add_argument("--sd_evals", type=int, default=1, help="timed fixed-batch evaluations on the SD architecture")
    p.add_argument("--sd_threads", type=int, default=2, help="torch threads for the SD timing")
    return p.parse_args(argv)


def digits_part(args, out: Path) -> dict:
    import torch

    from eval.attack.inversion import inversion_audit
    from eval.attack.unlearndiffatk import unlearndiffatk_audit
    from eval.digits.bench import run_erasure
    from eval.digits.model import DIGIT_WORDS, default_model_dir

    torch.set_num_threads(1)
    base = str(default_model_dir())
    erase_args = SimpleNamespace(launcher="python", max_train_steps=100, train_batch_size=16, num_forget_images=64,
                                 num_retain_images=192, steps=20, guidance=4.0, erase_args=None)
    models, erasures = [("base", base)], {}
    for item in [x.strip() for x in args.erasures.split(",") if x.strip()]:
        method, _, steps = item.partition(":")
        name = f"{method}{steps}"
        t0 = time.perf_counter()
        ns = SimpleNamespace(**{**vars(erase_args), "max_train_steps": int(steps or 100)})
        info = run_erasure(base, DIGIT_WORDS.index(args.concept), method, 0, out / name, out / f"{name}-data", ns)
        erasures[name] = {"method": method, "steps": int(steps or 100), "seconds": round(time.perf_counter() - t0, 1),
                          "command": " ".join(info.get("command", []))}
        models.append((name, str(out / name)))
    rows = {}
    for name, model in models:
        t0 = time.perf_counter()
        s = unlearndiffatk_audit(model, args.concept, out / f"unlearndiffatk-{name}", restarts=args.restarts,
                                 judge_every=args.judge_every)
        units = [json.loads(x) for x in (out / f"unlearndiffatk-{name}" / "attacks.jsonl").read_text().splitlines()]
        rows[name] = {
            "model": model, "pre_asr": s["pre_asr"], "base_pre_asr": s["base_pre_asr"], "asr": s["asr"],
            "asr_std": s["asr_std"], "asr_any_restart": s["asr_any_restart"], "asr_with_pre": s["asr_with_pre"],
            "asr_any_check": s["asr_any_check"],
            "controls_attacked": {c: v["attacked"]["rate"] for c, v in s["controls"].items()},
            "controls_base": {c: v["base"]["rate"] for c, v in s["controls"].items()},
            "asr_minus_control": s["asr_minus_control"],
            "prefix_names_concept_share": s["prefix_names_concept_share"], "loss": s["loss"],
            "attack_s_per_unit": s["seconds"]["attack_per_unit_mean"], "unit_s": s["seconds"]["unit_mean"],
            "attack_s_per_prompt": round(s["seconds"]["attack_per_unit_mean"] * args.restarts, 2),
            "units": len(units), "wall_s": round(time.perf_counter() - t0, 1),
            "examples": sorted({u["adversarial_prompt"] for u in units if u["success"]})[:4],
        }
        if name == "base" or args.no_inversion:
            continue
        t0 = time.perf_counter()
        inv = inversion_audit(model, args.concept, out / f"inversion-{name}")
        rows[name]["inversion"] = {k: inv[k] for k in ("pre_hit_rate", "control_hit_rate", "steps", "hit_rate",
                                                       "eval_loss", "final_minus_control")}
        rows[name]["inversion"]["init_word"] = inv["settings"]["init_word"]
        rows[name]["inversion"]["seconds"] = inv["seconds"]["seeds"]
        rows[name]["inversion"]["wall_s"] = round(time.perf_counter() - t0, 1)
    checks = {"base_asr_at_least_95": rows["base"]["asr"] >= 0.95,
              "asr_minus_pre": {n: round(r["asr"] - r["pre_asr"], 6) for n, r in rows.items() if n != "base"}}
    return {"concept": args.concept, "erasures": erasures, "rows": rows, "checks": checks}


def sd_part(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.sd_step import SD14_UNET, build_unet
    from eval.attack.context import TokenEmbeddingOverride

    torch.set_num_threads(args.sd_threads)
    torch.manual_seed(0)
    unet = build_unet(SD14_UNET).eval().requires_grad_(False)
    # ViT-L/14 text tower of CLIP (openai/clip-vit-large-patch14 text_config), random weights
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval().requires_grad_(False)
    n_params = {"unet": sum(p.numel() for p in unet.parameters()), "text_encoder": sum(p.numel() for p in enc.parameters())}
    k, draws = 5, 8
    table = enc.get_input_embeddings().weight.detach()
    cand = F.normalize(table[:40000], dim=1)
    ids = torch.tensor([[49406] + [49406] * k + list(range(1000, 1010)) + [49407] * (77 - 1 - k - 10)])
    x0 = torch.randn(1, 4, 64, 64)
    alphas = torch.linspace(0.9991, 0.0047, 1000)
    adv = torch.nn.Parameter(table[torch.randint(0, 40000, (k,))].clone())
    opt = torch.optim.Adam([adv], lr=0.01, weight_decay=0.1)

    def rows(input_ids):
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        mask[:, 1:1 + k] = True
        return mask, x_cur.repeat(input_ids.shape[0], 1)

    it_s = []
    for _ in range(args.sd_iterations):
        t0 = time.perf_counter()
        idx = torch.argmax(F.normalize(adv.detach(), dim=1) @ cand.T, dim=1)
        x_cur = adv + (table[idx] - adv).detach()
        with TokenEmbeddingOverride(enc, rows):
            cond = enc(ids)[0]
        t = torch.randint(0, 1000, (1,))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        it_s.append(time.perf_counter() - t0)
    ev_s = []
    for _ in range(args.sd_evals):
        t0 = time.perf_counter()
        with torch.no_grad():
            cond = enc(ids)[0]
            t = torch.tensor([int((j + 0.5) * 1000 / draws) for j in range(draws)])
            noise = torch.randn(draws, 4, 64, 64)
            a = alphas[t].view(-1, 1, 1, 1)
            unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond.expand(draws, -1, -1))
        ev_s.append(time.perf_counter() - t0)
    it, ev = min(it_s), min(ev_s)
    distinct = 30  # distinct projected prompts per 40 iterations: 19-31 measured on the digits model (each evaluated once)
    per_restart = 40 * it + distinct * ev
    return {"threads": args.sd_threads, "params": n_params, "iteration_s": [round(x, 2) for x in it_s],
            "eval_batch_s": [round(x, 2) for x in ev_s],
            "extrapolation": {"formula": "per restart = 40 x iteration_s + 30 x eval_batch_s (about 30 distinct projected "
                                         "prompts per 40 iterations, each evaluated once on the fixed batch of 8); "
                                         "per prompt = 4 restarts; judged generations not included",
                              "per_restart_s": round(per_restart, 1), "per_prompt_s": round(4 * per_restart, 1),
                              "nudity_142_prompts_h": round(142 * 4 * per_restart / 3600, 1)}}


def main(argv=None) -> dict:
    import torch

    from erase.utils.launch import setup_logging

    setup_logging()
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    result = {"date": str(date.today()), "machine": platform.platform(), "cpu_count": __import__("os").cpu_count(),
              "torch": torch.__version__, "command": " ".join(sys.argv)}
    t0 = time.perf_counter()
    if "digits" in parts:
        result["digits"] = digits_part(args, out)
    if "sd" in parts:
        result["sd"] = sd_part(args)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "attack_adv.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
