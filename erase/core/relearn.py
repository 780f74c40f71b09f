"""A weight-space adversary for the forget term (issue 17: erasures that relearning cannot undo quickly).

The relearning attack fine-tunes the erased model on the concept's own data: its first step moves the weights along
``−∇L_f`` (``L_f``: the concept's loss on forget data, :meth:`erase.core.adapter.Adapter.forget_loss`). An erasure whose
forget term ``F`` is already small *one such step later* does not come back after that step. So, as sharpness-aware
minimisation does for its own loss (Foret et al., 2021; for unlearning, Fan et al., 2025), the forget term's gradient
is taken at the weights a relearning step reaches:

    δ = −ρ · ‖θ‖ · ∇L_f(θ) / ‖∇L_f(θ)‖        (over the targeted tensors; ρ relative to their norm)
    the step's forget gradient = ∇F(θ + δ)

with ``∇L_f`` on the step's own forget batch, averaged over processes (every process moves by the same δ). The targets
are copied before the move and written back after the forget term's backward, so the retain term and everything after
see ``θ`` bit for bit. Cost: one more forward and backward of the forget loss per forget step, and one copy of the
targeted tensors.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .inner import inner_products


@contextmanager
def relearned(ctx, model, batch, radius: float):
    """Inside, the targeted tensors of ``ctx`` are at ``θ + δ`` (module docstring); on exit they are ``θ`` again.
    Yields the step length ``‖δ‖`` and the norm of ``∇L_f`` (for logs)."""
    params = list(ctx.params.values())
    plain = getattr(model, "module", model)  # autograd.grad through DDP would leave its reducer waiting for a backward
    with ctx.accelerator.autocast():
        loss = ctx.adapter.forget_loss(plain, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [ctx.reduce_mean(g.detach().float()) if g is not None else torch.zeros_like(p, dtype=torch.float32)
             for g, p in zip(grads, params)]
    g_sq, w_sq = inner_products([grads, [p.detach() for p in params]], [(0, 0), (1, 1)]).tolist()
    g_norm, w_norm = g_sq ** 0.5, w_sq ** 0.5  # float64 sums of exact products, no float64 copy of a tensor
    saved = [p.detach().clone() for p in params]
    step = radius * w_norm / g_norm if g_norm > 0 else 0.0
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_((g * step).to(p.dtype))
        yield {"relearn_step": step * g_norm, "relearn_grad_norm": g_norm}
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
