"""Retrain: the exact-unlearning oracle, trained from a fresh initialisation on the retain set only."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..method import Method
from ..registry import register_method


@dataclass
class RetrainConfig:
    init_seed: int = field(default=0, metadata={"help": "Seed of the fresh initialisation."})


@register_method
class Retrain(Method):
    name = "retrain"
    config_cls = RetrainConfig
    tasks = ("classify", "generic")
    uses_forget = False

    def prepare(self, ctx) -> dict:
        state = torch.random.get_rng_state()
        torch.manual_seed(self.config.init_seed)
        reset = 0
        for module in ctx.model.modules():
            if hasattr(module, "reset_parameters") and any(p.requires_grad for p in module.parameters(recurse=False)):
                module.reset_parameters()
                reset += 1
        if hasattr(ctx.model, "reset_running_stats"):
            ctx.model.reset_running_stats()
        torch.random.set_rng_state(state)
        return {"modules_reset": reset}

    def loss(self, ctx, model, forget_batch, retain_batch):
        lr = ctx.adapter.retain_loss(model, retain_batch)
        return lr, {"retain_loss": lr.detach()}
