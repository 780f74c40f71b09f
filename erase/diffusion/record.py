"""Stage 6, the record: what the engine compares before a resume (:func:`run_settings`), the engine's own config
(:func:`engine_config`) and ``erase_config.json`` (:func:`build_record`: every setting, targets matched, what the trim
reset, the repair counters, the data, versions, seed, wall time; docs/CONTRACTS.md)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict

import torch

from erase.core import EngineConfig
from erase.export.folder import base_folder, base_identity, base_weights_sha256, versions


def engine_config(config) -> EngineConfig:
    """The shared loop's settings (erase.core.engine.EngineConfig); mixed precision defaults to accelerate's config."""
    t, o = config.train, config.objective
    return EngineConfig(
        output_dir=config.output.output_dir, targets=o.targets, exclude=o.exclude, max_train_steps=t.max_train_steps,
        train_batch_size=t.train_batch_size, lr=t.lr, optimizer=t.optimizer, lr_schedule=t.lr_scheduler,
        warmup_steps=t.lr_warmup_steps, max_grad_norm=t.max_grad_norm, gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), seed=t.seed,
        checkpointing_steps=t.checkpointing_steps, checkpoints_total_limit=t.checkpoints_total_limit,
        resume_from_checkpoint=t.resume_from_checkpoint, log_every=t.log_every,
    )


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def run_settings(config, data, tables) -> dict:
    """What, besides the method and engine settings, decides the result: recorded in every checkpoint and compared
    before a resume (its layout is a contract: checkpoints of earlier versions are compared against it)."""
    m, o, concepts = config.model, config.objective, config.concept_set
    return {"base": base_identity(m.pretrained_model_name_or_path, m.revision, m.variant), "concept": concepts.name,
            "concepts": [{"name": c.name, "forget_prompts": c.forget_prompts, "anchor_prompt": c.anchor_prompt} for c in concepts.concepts],
            "retain_prompts": tables.retain, "retain_loss": o.retain_loss, "distill_empty_fraction": o.distill_empty_fraction,
            "distill_prompts": concepts.retain_prompts if o.retain_loss != "data" else [],
            "data": {split: f"{_digest(mean)}-{_digest(std)}" for split, (mean, std) in sorted(data.latents.items())},
            "resolution": data.resolution, "negative_guidance": o.negative_guidance, "esd_ddim_steps": o.esd_ddim_steps,
            "esd_start_guidance": o.esd_start_guidance}


def build_record(config, family, method, engine: EngineConfig, result, adapter, data, accelerator, wall_seconds: float) -> dict:
    """``erase_config.json`` before the export adds its ``delta`` and ``export`` entries."""
    m, concepts, t = config.model, config.concept_set, config.train
    base = base_identity(m.pretrained_model_name_or_path, m.revision, m.variant)
    folder = base_folder(base)
    if folder is not None:  # what the export was made from, checked where a base is reloaded (erase.api.load_erased)
        base["weights_sha256"] = base_weights_sha256(folder)
    return {
        "pretrained_model_name_or_path": base.get("path") or base["hub_id"],
        "model_family": family.name,
        "pipeline_class": family.pipeline_class,
        "base_model": base,
        "concept": concepts.name,
        "concepts": [c.to_dict() for c in concepts.concepts],
        "concept_prompts": concepts.concepts[0].to_dict() if len(concepts) == 1 else concepts.to_dict(),
        "retain_prompts": concepts.retain_prompts,
        "method": config.method,
        "method_config": asdict(method.config),
        "settings": config.settings(),
        "engine": asdict(engine),
        "targets": result.targets,
        # which part of the denoiser the targets are (for an MMDiT: which text path was cut), as --list_targets says it
        "target_path": (family.preset_notes or {}).get(config.objective.targets),
        "prepare": result.prepare_info,
        "history": result.history,
        "repair": result.method_summary,
        "resumed_from": result.resumed_from,
        "data": {**data.describe(), "retain_loss": adapter.retain_mode},
        "adapter": adapter.extra_state(),
        "num_processes": accelerator.num_processes,
        # an FSDP launch: the untrained weights were sharded over the processes, the targets whole on each (None: DDP / one)
        "sharding": result.sharding,
        "global_batch_size": t.train_batch_size * accelerator.num_processes * t.gradient_accumulation_steps,
        "seed": t.seed,
        "wall_seconds": wall_seconds,
        "train_seconds": result.wall_seconds,
        "versions": versions(),
    }
