"""Relearning attack: does the concept come back after a little plain fine-tuning on a few images of it?

    python -m eval.attack --attack relearn --model M --concept three --output_dir DIR

The attacked UNet (an erase/sd.py output's ``unet/`` over its base pipeline, or a base pipeline itself) is
fine-tuned on ``num_target_images`` images of the concept (drawn by the *base* model from the preset's generation
prompts, image i with seed ``target_seed + i``, or read from ``--target_images DIR``) with the plain noise-prediction
loss of Ho et al. (2020, eq. 14): MSE to the noise (or to v, per the scheduler's ``prediction_type``), timesteps
uniform, latents sampled from the VAE posterior, each image conditioned on its own prompt. Adam, lr 1e-4, batch 8,
on every UNet parameter (``all``) and, separately, only on the erasure method's own targets (``targets``, read from
``erase_config.json``), over several relearning seeds. At each of ``eval_steps`` a check draws ``num_images``
images from the forget prompts and the concept's judge says which show the concept: the hit rate.

Outputs in ``output_dir``: ``cells/<params>-seed<s>.json`` (one per finished (parameter set, seed) cell, written
atomically: a killed run redoes only unfinished cells), ``attacks.jsonl`` (one line per parameter set, seed and
checked step), ``summary.json`` (``relearn`` and ``relearn_targets`` curves: mean and std of the hit rate over seeds,
the first step whose mean passes 50 %, per-seed values; every setting), ``target/`` (the relearning images).

Step 0 is the same model for every cell, so it is checked once and shared. Std is over relearning seeds (ddof 1).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from erase.utils.errors import UserError
from erase.utils.files import atomic_write_json, atomic_write_text, settings_hash
from eval.attack.registry import load_judge, register_attack, run_audit
from eval.attack.utils.checks import PASS_RATE, check_seeds, draw, first_step_over, judge_images, save_pngs
from eval.attack.utils.config import ConceptImagesConfig, cast_fields, int_list, str_list
from eval.attack.utils.images import concept_images, describe_images
from eval.attack.utils.losses import Denoising, FixedBatch, endless_batches
from eval.attack.utils.models import load_attacked, pipeline_text, resolution_of, set_denoiser
from eval.attack.utils.records import begin, prepare_cells, read_cell, versions

logger = logging.getLogger(__name__)

PARAM_SETS = ("all", "targets")
SUMMARY_KEYS = {"all": "relearn", "targets": "relearn_targets"}


@dataclass
class RelearnConfig(ConceptImagesConfig):
    relearn_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the relearning"})
    relearn_batch_size: int = field(default=8, metadata={"help": "images per relearning step (reshuffled each pass)"})
    relearn_params: str | None = field(default=None, metadata={
        "help": "parameter sets to relearn, comma-separated: all (every UNet parameter), targets (the erasure's own "
                "targets) (default: all,targets; targets is skipped on a model with no erase_config.json unless "
                "--targets is given)"})
    relearn_seeds: tuple = field(default=(0, 1, 2), metadata={"help": "relearning seeds (data order, noise, timesteps)"})
    eval_steps: tuple = field(default=(0, 10, 25, 50, 100), metadata={
        "help": "relearning steps at which images are checked; the largest is the number of steps"})
    targets: str | None = field(default=None, metadata={
        "help": "preset or regex of the 'targets' parameter set (default: the erase config's engine.targets)"})
    exclude: str | None = field(default=None, metadata={
        "help": "preset or regex left out of 'targets' (default: the erase config's engine.exclude)"})

    def __post_init__(self):
        super().__post_init__()
        cast_fields(self, {"relearn_lr": float, "relearn_batch_size": int}, {"relearn_batch_size": 1})
        from erase.utils.checks import check_numbers

        check_numbers({"relearn_lr": self.relearn_lr})
        self.params_explicit = self.relearn_params is not None
        self.relearn_params = str_list(self.relearn_params or PARAM_SETS, "relearn_params", PARAM_SETS)
        self.relearn_seeds = int_list(self.relearn_seeds, "relearn_seeds")
        self.eval_steps = tuple(sorted(int_list(self.eval_steps, "eval_steps", minimum=0)))


# ----------------------------------------------------------------------------------------------- pieces
def targets_spec(cfg: RelearnConfig, erase_config: dict | None) -> tuple[str | None, str | None, str]:
    """(targets, exclude, where they came from) for the 'targets' parameter set."""
    if cfg.targets:
        return cfg.targets, cfg.exclude, "--targets"
    if erase_config is None:
        return None, None, "none"
    engine, settings = erase_config.get("engine") or {}, erase_config.get("settings") or {}
    for where, table in (("erase_config.json engine", engine), ("erase_config.json settings", settings)):
        if table.get("targets"):
            return table["targets"], cfg.exclude or table.get("exclude"), where
    from erase.diffusion.adapter import DiffusionAdapter

    return DiffusionAdapter.default_targets, cfg.exclude, "the diffusion adapter's default (not in erase_config.json)"


# ----------------------------------------------------------------------------------------------- the attack
@register_attack("relearn", RelearnConfig, help="fine-tune the attacked UNet on a few images of the concept; "
                                                "hit rate of the judge over relearning steps")
def run_relearn(cfg: RelearnConfig, accelerator=None) -> dict | None:
    import torch
    from tqdm.auto import tqdm

    from erase.core.targets import TargetError, describe, select_parameters
    from erase.diffusion.generate import model_fingerprint

    run = begin(cfg, accelerator)
    start, cpu_start, info, prompts = run.start, run.cpu_start, run.info, run.prompts
    rank, world, is_main, device, out = run.rank, run.world, run.is_main, run.device, run.out
    spec, exclude, spec_source = targets_spec(cfg, info.erase_config)
    param_sets, skipped = list(cfg.relearn_params), None
    if "targets" in param_sets and spec is None:
        if cfg.params_explicit:
            raise UserError(f"--relearn_params targets: {cfg.model} has no erase_config.json naming targets; "
                            "give --targets PRESET_OR_REGEX")
        param_sets.remove("targets")
        skipped = "the model has no erase_config.json naming targets and no --targets was given"
        logger.info("targets-only relearning skipped: %s", skipped)

    judge = load_judge(cfg.concept)
    pipe, unet = load_attacked(info, cfg.scheduler, device)
    from erase.diffusion.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    selections = {"all": dict(unet.named_parameters())}
    if "targets" in param_sets:
        try:  # the family's presets (an MMDiT's text paths, SDXL's noxattn), as erase/sd.py named them
            selections["targets"] = select_parameters(unet, spec, exclude, family.target_presets)
        except TargetError as e:
            raise UserError(f"targets from {spec_source}: {e}") from None
    resolution = resolution_of(pipe)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    # 1. Images of the concept, drawn by the base model (the pipeline still holds the base UNet here).
    concept = concept_images(cfg, run, pipe, judge, resolution, accelerator)
    images, gen_kw, target_judged, mean, std = concept.images, concept.generation, concept.judged, concept.mean, concept.std
    # Each image's prompt, encoded as the model's family conditions its denoiser (SDXL: both encoders, pooled, time
    # ids; SD3 / Flux: CLIP and T5 tokens, pooled projections), and the family's objective (noise or flow velocity).
    family, text = pipeline_text(pipe)
    cond = text.encode(images.prompts, device).float()
    set_denoiser(pipe, unet)
    unet.train()
    initial = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    mean, std = mean.to(device), std.to(device)
    den = Denoising.of_pipeline(pipe, text, resolution, tuple(mean.shape[1:]), unet)
    n = len(images.files)

    # A fixed batch of noisy latents: the eval loss at every check is comparable (the training loss is noise-dominated).
    fixed = FixedBatch(mean, std, den, device)

    def eval_loss() -> float:
        return fixed.loss(lambda noisy, t, idx: den.predict(unet, noisy, t, cond[idx.to(device)]), cfg.relearn_batch_size)

    check_prompts = [prompts.forget[i % len(prompts.forget)] for i in range(cfg.num_images)]
    seeds = check_seeds(cfg.eval_seed, cfg.num_images)

    def check(folder: str) -> dict:
        unet.eval()
        pixels = draw(pipe, check_prompts, seeds, cfg.steps, float(cfg.guidance), resolution,
                      cfg.generation_batch_size)
        unet.train()
        if cfg.save_images:
            save_pngs(pixels, out / "images" / folder)
        return judge_images(judge, pixels, check_prompts)

    # 2. Settings and resume keys: a cell is reused only if everything that decides it is unchanged.
    settings = {
        "attack": "relearn", "model": cfg.model, "base_model": info.base, "erased": info.erased,
        "model_fingerprint": model_fingerprint(cfg.model), "base_fingerprint": model_fingerprint(info.base),
        "erase_config": info.erase_config, "concept": cfg.concept, "prompt_source": prompts.source,
        "forget_prompts": prompts.forget, "generation_prompts": prompts.generation,
        "target_images": describe_images(cfg, images, gen_kw),
        "num_target_images": n, "target_seed": None if cfg.target_images else cfg.target_seed,
        "optimizer": {"name": "adam", "lr": cfg.relearn_lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        "batch_size": cfg.relearn_batch_size,
        "loss": f"MSE to the {den.prediction_type} target (plain noise prediction), timesteps uniform in "
                f"[0, {den.num_t}), latents = VAE posterior sample x {den.scale:.5g}, each image with its own prompt, no dropout"
                if not den.flow else den.describe(family.denoiser) + ", each image with its own prompt, no dropout",
        "eval_loss": fixed.describe(),
        "steps": list(cfg.eval_steps), "relearn_seeds": list(cfg.relearn_seeds), "relearn_params": param_sets,
        "targets": {"spec": spec, "exclude": exclude, "source": spec_source}, "generation": cfg.generation(),
        "resolution": resolution, "judge": {"concept": cfg.concept, **judge.settings},
        "hit_rate": "share of a check's images the judge flags as the concept",
        "first_step_over_50": f"first checked step whose mean hit rate over seeds is > {PASS_RATE}; null if none",
        "hit_rate_std": "sample standard deviation over relearning seeds (ddof 1; 0 with one seed)",
    }
    common = {k: v for k, v in settings.items() if k not in ("relearn_seeds", "relearn_params", "steps")}
    pre_key = settings_hash({**{k: v for k, v in common.items() if k not in ("optimizer", "batch_size", "targets")},
                             "what": "step 0"})
    cell_names = {(p, s): f"{p}-seed{s}" for p in param_sets for s in cfg.relearn_seeds}
    keys = {c: settings_hash({**common, "steps": list(cfg.eval_steps), "param_set": c[0], "seed": c[1],
                              "params": sorted(selections[c[0]]) if c[0] != "all" else "all"}) for c in cell_names}
    cells_dir = out / "cells"
    prepare_cells(cells_dir, is_main)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    mine = list(cell_names)[rank::world]
    done = {c: read_cell(cells_dir / f"{cell_names[c]}.json", keys[c]) for c in mine}
    todo = [c for c in mine if done[c] is None]
    if len(todo) < len(mine):
        logger.info("process %d: %d of %d cell(s) already finished with these settings, skipped", rank,
                    len(mine) - len(todo), len(mine))
    pre = next((c["checks"][0] for c in done.values() if c and c.get("pre_key") == pre_key and c["steps"][0] == 0), None)
    pre_loss = next((c["eval_loss"][0] for c in done.values() if c and c.get("pre_key") == pre_key and c["steps"][0] == 0),
                    None)

    # 3. The cells: restore the attacked weights, relearn with a fresh Adam, check at each eval step.
    max_step = max(cfg.eval_steps)
    bar = tqdm(total=len(todo) * max_step, desc="relearn", unit="step",
               disable=accelerator is not None and not accelerator.is_local_main_process)
    for cell in todo:
        param_set, seed = cell
        t_cell = time.perf_counter()
        unet.load_state_dict(initial)
        unet.requires_grad_(False)
        params = list(selections[param_set].values())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=cfg.relearn_lr)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        stream = endless_batches(n, cfg.relearn_batch_size, gen)
        checks, eval_losses, train_losses, check_seconds = [], [], [], 0.0
        for step in range(max_step + 1):
            if step in cfg.eval_steps:
                t0 = time.perf_counter()
                if step == 0 and pre is not None:
                    checks.append(pre)
                    eval_losses.append(pre_loss)
                else:
                    checks.append(check(f"{cell_names[cell]}/step{step:05d}" if step else "step00000"))
                    eval_losses.append(eval_loss())
                    if step == 0:
                        pre, pre_loss = checks[-1], eval_losses[-1]
                check_seconds += time.perf_counter() - t0
                bar.set_postfix(cell=cell_names[cell], step=step, hit=f"{checks[-1]['hit_rate']:.2f}",
                                eval_loss=f"{eval_losses[-1]:.4f}")
            if step == max_step:
                break
            idx = next(stream)
            z, noise, t = den.sample(mean, std, idx, gen)
            loss = den.loss(unet, z, noise, t, cond[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_losses.append(float(loss.item()))
            bar.update(1)
        unet.requires_grad_(False)
        record = {
            "key": keys[cell], "pre_key": pre_key, "param_set": param_set, "seed": seed, "steps": list(cfg.eval_steps),
            "hit_rate": [c["hit_rate"] for c in checks], "hits": [c["hits"] for c in checks],
            "n": [c["n"] for c in checks], "checks": checks, "eval_loss": eval_losses, "train_loss": train_losses,
            "params": {"num_tensors": len(params), "num_parameters": int(sum(p.numel() for p in params))},
            "seconds": round(time.perf_counter() - t_cell, 2), "check_seconds": round(check_seconds, 2),
            "device": str(device), "torch_threads": torch.get_num_threads(),
        }
        atomic_write_json(cells_dir / f"{cell_names[cell]}.json", record)
        done[cell] = record
    bar.close()
    unet.load_state_dict(initial)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not is_main:
        return None

    # 4. Summary (main process): every cell from its file, so a resumed run equals an uninterrupted one.
    cells = {}
    for c, name in cell_names.items():
        cells[c] = read_cell(cells_dir / f"{name}.json", keys[c])
        if cells[c] is None:
            raise UserError(f"cell {name} is missing from {cells_dir}; rerun the same command to finish it")
    lines = []
    for (param_set, seed), cell in cells.items():
        for i, step in enumerate(cell["steps"]):
            upto = cell["train_loss"][:step]
            lines.append({"attack": "relearn", "param_set": param_set, "seed": seed, "step": step,
                          "hit_rate": cell["hit_rate"][i], "hits": cell["hits"][i], "n": cell["n"][i],
                          "eval_loss": cell["eval_loss"][i],
                          "train_loss_last10": float(np.mean(upto[-10:])) if upto else None,
                          "per_prompt": cell["checks"][i]["per_prompt"], "labels": cell["checks"][i]["labels"]})
    atomic_write_text(out / "attacks.jsonl", "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))

    first_cell = cells[next(iter(cells))]
    summary = {"attack": "relearn", "model": cfg.model, "base_model": info.base, "erased": info.erased,
               "concept": cfg.concept, "pre_hit_rate": first_cell["hit_rate"][0] if cfg.eval_steps[0] == 0 else None}
    for param_set in PARAM_SETS:
        key = SUMMARY_KEYS[param_set]
        if param_set not in param_sets:
            summary[key] = None
            continue
        mine = [cells[(param_set, s)] for s in cfg.relearn_seeds]
        rates = np.array([c["hit_rate"] for c in mine], dtype=float)
        mean_rate = rates.mean(0)
        std_rate = rates.std(0, ddof=1) if len(mine) > 1 else np.zeros_like(mean_rate)
        summary[key] = {
            "steps": list(cfg.eval_steps), "hit_rate": [round(float(x), 6) for x in mean_rate],
            "hit_rate_std": [round(float(x), 6) for x in std_rate],
            "first_step_over_50": first_step_over(cfg.eval_steps, mean_rate),
            "eval_loss": [round(float(x), 6) for x in np.mean([c["eval_loss"] for c in mine], 0)],
            "params": {**mine[0]["params"], **({"spec": spec, "exclude": exclude, "source": spec_source}
                                               if param_set == "targets" else {"spec": "all"})},
            "per_seed": {str(c["seed"]): {"hit_rate": c["hit_rate"], "hits": c["hits"], "n": c["n"],
                                          "first_step_over_50": first_step_over(c["steps"], c["hit_rate"]),
                                          "eval_loss": c["eval_loss"], "seconds": c["seconds"]} for c in mine},
        }
    if skipped:
        summary["relearn_targets_skipped"] = skipped
    if "targets" in param_sets:
        summary["relearn_targets"]["params"]["tensors"] = sorted(describe(selections["targets"])["tensors"])
    # What a table shows (eval.digits bench --attacks): the mean hit rate at each checked step, per parameter set.
    summary["headline"] = {f"{SUMMARY_KEYS[p]}_{step}": rate for p in param_sets
                           for step, rate in zip(summary[SUMMARY_KEYS[p]]["steps"], summary[SUMMARY_KEYS[p]]["hit_rate"])}
    summary["target_images_judged"] = {k: target_judged[k] for k in ("hits", "n", "hit_rate", "labels")}
    summary["settings"] = {**settings, "num_processes": world, "device": str(device),
                           "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    summary["versions"] = versions()
    summary["seconds"] = {"wall": round(time.perf_counter() - start, 1), "cpu": round(time.process_time() - cpu_start, 1),
                          "computed_cells": [cell_names[c] for c in todo],
                          "cells": {cell_names[c]: cells[c]["seconds"] for c in cells},
                          "note": "wall and cpu are this invocation's (main process); cells' seconds as recorded when computed"}
    atomic_write_json(out / "summary.json", summary)
    for param_set in param_sets:
        s = summary[SUMMARY_KEYS[param_set]]
        logger.info("relearn %s: hit rate %s at steps %s; first step over 50%%: %s", param_set,
                    " ".join(f"{100 * r:.0f}±{100 * d:.0f}" for r, d in zip(s["hit_rate"], s["hit_rate_std"])),
                    s["steps"], s["first_step_over_50"])
    return summary


def relearn_audit(model_dir: str, concept: str, output_dir: str, accelerator=None, **options) -> dict:
    """The relearning audit in-process (what ``python -m eval.attack --attack relearn`` runs); ``options`` are
    :class:`RelearnConfig` fields, e.g. ``num_images=40, relearn_seeds=(0, 1, 2), eval_steps=(0, 10, 25)``."""
    return run_audit("relearn", model_dir, concept, output_dir, accelerator, **options)
