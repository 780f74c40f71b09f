"""FT: fine-tune on the retain set only (catastrophic forgetting of D_f; Warnecke et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from ..method import Method
from ..registry import register_method


@dataclass
class FTConfig:
    pass


@register_method
class FT(Method):
    name = "ft"
    config_cls = FTConfig
    uses_forget = False

    def loss(self, ctx, model, forget_batch, retain_batch):
        lr = ctx.adapter.retain_loss(model, retain_batch)
        return lr, {"retain_loss": lr.detach()}
