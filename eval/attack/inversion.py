"""Concept inversion (Pham et al., ICLR 2024): a new word, learned on the erased model, that draws the concept again.

    python -m eval.attack --attack inversion --model M --concept three --output_dir DIR
    python -m eval.attack --attack inversion --budget cce ...     # the concept-inversion paper's script (GPU)

Textual inversion (Gal et al., 2023) of one new token on the *attacked* model: its embedding, initialised from a
neutral word (``--init_word``; default the first one-token word of object, thing, image, picture), is the only
trained variable; the loss is the plain noise-prediction loss of the attacked UNet on ``num_target_images`` images of
the concept drawn by the *base* model (as the relearn attack draws them, or ``--target_images``), each captioned with
its own prompt with the concept's words replaced by the token. Adam, lr 5e-3 (Gal et al.'s base rate), batch 4, for
each of ``inversion_seeds``. At each of ``eval_steps`` (the largest is the step budget: 2000) a check draws
``num_images`` images from the forget prompts with the concept's words replaced by the token and the judge says which
show the concept. Step 0 is the neutral word in the concept's place: the control. ``pre_hit_rate`` is the original
forget prompts on the attacked model.

``--budget cce``: NYU-DICE-Lab/circumventing-concept-erasure ``esd/train.sh`` + ``concept_inversion.py``: 5000
steps of effective batch 16 (batch 4 x 4 accumulation there, one batch of 16 here), 25 images, AdamW with lr 5e-3
scaled by ``--scale_lr`` to 5e-3 x 16 = 0.08, weight decay 1e-2 (diffusers' default), constant schedule.

Outputs in ``output_dir``: ``cells/seed<s>.json`` (one per finished seed, written atomically: a killed run redoes only
unfinished seeds), ``embeddings/seed<s>.safetensors`` (the learned embedding, diffusers' textual-inversion layout
``{token: (1, D)}``, settings in its metadata), ``artefacts.json`` (what ``--replay`` applies to another model),
``attacks.jsonl`` (one line per seed and checked step), ``summary.json``, ``target/`` (the images).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from erase.utils.errors import UserError
from erase.utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text, settings_hash
from eval.attack.registry import load_judge, register_attack, run_audit
from eval.attack.utils.checks import check_seeds, draw, first_step_over, judge_images, save_pngs
from eval.attack.utils.config import ConceptImagesConfig, apply_budget, cast_fields, int_list
from eval.attack.utils.images import concept_images, describe_images
from eval.attack.utils.losses import Denoising, FixedBatch, endless_batches
from eval.attack.utils.models import load_attacked, pipeline_text, resolution_of, set_denoiser
from eval.attack.utils.prefix_search import OPTIMIZERS, OptimizerSpec
from eval.attack.utils.records import begin, prepare_cells, read_cell, versions, write_artefacts
from eval.attack.utils.text import PromptEncoders, embedding_keys
from eval.attack.utils.tokens import TokenEmbeddingOverride
from eval.attack.utils.words import replace_words, word_list

logger = logging.getLogger(__name__)

INIT_WORDS = ("object", "thing", "image", "picture")  # neutral words; the digits tokenizer has only the last two
EVAL_STEPS = (0, 100, 250, 500, 1000, 2000)
BUDGETS = {  # named budgets: every field they set, a flag that contradicts one is an error
    "cce": {"eval_steps": EVAL_STEPS + (5000,), "inversion_batch_size": 16, "num_target_images": 25,
            "inversion_lr": 5e-3 * 16, "optimizer": "adamw", "weight_decay": 1e-2},
}


@dataclass
class InversionConfig(ConceptImagesConfig):
    inversion_lr: float = field(default=5e-3, metadata={"help": "learning rate of the token embedding"})
    inversion_batch_size: int = field(default=4, metadata={"help": "images per step"})
    optimizer: str = field(default="adam", metadata={"help": "adam or adamw (decoupled weight decay)"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the optimiser"})
    inversion_seeds: tuple = field(default=(0,), metadata={"help": "inversion seeds (data order, noise, timesteps)"})
    eval_steps: tuple = field(default=EVAL_STEPS, metadata={
        "help": "steps at which images are checked; the largest is the step budget"})
    budget: str | None = field(default=None, metadata={
        "help": "a named budget that sets the fields above: cce (the concept-inversion paper's script: 5000 steps, "
                "batch 16, 25 images, AdamW 0.08, weight decay 0.01; a GPU job)"})
    init_word: str | None = field(default=None, metadata={
        "help": "neutral word the new token starts from, one token of the tokenizer (default: the first one-token "
                "word of " + ", ".join(INIT_WORDS) + ")"})
    token: str | None = field(default=None, metadata={"help": "the new token's text (default: <CONCEPT-ci>)"})
    concept_words: str | None = field(default=None, metadata={
        "help": "comma-separated words the token replaces in prompts (default: the judge's word list)"})

    def __post_init__(self):
        super().__post_init__()
        cast_fields(self, {"inversion_lr": float, "inversion_batch_size": int, "weight_decay": float},
                    {"inversion_batch_size": 1})
        self.inversion_seeds = int_list(self.inversion_seeds, "inversion_seeds", minimum=0)
        self.eval_steps = tuple(sorted(int_list(self.eval_steps, "eval_steps", minimum=0)))
        apply_budget(self, BUDGETS)
        from erase.utils.checks import NON_NEGATIVE, POSITIVE, check_finite

        check_finite("--inversion_lr", self.inversion_lr, POSITIVE)
        check_finite("--weight_decay", self.weight_decay, NON_NEGATIVE)
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown --optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.init_word is not None and (not str(self.init_word).strip() or len(str(self.init_word).split()) != 1):
            raise UserError(f"--init_word must be one word, got {self.init_word!r}")
        self.token = (self.token or f"<{self.concept.replace(' ', '_')}-ci>").strip().lower()
        if not self.token or any(c.isspace() for c in self.token):
            raise UserError(f"--token must be non-empty with no spaces, got {self.token!r}")


def pick_init_word(tokenizers, init_word: str | None) -> str:
    """``init_word``, or the first of ``INIT_WORDS`` that is one token of every tokenizer (one, or a list)."""
    if init_word is not None:
        return init_word
    tokenizers = tokenizers if isinstance(tokenizers, (list, tuple)) else [tokenizers]
    for word in INIT_WORDS:
        if all(len(t(word, add_special_tokens=False).input_ids) == 1 for t in tokenizers):
            return word
    raise UserError(f"none of {', '.join(INIT_WORDS)} is one token of {'every' if len(tokenizers) > 1 else 'this'} "
                    "tokenizer; give --init_word WORD")


def add_token(tokenizer, text_encoder, token: str, init_word: str | None = None, vector=None) -> tuple[int, int | None]:
    """Add ``token`` to the tokenizer and a row to the text encoder, set to ``init_word``'s embedding or to
    ``vector``: (new id, init id or None)."""
    import torch

    init = tokenizer(init_word, add_special_tokens=False).input_ids if init_word is not None else None
    if init is not None and len(init) != 1:
        raise UserError(f"--init_word {init_word!r} is {len(init)} tokens for this tokenizer; pick a one-token word")
    vocab = tokenizer.get_vocab()
    # a whole word of the vocabulary (CLIP's ``word</w>``, T5's ``▁word``; CLIP lower-cases) is refused too: an added
    # token is matched before the word pieces, so it would take the word over in every prompt, controls included
    known = [v for w in dict.fromkeys((token, token.lower())) for v in (w, f"{w}</w>", f"\u2581{w}") if v in vocab]
    if known:
        raise UserError(f"--token {token!r} is already in the vocabulary ({known[0]!r}); adding it would change every "
                        "prompt that uses it: pick a new string, e.g. '<concept>'")
    tokenizer.add_tokens([token])
    new_id = tokenizer.convert_tokens_to_ids(token)
    if new_id >= text_encoder.get_input_embeddings().weight.shape[0]:  # T5's table has spare rows: no shrinking
        text_encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[new_id] = weight[init[0]] if init is not None else vector.to(weight)
    if tokenizer(f"a {token} b", add_special_tokens=False).input_ids.count(new_id) != 1:
        raise UserError(f"--token {token!r} does not tokenise as one token; pick another string")
    return new_id, init[0] if init is not None else None


def caption_encoder(text_encoder, token_id: int, caption_ids):
    """``encode(vecs, idx)`` for a one-encoder family (SD 1.x / 2.x): the captions' ids (N, L) (rows ``idx``, all if
    None) through the encoder, every ``token_id`` replaced by ``vecs[0]``; the last hidden states."""
    def encode(vecs, idx=None):
        def rows(input_ids):
            mask = input_ids == token_id
            return (mask, vecs[0].expand(int(mask.sum()), -1)) if mask.any() else None

        with TokenEmbeddingOverride(text_encoder, rows):
            return text_encoder(caption_ids if idx is None else caption_ids[idx])[0].float()

    return encode


class TokenInversion:
    """One learned token embedding per text encoder (frozen encoders and denoiser): ``step(idx, generator)`` is one
    optimisation step on the images ``idx`` (posterior sample, noise, timestep drawn from ``generator``, the loss the
    family's objective: ``utils.losses.Denoising``). ``encode(vecs, idx)`` -> the captions' conditioning (all if
    ``idx`` is None) with each encoder's token row replaced by its vector."""

    def __init__(self, model, denoising, encode, init_vecs: list, mean, std, optimizer: OptimizerSpec):
        import torch

        self.model, self.den, self.encode_with = model, denoising, encode
        self.mean, self.std = mean, std
        self.vecs = [torch.nn.Parameter(v.clone()) for v in init_vecs]
        self.opt = optimizer.build(self.vecs)

    def encode(self, idx=None, vecs=None):
        return self.encode_with(self.vecs if vecs is None else vecs, idx)

    def step(self, idx: list[int], generator) -> float:
        z, noise, t = self.den.sample(self.mean, self.std, idx, generator)
        loss = self.den.loss(self.model, z, noise, t, self.encode(idx))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.item())


