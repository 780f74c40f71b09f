"""ESD (Gandikota et al., ICCV 2023): erase by negative guidance.

Each step samples ``x_t`` from the frozen model under the concept prompt and regresses
``ε_θ(x_t, c)`` onto ``ε*(x_t) − η (ε*(x_t, c) − ε*(x_t))`` from the frozen base (the adapter's ``esd`` term).
ESD-x: ``--targets xattn``; ESD-u: ``--targets noxattn``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..method import Method
from ..registry import register_method


@dataclass
class ESDConfig:
    negative_guidance: float = field(default=1.0, metadata={"help": "η, the strength of the negative guidance."})


@register_method
class ESD(Method):
    name = "esd"
    config_cls = ESDConfig
    tasks = ("diffusion",)
    uses_retain = False

    def loss(self, ctx, model, forget_batch, retain_batch):
        term = ctx.adapter.forget_term("esd", model, forget_batch, eta=self.config.negative_guidance)
        return term, {"forget_term": term.detach()}
