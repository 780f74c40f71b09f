"""Concept inversion (Pham et al., ICLR 2024): a new word, learned on the erased model, that draws the concept again.

    python -m eval.attack --attack inversion --model M --concept three --output_dir DIR

Textual inversion (Gal et al., 2023) of one new token on the *attacked* model: its embedding, initialised from a
neutral word (``--init_word``; default the first one-token word of object, thing, image, picture), is the only
trained variable; the loss is the plain noise-prediction loss of the attacked UNet on ``num_target_images`` images of
the concept drawn by the *base* model (as the relearn attack draws them: the preset's generation prompts, image i
with seed ``target_seed + i``, or ``--target_images``), each image captioned with its own prompt with the concept's
words replaced by the token. Adam, lr 5e-3 (Gal et al.'s base rate), batch 4, for each of ``inversion_seeds``.
At each of ``eval_steps`` (the largest is the step budget) a check draws ``num_images`` images from the forget
prompts with the concept's words replaced by the token and the judge says which show the concept. Step 0 is the neutral word in the concept's place: the control. ``pre_hit_rate`` is
the original forget prompts on the attacked model (no attack).

Outputs in ``output_dir``: ``cells/seed<s>.json`` (one per finished seed, written atomically: a killed run redoes only
unfinished seeds), ``embeddings/seed<s>.safetensors`` (the learned embedding, diffusers' textual-inversion layout
``{token: (1, D)}``, settings in its metadata), ``attacks.jsonl`` (one line per seed and checked step),
``summary.json``, ``target/`` (the images).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from eval.attack.context import (
    ConceptImagesConfig,
    begin,
    concept_images,
    concept_words,
    draw,
    endless_batches,
    first_step_over,
    int_list,
    judge_images,
    load_attacked,
    noise_target,
    optional_number,
    read_cell,
    replace_words,
    require_one_text_encoder,
    save_pngs,
    TokenEmbeddingOverride,
    versions,
)
from eval.attack.registry import load_judge, register_attack
from erase.utils.errors import UserError
from erase.utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text, settings_hash

logger = logging.getLogger(__name__)

EVAL_LOSS_DRAWS = 4
EVAL_LOSS_SEED = 1234
INIT_WORDS = ("object", "thing", "image", "picture")  # neutral words; the digits tokenizer has only the last two


@dataclass
class InversionConfig(ConceptImagesConfig):
    inversion_lr: float = field(default=5e-3, metadata={"help": "Adam learning rate of the token embedding"})
    inversion_batch_size: int = field(default=4, metadata={"help": "images per step"})
    inversion_seeds: tuple = field(default=(0,), metadata={"help": "inversion seeds (data order, noise, timesteps)"})
    eval_steps: tuple = field(default=(0, 100, 250, 500), metadata={
        "help": "steps at which images are checked; the largest is the step budget"})
    init_word: str | None = field(default=None, metadata={
        "help": "neutral word the new token starts from, one token of the tokenizer (default: the first one-token "
                "word of " + ", ".join(INIT_WORDS) + ")"})
    token: str | None = field(default=None, metadata={"help": "the new token's text (default: <CONCEPT-ci>)"})
    concept_words: str | None = field(default=None, metadata={
        "help": "comma-separated words the token replaces in prompts (default: the concept's name, a digit's "
                "numeral, the preset's one-word forget prompts)"})

    def __post_init__(self):
        super().__post_init__()
        for name, cast in (("num_target_images", int), ("target_seed", int), ("inversion_lr", float),
                           ("inversion_batch_size", int)):
            setattr(self, name, optional_number(getattr(self, name), cast, name))
        if self.num_target_images < 1:
            raise UserError(f"--num_target_images must be >= 1, got {self.num_target_images}")
        if self.inversion_batch_size < 1:
            raise UserError(f"--inversion_batch_size must be >= 1, got {self.inversion_batch_size}")
        if not (np.isfinite(self.inversion_lr) and self.inversion_lr > 0):
            raise UserError(f"--inversion_lr must be a finite number > 0, got {self.inversion_lr}")
        if self.target_images and not Path(self.target_images).is_dir():
            raise UserError(f"--target_images folder not found: {self.target_images}")
        if self.init_word is not None and (not str(self.init_word).strip() or len(str(self.init_word).split()) != 1):
            raise UserError(f"--init_word must be one word, got {self.init_word!r}")
        self.token = (self.token or f"<{self.concept.replace(' ', '_')}-ci>").strip().lower()
        if not self.token or any(c.isspace() for c in self.token):
            raise UserError(f"--token must be non-empty with no spaces, got {self.token!r}")
        self.inversion_seeds = int_list(self.inversion_seeds, "inversion_seeds", minimum=0)
        self.eval_steps = tuple(sorted(int_list(self.eval_steps, "eval_steps", minimum=0)))


def pick_init_word(tokenizer, init_word: str | None) -> str:
    """``init_word``, or the first of ``INIT_WORDS`` that is one token of this tokenizer."""
    if init_word is not None:
        return init_word
    for word in INIT_WORDS:
        if len(tokenizer(word, add_special_tokens=False).input_ids) == 1:
            return word
    raise UserError(f"none of {', '.join(INIT_WORDS)} is one token of this tokenizer; give --init_word WORD")


def add_token(tokenizer, text_encoder, token: str, init_word: str) -> tuple[int, int]:
    """Add ``token`` to the tokenizer and a row to the text encoder, initialised as ``init_word``: (new id, init id)."""
    init = tokenizer(init_word, add_special_tokens=False).input_ids
    if len(init) != 1:
        raise UserError(f"--init_word {init_word!r} is {len(init)} tokens for this tokenizer; pick a one-token word")
    if token in tokenizer.get_vocab():
        raise UserError(f"--token {token!r} is already in the vocabulary; pick a new string")
    tokenizer.add_tokens([token])
    new_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    with __import__("torch").no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[new_id] = weight[init[0]]
    if tokenizer(f"a {token} b", add_special_tokens=False).input_ids.count(new_id) != 1:
        raise UserError(f"--token {token!r} does not tokenise as one token; pick another string")
    return new_id, init[0]


@register_attack("inversion", InversionConfig,
                 help="concept inversion: learn one new token's embedding on the attacked model (Pham et al. 2024)")
def run_inversion(cfg: InversionConfig, accelerator=None) -> dict | None:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from safetensors.torch import save
    from tqdm.auto import tqdm

    from erase.diffusion.generate import model_fingerprint

    run = begin(cfg, accelerator)
    start, cpu_start, info, prompts = run.start, run.cpu_start, run.info, run.prompts
    rank, world, is_main, device, out = run.rank, run.world, run.is_main, run.device, run.out
    words = concept_words(cfg.concept, cfg.concept_words)

    judge = load_judge(cfg.concept)
    pipe, unet = load_attacked(info, cfg.scheduler, device)
    require_one_text_encoder(pipe, "inversion")
    tok, enc = pipe.tokenizer, pipe.text_encoder
    init_word = pick_init_word(tok, cfg.init_word)
    new_id, init_id = add_token(tok, enc, cfg.token, init_word)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    # 1. Images of the concept by the base model (the pipeline still holds the base UNet), as the relearn attack.
    concept = concept_images(cfg, run, pipe, judge, resolution, accelerator)
    images, gen_kw, target_judged, mean, std = concept.images, concept.generation, concept.judged, concept.mean, concept.std
    captions = [replace_words(p, words, cfg.token) for p in images.prompts]
    if pipe.unet is not unet:
        pipe.register_modules(unet=unet)
    for m in (enc, unet, pipe.vae):
        m.requires_grad_(False)
        m.eval()
    with torch.no_grad():
        caption_ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(device)
    weight = enc.get_input_embeddings().weight
    init_vec = weight[init_id].detach().clone()
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    num_t = int(noise_sched.config.num_train_timesteps)
    sf = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))
    mean, std = mean.to(device), std.to(device)
    n = len(images.files)

    def encode(ids, vec):
        def rows(input_ids):
            mask = input_ids == new_id
            return (mask, vec.expand(int(mask.sum()), -1)) if mask.any() else None

        with TokenEmbeddingOverride(enc, rows):
            return enc(ids)[0].float()

    g = torch.Generator().manual_seed(EVAL_LOSS_SEED)
    fix_idx = torch.arange(n).repeat_interleave(EVAL_LOSS_DRAWS)
    fix_z = (mean.cpu()[fix_idx] + std.cpu()[fix_idx] * torch.randn(mean.cpu()[fix_idx].shape, generator=g)) * sf
    fix_noise = torch.randn(fix_z.shape, generator=g)
    fix_t = torch.randint(0, num_t, (len(fix_idx),), generator=g)
    fix_z, fix_noise, fix_t = fix_z.to(device), fix_noise.to(device), fix_t.to(device)

    @torch.no_grad()
    def eval_loss(vec) -> float:
        cond = encode(caption_ids, vec)
        total = 0.0
        for i in range(0, len(fix_idx), cfg.inversion_batch_size):
            sl = slice(i, i + cfg.inversion_batch_size)
            pred = unet(noise_sched.add_noise(fix_z[sl], fix_noise[sl], fix_t[sl]), fix_t[sl], cond[fix_idx[sl].to(device)]).sample
            target = noise_target(noise_sched, fix_z[sl], fix_noise[sl], fix_t[sl])
            total += F.mse_loss(pred.float(), target.float(), reduction="sum").item()
        return total / fix_z.numel()

    check_prompts = [replace_words(prompts.forget[i % len(prompts.forget)], words, cfg.token) for i in range(cfg.num_images)]
    orig_prompts = [prompts.forget[i % len(prompts.forget)] for i in range(cfg.num_images)]
    check_seeds = [cfg.eval_seed + i for i in range(cfg.num_images)]

    def check(vec, texts, folder: str) -> dict:
        with torch.no_grad():
            weight[new_id] = vec  # the pipeline tokenises the text: the token's row is the learned vector
        pixels = draw(pipe, texts, check_seeds, cfg.steps, float(cfg.guidance), resolution, cfg.generation_batch_size)
        if cfg.save_images:
            save_pngs(pixels, out / "images" / folder)
        return judge_images(judge, pixels, texts)

    # 2. Settings and resume keys.
    settings = {
        "attack": "inversion", "model": cfg.model, "base_model": info.base, "erased": info.erased,
        "model_fingerprint": model_fingerprint(cfg.model), "base_fingerprint": model_fingerprint(info.base),
        "erase_config": info.erase_config, "concept": cfg.concept, "prompt_source": prompts.source,
        "forget_prompts": prompts.forget, "check_prompts": sorted(set(check_prompts)), "concept_words": words,
        "token": cfg.token, "token_id": new_id, "init_word": init_word, "init_token_id": init_id,
        "target_images": {"source": images.source, "count": n, "files": [f.name for f in images.files],
                          "prompts": images.prompts, "captions": captions, "seeds": images.seeds,
                          "drawn_by": None if cfg.target_images else "base model",
                          "seed_rule": None if cfg.target_images else "target_seed + i, prompt i mod len(generation_prompts)",
                          "generation": None if cfg.target_images else {k: v for k, v in gen_kw.items() if k != "batch_size"}},
        "optimizer": {"name": "adam", "lr": cfg.inversion_lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                      "on": "the new token's embedding only (1 x D); text encoder and UNet frozen"},
        "batch_size": cfg.inversion_batch_size,
        "loss": f"MSE to the {noise_sched.config.prediction_type} target of the attacked UNet, timesteps uniform in "
                f"[0, {num_t}), latents = VAE posterior sample x {sf:.5g}, each image with its caption",
        "eval_loss": f"the same loss on a fixed batch ({EVAL_LOSS_DRAWS} draws of noise and timestep per image, seed "
                     f"{EVAL_LOSS_SEED})",
        "steps": list(cfg.eval_steps), "inversion_seeds": list(cfg.inversion_seeds), "generation": cfg.generation(),
        "resolution": resolution, "judge": {"concept": cfg.concept, **judge.settings},
    }
    common = {k: v for k, v in settings.items() if k != "inversion_seeds"}
    keys = {s: settings_hash({**common, "seed": s}) for s in cfg.inversion_seeds}
    pre_key = settings_hash({k: settings[k] for k in ("model_fingerprint", "forget_prompts", "generation", "judge")})
    cells_dir, emb_dir = out / "cells", out / "embeddings"
    if is_main:
        for d in (cells_dir, emb_dir):
            d.mkdir(parents=True, exist_ok=True)
            for stale in d.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    mine = list(cfg.inversion_seeds)[rank::world]
    todo = [s for s in mine if read_cell(cells_dir / f"seed{s}.json", keys[s]) is None]
    if len(todo) < len(mine):
        logger.info("process %d: %d of %d seed(s) already finished with these settings, skipped", rank,
                    len(mine) - len(todo), len(mine))

    # 3. The seeds: a fresh embedding from the init word, Adam on it, a check at each eval step.
    max_step = max(cfg.eval_steps)
    bar = tqdm(total=len(todo) * max_step, desc="inversion", unit="step",
               disable=accelerator is not None and not accelerator.is_local_main_process)
    for seed in todo:
        t_cell = time.perf_counter()
        vec = torch.nn.Parameter(init_vec.clone())
        opt = torch.optim.Adam([vec], lr=cfg.inversion_lr)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        stream = endless_batches(n, cfg.inversion_batch_size, gen)
        checks, eval_losses, train_losses, check_seconds = [], [], [], 0.0
        pre = None
        for step in range(max_step + 1):
            if step in cfg.eval_steps:
                t0 = time.perf_counter()
                if pre is None:
                    pre = check(init_vec, orig_prompts, f"seed{seed}/pre")
                checks.append(check(vec.detach(), check_prompts, f"seed{seed}/step{step:05d}"))
                eval_losses.append(eval_loss(vec.detach()))
                check_seconds += time.perf_counter() - t0
                bar.set_postfix(seed=seed, step=step, hit=f"{checks[-1]['hit_rate']:.2f}", eval_loss=f"{eval_losses[-1]:.4f}")
            if step == max_step:
                break
            idx = next(stream)
            z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(device)) * sf
            noise = torch.randn(z.shape, generator=gen).to(device)
            t = torch.randint(0, num_t, (len(idx),), generator=gen).to(device)
            cond = encode(caption_ids[idx], vec)
            pred = unet(noise_sched.add_noise(z, noise, t), t, cond).sample
            loss = F.mse_loss(pred.float(), noise_target(noise_sched, z, noise, t).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_losses.append(float(loss.item()))
            bar.update(1)
        learned = vec.detach().float().cpu().reshape(1, -1).contiguous()
        meta = {"token": cfg.token, "init_word": init_word, "steps": str(max_step), "seed": str(seed),
                "lr": str(cfg.inversion_lr), "model": cfg.model, "attack": "inversion (eval.attack)"}
        atomic_write_bytes(emb_dir / f"seed{seed}.safetensors", save({cfg.token: learned}, metadata=meta))
        record = {
            "key": keys[seed], "pre_key": pre_key, "seed": seed, "steps": list(cfg.eval_steps), "pre": pre,
            "hit_rate": [c["hit_rate"] for c in checks], "hits": [c["hits"] for c in checks], "n": [c["n"] for c in checks],
            "checks": checks, "eval_loss": eval_losses, "train_loss": train_losses,
            "embedding_norm": {"init": float(init_vec.norm()), "learned": float(learned.norm()),
                               "moved": float((learned[0] - init_vec.cpu()).norm())},
            "seconds": round(time.perf_counter() - t_cell, 2), "check_seconds": round(check_seconds, 2),
            "device": str(device), "torch_threads": torch.get_num_threads(),
        }
        atomic_write_json(cells_dir / f"seed{seed}.json", record)
    bar.close()
    with torch.no_grad():
        weight[new_id] = init_vec
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not is_main:
        return None

    # 4. Summary from the cell files.
    cells = {}
    for s in cfg.inversion_seeds:
        cells[s] = read_cell(cells_dir / f"seed{s}.json", keys[s])
        if cells[s] is None:
            raise UserError(f"seed {s} is missing from {cells_dir}; rerun the same command to finish it")
    lines = []
    for s, cell in cells.items():
        for i, step in enumerate(cell["steps"]):
            upto = cell["train_loss"][:step]
            lines.append({"attack": "inversion", "seed": s, "step": step, "hit_rate": cell["hit_rate"][i],
                          "hits": cell["hits"][i], "n": cell["n"][i], "eval_loss": cell["eval_loss"][i],
                          "train_loss_last10": float(np.mean(upto[-10:])) if upto else None,
                          "per_prompt": cell["checks"][i]["per_prompt"], "labels": cell["checks"][i]["labels"]})
    atomic_write_text(out / "attacks.jsonl", "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
    rates = np.array([c["hit_rate"] for c in cells.values()], dtype=float)
    mean_rate = rates.mean(0)
    std_rate = rates.std(0, ddof=1) if len(cells) > 1 else np.zeros_like(mean_rate)
    first = next(iter(cells.values()))
    control = float(mean_rate[0]) if cfg.eval_steps[0] == 0 else None
    summary = {
        "attack": "inversion", "model": cfg.model, "base_model": info.base, "erased": info.erased, "concept": cfg.concept,
        "token": cfg.token, "pre_hit_rate": first["pre"]["hit_rate"],
        "control_hit_rate": control,
        "steps": list(cfg.eval_steps), "hit_rate": [round(float(x), 6) for x in mean_rate],
        "hit_rate_std": [round(float(x), 6) for x in std_rate],
        "final_hit_rate": round(float(mean_rate[-1]), 6),
        "final_minus_control": round(float(mean_rate[-1]) - control, 6) if control is not None else None,
        "first_step_over_50": first_step_over(cfg.eval_steps, mean_rate),
        "eval_loss": [round(float(x), 6) for x in np.mean([c["eval_loss"] for c in cells.values()], 0)],
        "per_seed": {str(s): {"hit_rate": c["hit_rate"], "hits": c["hits"], "n": c["n"], "eval_loss": c["eval_loss"],
                              "embedding": f"embeddings/seed{s}.safetensors", "embedding_norm": c["embedding_norm"],
                              "seconds": c["seconds"]} for s, c in cells.items()},
        "target_images_judged": {k: target_judged[k] for k in ("hits", "n", "hit_rate", "labels")},
        "definitions": {
            "hit_rate": "share of a check's images (forget prompts, concept words replaced by the token) the judge flags",
            "control_hit_rate": "step 0: the token is still the neutral init word, so the prompts name no concept",
            "pre_hit_rate": "the original forget prompts on the attacked model, no attack",
            "hit_rate_std": "sample standard deviation over inversion seeds (ddof 1; 0 with one seed)",
        },
    }
    summary["headline"] = {"inversion_pre": summary["pre_hit_rate"],  # what a table shows (eval.digits bench --attacks)
                           **{f"inversion_{step}": rate for step, rate in zip(summary["steps"], summary["hit_rate"])}}
    summary["settings"] = {**settings, "num_processes": world, "device": str(device),
                           "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    summary["versions"] = versions()
    summary["seconds"] = {"wall": round(time.perf_counter() - start, 1), "cpu": round(time.process_time() - cpu_start, 1),
                          "computed_seeds": todo, "seeds": {str(s): c["seconds"] for s, c in cells.items()},
                          "note": "wall and cpu are this invocation's (main process); seeds' seconds as recorded when computed"}
    atomic_write_json(out / "summary.json", summary)
    logger.info("inversion %s: hit rate %s at steps %s (pre %.0f%%)", cfg.concept,
                " ".join(f"{100 * r:.0f}±{100 * d:.0f}" for r, d in zip(mean_rate, std_rate)), list(cfg.eval_steps),
                100 * summary["pre_hit_rate"])
    return summary


def inversion_audit(model_dir: str, concept: str, output_dir: str, accelerator=None, **options) -> dict:
    """Concept inversion in-process (what ``python -m eval.attack --attack inversion`` runs); ``options`` are
    :class:`InversionConfig` fields."""
    known = {f.name for f in fields(InversionConfig)} - {"model", "concept", "output_dir"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown inversion option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = InversionConfig(model=str(model_dir), concept=concept, output_dir=str(output_dir), **options)
    return run_inversion(cfg, accelerator=accelerator)