@register_attack("inversion", InversionConfig,
                 help="concept inversion: learn one new token's embedding on the attacked model (Pham et al. 2024)")
def run_inversion(cfg: InversionConfig, accelerator=None) -> dict | None:
    import torch
    from safetensors.torch import save
    from tqdm.auto import tqdm

    from erase.diffusion.generate import model_fingerprint

    run = begin(cfg, accelerator)
    info, prompts, rank, world, is_main, device, out = (run.info, run.prompts, run.rank, run.world, run.is_main,
                                                        run.device, run.out)
    words, words_source = word_list(cfg.concept, cfg.concept_words)
    judge = load_judge(cfg.concept)
    pipe, unet = load_attacked(info, cfg.scheduler, device)
    family, text = pipeline_text(pipe)
    encoders = PromptEncoders(text, device)
    multi = len(encoders.encoders) > 1  # SDXL, SD3, Flux: the new word has a learned row in every encoder's table
    init_word = pick_init_word(encoders.tokenizers, cfg.init_word)
    added = [add_token(t, e, cfg.token, init_word) for t, e in zip(encoders.tokenizers, encoders.encoders)]
    new_ids, init_ids = [a[0] for a in added], [a[1] for a in added]
    keys_of = embedding_keys(family)  # the names of each encoder's row in the embedding file
    (new_id, init_id), tok, enc = added[0], encoders.tokenizers[0], encoders.encoders[0]
    resolution = resolution_of(pipe)

    # 1. Images of the concept by the base model (the pipeline still holds the base denoiser), as the relearn attack.
    concept = concept_images(cfg, run, pipe, judge, resolution, accelerator)
    images, gen_kw, target_judged = concept.images, concept.generation, concept.judged
    captions = [replace_words(p, words, cfg.token) for p in images.prompts]
    set_denoiser(pipe, unet)
    for m in (*encoders.encoders, unet, pipe.vae):
        m.requires_grad_(False)
        m.eval()
    weights = [e.get_input_embeddings().weight for e in encoders.encoders]
    init_vecs = [w[i].detach().clone() for w, i in zip(weights, init_ids)]
    mean, std = concept.mean.to(device), concept.std.to(device)
    den = Denoising.of_pipeline(pipe, text, resolution, tuple(mean.shape[1:]), unet)
    if multi:  # the captions through the family's text stack, the token's row of every encoder replaced

        def encode(vecs, idx=None):
            texts = captions if idx is None else [captions[j] for j in idx]
            return encoders.encode(texts, encoders.token_rows(new_ids, vecs))
    else:
        with torch.no_grad():
            caption_ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                              return_tensors="pt").input_ids.to(device)
        encode = caption_encoder(enc, new_id, caption_ids)
    n = len(images.files)
    optimizer = OptimizerSpec(cfg.optimizer, cfg.inversion_lr, cfg.weight_decay)
    fixed = FixedBatch(mean, std, den, device)

    def eval_loss(vecs) -> float:
        with torch.no_grad():
            cond = encode(vecs)  # the captions once, not once per fixed batch slice
        return fixed.loss(lambda noisy, t, idx: den.predict(unet, noisy, t, cond[idx.to(device)]), cfg.inversion_batch_size)

    check_prompts = [replace_words(prompts.forget[i % len(prompts.forget)], words, cfg.token) for i in range(cfg.num_images)]
    orig_prompts = [prompts.forget[i % len(prompts.forget)] for i in range(cfg.num_images)]
    seeds = check_seeds(cfg.eval_seed, cfg.num_images)

    def check(vecs, texts, folder: str) -> dict:
        with torch.no_grad():
            for w, i, v in zip(weights, new_ids, vecs):
                w[i] = v  # the pipeline tokenises the text: the token's row is the learned vector
        pixels = draw(pipe, texts, seeds, cfg.steps, float(cfg.guidance), resolution, cfg.generation_batch_size)
        if cfg.save_images:
            save_pngs(pixels, out / "images" / folder)
        return judge_images(judge, pixels, texts)

    # 2. Settings and resume keys.
    settings = {
        "attack": "inversion", "model": cfg.model, "base_model": info.base, "erased": info.erased,
        "model_fingerprint": model_fingerprint(cfg.model), "base_fingerprint": model_fingerprint(info.base),
        "erase_config": info.erase_config, "concept": cfg.concept, "prompt_source": prompts.source,
        "forget_prompts": prompts.forget, "check_prompts": sorted(set(check_prompts)), "concept_words": words,
        "concept_words_source": words_source, "token": cfg.token, "token_id": new_id, "init_word": init_word,
        "init_token_id": init_id, "target_images": describe_images(cfg, images, gen_kw, captions),
        "optimizer": {**optimizer.describe(), "on": "the new token's embedding only (1 x D); text encoder and UNet frozen"},
        "batch_size": cfg.inversion_batch_size, "budget": cfg.budget,
        "loss": f"MSE to the {den.prediction_type} target of the attacked UNet, timesteps uniform in "
                f"[0, {den.num_t}), latents = VAE posterior sample x {den.scale:.5g}, each image with its caption",
        "eval_loss": fixed.describe(),
        "steps": list(cfg.eval_steps), "inversion_seeds": list(cfg.inversion_seeds), "generation": cfg.generation(),
        "resolution": resolution, "judge": {"concept": cfg.concept, **judge.settings},
    }
    if multi:  # the SD 1.x / 2.x settings (and so their resume keys) stay as they were
        settings.update({
            "model_family": family.name, "text_encoders": dict(zip(keys_of, (e for _, e, _ in family.text_encoders))),
            "token_ids": dict(zip(keys_of, new_ids)), "init_token_ids": dict(zip(keys_of, init_ids)),
            "optimizer": {**optimizer.describe(), "on": "the new token's row of every text encoder's embedding table "
                          f"({', '.join(f'{k} 1 x {v.numel()}' for k, v in zip(keys_of, init_vecs))}); encoders and "
                          f"{family.denoiser} frozen"},
            "loss": den.describe(family.denoiser) + "; each image with its caption, encoded by the family's text stack "
                    "(every encoder, the pooled path included)"})
    common = {k: v for k, v in settings.items() if k not in ("inversion_seeds", "budget")}
    keys = {s: settings_hash({**common, "seed": s}) for s in cfg.inversion_seeds}
    cells_dir, emb_dir = out / "cells", out / "embeddings"
    for d in (cells_dir, emb_dir):
        prepare_cells(d, is_main)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    mine = list(cfg.inversion_seeds)[rank::world]
    todo = [s for s in mine if read_cell(cells_dir / f"seed{s}.json", keys[s]) is None]
    if len(todo) < len(mine):
        logger.info("process %d: %d of %d seed(s) already finished with these settings, skipped", rank,
                    len(mine) - len(todo), len(mine))

    # 3. The seeds: a fresh embedding from the init word, the optimiser on it, a check at each eval step.
    max_step = max(cfg.eval_steps)
    bar = tqdm(total=len(todo) * max_step, desc="inversion", unit="step",
               disable=accelerator is not None and not accelerator.is_local_main_process)
    for seed in todo:
        t_cell = time.perf_counter()
        inv = TokenInversion(unet, den, encode, init_vecs, mean, std, optimizer)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        stream = endless_batches(n, cfg.inversion_batch_size, gen)
        checks, eval_losses, train_losses, check_seconds, pre = [], [], [], 0.0, None
        for step in range(max_step + 1):
            if step in cfg.eval_steps:
                t0 = time.perf_counter()
                if pre is None:
                    pre = check(init_vecs, orig_prompts, f"seed{seed}/pre")
                vecs = [v.detach() for v in inv.vecs]
                checks.append(check(vecs, check_prompts, f"seed{seed}/step{step:05d}"))
                eval_losses.append(eval_loss(vecs))
                check_seconds += time.perf_counter() - t0
                bar.set_postfix(seed=seed, step=step, hit=f"{checks[-1]['hit_rate']:.2f}", eval_loss=f"{eval_losses[-1]:.4f}")
            if step == max_step:
                break
            train_losses.append(inv.step(next(stream), gen))
            bar.update(1)
        learned = [v.detach().float().cpu().reshape(1, -1).contiguous() for v in inv.vecs]
        meta = {"token": cfg.token, "init_word": init_word, "steps": str(max_step), "seed": str(seed),
                "lr": str(cfg.inversion_lr), "optimizer": cfg.optimizer, "concept": cfg.concept,
                "attack": "inversion (eval.attack)", "settings_hash": keys[seed]}
        if multi:
            meta.update(model_family=family.name, layout="one (1, D) row per text encoder: " + ", ".join(keys_of))
        tensors = dict(zip(keys_of, learned)) if multi else {cfg.token: learned[0]}
        atomic_write_bytes(emb_dir / f"seed{seed}.safetensors", save(tensors, metadata=meta))
        norms = [{"init": float(v0.norm()), "learned": float(v.norm()), "moved": float((v[0] - v0.cpu()).norm())}
                 for v0, v in zip(init_vecs, learned)]
        atomic_write_json(cells_dir / f"seed{seed}.json", {
            "key": keys[seed], "seed": seed, "steps": list(cfg.eval_steps), "pre": pre,
            "hit_rate": [c["hit_rate"] for c in checks], "hits": [c["hits"] for c in checks], "n": [c["n"] for c in checks],
            "checks": checks, "eval_loss": eval_losses, "train_loss": train_losses,
            "embedding_norm": dict(zip(keys_of, norms)) if multi else norms[0],
            "seconds": round(time.perf_counter() - t_cell, 2), "check_seconds": round(check_seconds, 2),
            "device": str(device), "torch_threads": torch.get_num_threads()})
    bar.close()
    with torch.no_grad():
        for w, i, v in zip(weights, new_ids, init_vecs):
            w[i] = v
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not is_main:
        return None
    cells = {}
    for s in cfg.inversion_seeds:
        cells[s] = read_cell(cells_dir / f"seed{s}.json", keys[s])
        if cells[s] is None:
            raise UserError(f"seed {s} is missing from {cells_dir}; rerun the same command to finish it")
    return summarise(cfg, cells, settings, info, run, todo, target_judged, world, device, orig_prompts, check_prompts, seeds)


