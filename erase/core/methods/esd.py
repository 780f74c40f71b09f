"""ESD (Gandikota et al., ICCV 2023): erase by negative guidance.

Each step samples ``x_t`` from the frozen model under the concept prompt and regresses
``ε_θ(x_t, c)`` onto ``ε*(x_t) − η (ε*(x_t, c) − ε*(x_t))`` from the frozen base (:func:`esd_term`, also the
``esd`` forget term of other methods). ESD-x: ``--targets xattn``; ESD-u: ``--targets noxattn``.

The objective lives here; what depends on the scheduler and the model family stays behind the adapter
(``sample_partial``: the partial DDIM trajectory; ``predict``: the denoiser with the family's conditioning;
``frozen``: the base), so this file imports no diffusers. For a v-prediction model every prediction is a v and the
guided target is the guided v (guidance is linear in the model output either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
        term = esd_term(ctx.adapter, model, forget_batch, self.config.negative_guidance)
        return term, {"forget_term": term.detach()}


def esd_term(adapter, model, batch, eta: float) -> torch.Tensor:
    """‖ε_θ(x_t, c) − (ε*(x_t) − η(ε*(x_t, c) − ε*(x_t)))‖² at the adapter's ``sample_partial`` start point."""
    if getattr(adapter, "frozen", None) is None:
        raise ValueError("the esd term needs the frozen base model (built when the method or forget term is esd)")
    x, t, cond, uncond = adapter.sample_partial(batch)
    with torch.no_grad():
        e0 = adapter.predict(adapter.frozen, x, t, uncond).float()
        ep = adapter.predict(adapter.frozen, x, t, cond).float()
    pred = adapter.predict(model, x, t, cond)
    return F.mse_loss(pred.float(), e0 - eta * (ep - e0))
