"""Saliency scores on forget data.

* ``snip``: connection sensitivity (Lee et al., 2019; Scissorhands eq. 2): ``S = |θ ⊙ Σ_b |∇θ L_f(b)||``.
* ``grad``: gradient magnitude (SalUn, Fan et al., 2024): ``S = |Σ_b ∇θ L_f(b)|``.

Gradients are folded into one accumulator per tensor by a post-accumulate hook and freed at once, so the peak is
parameters + accumulators + one gradient, never a second full set of gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn as nn

KINDS = ("snip", "grad")


def saliency_scores(
    loss_fn: Callable[[object], torch.Tensor],
    batches: Iterator,
    params: Mapping[str, nn.Parameter],
    num_batches: int = 1,
    kind: str = "snip",
    backward: Callable[[torch.Tensor], None] | None = None,
    reduce_grad: Callable[[torch.Tensor], torch.Tensor] | None = None,
    model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Scores (float32, shaped like each parameter) from ``num_batches`` fresh draws of ``batches``.

    ``backward`` defaults to ``loss.backward()`` (pass ``accelerator.backward`` for mixed precision);
    ``reduce_grad`` averages each batch's gradient across processes before it is folded in (``None`` on one
    process), so a batch is the global batch and the scores, hence the selection, do not depend on the process count.
    With ``model`` given, its other parameters get no gradient during the pass; ``requires_grad`` flags are restored.
    """
    if kind not in KINDS:
        raise ValueError(f"saliency kind {kind!r} is not one of {KINDS}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    wanted = {id(p) for p in params.values()}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    by_id = {id(p): acc[n] for n, p in params.items()}
    backward = backward or (lambda loss: loss.backward())

    def fold(p: torch.Tensor) -> None:
        g = p.grad.float()
        if reduce_grad is not None:
            g = reduce_grad(g)
        a = by_id[id(p)]
        a.add_(g.abs() if kind == "snip" else g)
        p.grad = None

    everything = list(model.parameters()) if model is not None else list(params.values())
    flags = {id(p): p.requires_grad for p in everything}
    handles = []
    try:
        for p in everything:
            p.requires_grad_(id(p) in wanted)
        handles = [p.register_post_accumulate_grad_hook(fold) for p in params.values()]
        for _ in range(num_batches):
            loss = loss_fn(next(batches))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"forget loss is {loss.item()} during saliency")
            backward(loss)
    finally:
        for h in handles:
            h.remove()
        for p in everything:
            p.requires_grad_(flags[id(p)])
            if id(p) in wanted:
                p.grad = None
    for n, p in params.items():
        a = acc[n]
        if kind == "snip":
            a.mul_(p.detach().float()).abs_()
        else:
            a.abs_()
        acc[n] = a
    return acc