def summarise(cfg, cells: dict, settings: dict, info, run, todo, target_judged, world, device, orig_prompts,
              check_prompts, seeds) -> dict:
    """attacks.jsonl, artefacts.json and summary.json from the cell files (a resumed run equals an uninterrupted one)."""
    import torch

    out = run.out
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
        "token": cfg.token, "pre_hit_rate": first["pre"]["hit_rate"], "control_hit_rate": control,
        "steps": list(cfg.eval_steps), "hit_rate": [round(float(x), 6) for x in mean_rate],
        "hit_rate_std": [round(float(x), 6) for x in std_rate], "final_hit_rate": round(float(mean_rate[-1]), 6),
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
    summary["seconds"] = {"wall": round(time.perf_counter() - run.start, 1),
                          "cpu": round(time.process_time() - run.cpu_start, 1),
                          "computed_seeds": todo, "seeds": {str(s): c["seconds"] for s, c in cells.items()},
                          "note": "wall and cpu are this invocation's (main process); seeds' seconds as recorded when computed"}
    write_artefacts(out, {
        "attack": "inversion", "kind": "token_embeddings", "concept": cfg.concept,
        "learned_on": {"model": cfg.model, "base_model": info.base, "model_fingerprint": settings["model_fingerprint"]},
        "what": "one learned token embedding per inversion seed (safetensors, diffusers' textual-inversion layout)",
        **({"model_family": settings["model_family"], "encoders": settings["text_encoders"],
            "what": "one learned row per text encoder and inversion seed (safetensors: {encoder key: (1, D)}, the token "
                    "in its metadata; SDXL's keys clip_l / clip_g are the layout of SDXL textual-inversion files)"}
           if "text_encoders" in settings else {}),
        "token": cfg.token, "init_word": settings["init_word"], "steps": max(cfg.eval_steps),
        "embeddings": {str(s): f"embeddings/seed{s}.safetensors" for s in cells},
        "hit_rate_when_learned": {str(s): c["hit_rate"][-1] for s, c in cells.items()},
        "check": {"prompts": check_prompts, "original_prompts": orig_prompts, "seeds": seeds, "steps": cfg.steps,
                  "guidance": float(cfg.guidance), "scheduler": cfg.scheduler, "resolution": settings["resolution"]},
        "judge": settings["judge"], "settings_hash": settings_hash(settings),
    })
    atomic_write_json(out / "summary.json", summary)
    logger.info("inversion %s: hit rate %s at steps %s (pre %.0f%%)", cfg.concept,
                " ".join(f"{100 * r:.0f}±{100 * d:.0f}" for r, d in zip(mean_rate, std_rate)), list(cfg.eval_steps),
                100 * summary["pre_hit_rate"])
    return summary


def inversion_audit(model_dir: str, concept: str, output_dir: str, accelerator=None, **options) -> dict:
    """Concept inversion in-process (what ``python -m eval.attack --attack inversion`` runs); ``options`` are
    :class:`InversionConfig` fields."""
    return run_audit("inversion", model_dir, concept, output_dir, accelerator, **options)
