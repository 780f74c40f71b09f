"""GA: gradient ascent on the forget set, ``min −L_f`` (Thudi et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..method import Method
from ..registry import register_method


@dataclass
class GAConfig:
    forget_bound: float | None = field(default=None, metadata={"help": "Clamp L_f at this value (bounded ascent)."})


@register_method
class GA(Method):
    name = "ga"
    config_cls = GAConfig
    uses_retain = False

    def loss(self, ctx, model, forget_batch, retain_batch):
        term = ctx.adapter.forget_term("ascent", model, forget_batch, bound=self.config.forget_bound)
        return term, {"forget_term": term.detach()}
