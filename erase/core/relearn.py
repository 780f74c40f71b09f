"""A weight-space adversary for the forget term (issue 17: erasures that relearning cannot undo quickly).

The relearning attack fine-tunes the erased model on the concept's own data: its first step moves the weights along
``−∇L_f`` (``L_f``: the concept's loss on forget data, :meth:`erase.core.adapter.Adapter.forget_loss`). An erasure whose
forget term ``F`` is already small *one such step later* does not come back after that step. So, as sharpness-aware
minimisation does for its own loss (Foret et al., 2021; for unlearning, Fan et al., 2025), the forget term's gradient
is taken at the weights a relearning step reaches:

    δ = −ρ · ‖θ‖ · ∇L_f(θ) / ‖∇L_f(θ)‖        (over the moved tensors, by default the targeted ones; ρ relative to their norm)
    the step's forget gradient = ∇F(θ + δ)

with ``∇L_f`` on the step's own forget batch, averaged over processes (every process moves by the same δ). The moved
tensors are copied before the move and written back after the forget term's backward, so the retain term and everything
after see ``θ`` bit for bit. Cost: one more forward and backward of the forget loss per forget step, and one copy of the
moved tensors.

Which weights the relearning step moves (``params``): ``targets`` (the erasure's own tensors), ``rest`` (every other
parameter of the model: the ones a relearning attack on all weights moves and the erasure never trains) or ``all``.
The forget term's gradient is always taken for the targets only. On the digits model, 25 steps of relearning on the
erasure's attention targets alone brought seven back on 0-2.5 % of images after the erasures, on the rest alone on
30-66 % (the model that never learned seven: 48 %): the concept returns through the weights the erasure never touched
(benchmarks/RESULTS.md, "Where relearning comes back through"). Moving ``rest`` needs those tensors whole on every
process: a sharded (FSDP) run refuses it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .inner import inner_products


#: which weights a relearning step moves (module docstring)
RELEARN_PARAMS = ("targets", "rest", "all")


def moved_tensors(ctx, plain, which: str) -> list[torch.nn.Parameter]:
    """The tensors a relearning step of kind ``which`` moves (:data:`RELEARN_PARAMS`)."""
    if which not in RELEARN_PARAMS:
        raise ValueError(f"relearn_params {which!r} is not one of {RELEARN_PARAMS}")
    if which == "targets":
        return list(ctx.params.values())
    if ctx.grad_sync is not None:
        raise ValueError(f"relearn_params {which!r} moves the untrained weights, which a sharded (FSDP) run splits "
                         "over its processes; use relearn_params 'targets' or a data-parallel launch")
    targeted = {id(p) for p in ctx.params.values()}
    return [p for p in plain.parameters() if which == "all" or id(p) not in targeted]


@contextmanager
def relearned(ctx, model, batch, radius: float, which: str = "targets"):
    """Inside, the tensors ``which`` names (:func:`moved_tensors`) are at ``θ + δ`` (module docstring); on exit they are
    ``θ`` again, with their ``requires_grad`` flags as they were. Yields the step length ``‖δ‖`` and the norm of
    ``∇L_f`` (for logs)."""
    plain = getattr(model, "module", model)  # autograd.grad through DDP would leave its reducer waiting for a backward
    params = moved_tensors(ctx, plain, which)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with ctx.accelerator.autocast():
            loss = ctx.adapter.forget_loss(plain, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
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
