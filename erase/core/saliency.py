"""Saliency scores on forget data.

* ``snip``: connection sensitivity (Lee et al., 2019; Scissorhands eq. 2): ``S = |θ ⊙ Σ_b |∇θ L_f(b)||``.
* ``grad``: gradient magnitude (SalUn, Fan et al., 2024): ``S = |Σ_b ∇θ L_f(b)|``.

Gradients are folded into one accumulator per tensor by a post-accumulate hook and freed at once, so the peak is
parameters + accumulators + one gradient, never a second full set of gradients: a tensor's first gradient becomes
its accumulator, and each gradient is scaled, made absolute and checked in place. Gradients already present on the
parameters are set aside for the pass and put back after. Under fp16 the backward goes through the grad scaler;
``grad_scale`` divides it out. A non-finite folded gradient (an fp16 overflow, a broken loss) stops the pass with
a :class:`FloatingPointError` naming the batch and the tensors: an infinite score would be ranked first and a NaN
cannot be ranked, and the batch cannot be taken back out of the accumulators once partly folded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn as nn

from .norms import frozen_norm_stats

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
    grad_scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """Scores (float32, shaped like each parameter) from ``num_batches`` fresh draws of ``batches``.

    ``backward`` defaults to ``loss.backward()`` (pass ``accelerator.backward`` for mixed precision);
    ``reduce_grad`` averages each batch's gradient across processes before it is folded in (``None`` on one
    process), so a batch is the global batch and the scores, hence the selection, do not depend on the process count.
    With ``model`` given, its other parameters get no gradient during the pass; ``requires_grad`` flags are restored,
    and its BatchNorm-style layers run in eval mode (:func:`frozen_norm_stats`: no running-statistics update).
    ``grad_scale``: the loss scale ``backward`` applies (fp16 grad scaler), divided out of every gradient.
    """
    if kind not in KINDS:
        raise ValueError(f"saliency kind {kind!r} is not one of {KINDS}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    wanted = {id(p) for p in params.values()}
    acc: dict[str, torch.Tensor] = {}  # filled by the first gradient of each tensor (no zero-filled set up front)
    name_of = {id(p): n for n, p in params.items()}
    backward = backward or (lambda loss: loss.backward())
    bad: list[str] = []

    def fold(p: torch.Tensor) -> None:
        # p.grad is handed over (set to None below), so the gradient is transformed in place: no temporary
        g = p.grad if p.grad.dtype == torch.float32 and p.grad.is_contiguous() else p.grad.float().contiguous()
        p.grad = None
        if reduce_grad is not None:
            g = reduce_grad(g)
        if grad_scale is not None and grad_scale != 1.0:
            g.div_(grad_scale)
        if kind == "snip":
            g.abs_()
        low, high = torch.aminmax(g)  # every entry finite iff both ends are (NaN propagates): one reduction
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            bad.append(name_of[id(p)])
            return
        name = name_of[id(p)]
        if name in acc:
            acc[name].add_(g)
        else:
            acc[name] = g

    everything = list(model.parameters()) if model is not None else list(params.values())
    flags = {id(p): p.requires_grad for p in everything}
    stashed = {id(p): p.grad for p in params.values()}
    handles = []
    try:
        for p in params.values():
            p.grad = None
        for p in everything:
            p.requires_grad_(id(p) in wanted)
        handles = [p.register_post_accumulate_grad_hook(fold) for p in params.values()]
        with frozen_norm_stats(model):
            for i in range(num_batches):
                draw = getattr(batches, "draws", None)
                loss = loss_fn(next(batches))
                where = f"saliency batch {i + 1} of {num_batches}" + (f" (draw {draw} of the saliency stream)" if draw is not None else "")
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"forget loss is {loss.item()} in {where}")
                backward(loss)
                if bad:
                    scaled = f" under the fp16 loss scale {grad_scale:g} (bf16 or full precision avoids the overflow)" if grad_scale not in (None, 1.0) else ""
                    raise FloatingPointError(f"{where} gave a non-finite gradient{scaled} in {len(bad)} tensor(s), first {bad[0]}")
    finally:
        for h in handles:
            h.remove()
        for p in everything:
            p.requires_grad_(flags[id(p)])
            if id(p) in wanted:
                p.grad = stashed[id(p)]
    out = {}
    for n, p in params.items():  # in the order of ``params``; a tensor the loss does not reach scores 0
        a = acc.pop(n, None)
        if a is None:
            a = torch.zeros_like(p, dtype=torch.float32)
        elif kind == "snip":
            a.mul_(p.detach()).abs_()
        else:
            a.abs_()
        out[n] = a
    return out
