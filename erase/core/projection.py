"""Repair-time gradient projection (GEM, Lopez-Paz & Ranzato 2017; Scissorhands eq. 4).

Given the step gradient ``g`` and memory gradients ``g_o^j = ∇(−L_f)`` on forget memory batches, replace ``g``
by the closest ``g̃`` with ``⟨g̃, g_o^j⟩ ≥ 0`` for every j, so that a descent step on ``g̃`` does not lower
the forget loss to first order. Primal ``min ½‖g̃ − g‖²  s.t. G g̃ ≥ 0`` has the dual
``min_v ½ vᵀ(GGᵀ)v + (Gg)ᵀv,  v ≥ 0`` and ``g̃ = g + Gᵀv``: closed form for one memory, coordinate descent
on the m×m dual for several (no quadprog). ``margin`` is GEM's memory strength exactly as in its reference
``project2cone2``: the dual is solved under ``v ≥ margin`` (quadprog ``h = margin``), not shifted afterwards; for one
memory ``v = max(margin, −⟨g, g_o⟩/‖g_o‖²)``. 0 by default (a positive margin pushes beyond the boundary at every
violated step). GEM's ``eps·I`` added to ``GGᵀ`` only keeps quadprog's matrix positive definite; it is not needed here.
As in GEM, nothing happens when no constraint is violated.

Everything works on lists of per-tensor gradients. Inner products come from :mod:`.inner` (float64 sums of exact
float64 products, without a float64 copy of any tensor), and the update is applied in place. Call it after gradient
synchronisation (DDP): all ranks then hold the same ``g`` and ``g_o`` and take the same projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .inner import gram_matrix, inner_products

Grads = Sequence[torch.Tensor | None]


def dot(a: Grads, b: Grads) -> float:
    """``Σ_t ⟨a_t, b_t⟩`` in float64 (:func:`inner_products`)."""
    return float(inner_products([a, b], [(0, 1)])[0])


def solve_dual(gram: torch.Tensor, lin: torch.Tensor, lower: float = 0.0, iters: int = 10000, tol: float = 1e-12) -> torch.Tensor:
    """``argmin_{v ≥ lower} ½ vᵀ gram v + linᵀ v`` by cyclic coordinate descent (exact for one memory)."""
    gram, lin = gram.double().cpu(), lin.double().cpu()
    m = lin.numel()
    v = torch.full((m,), float(lower), dtype=torch.float64)
    diag = torch.diagonal(gram)
    for _ in range(iters):
        biggest = 0.0
        for i in range(m):
            if diag[i] <= 0:
                continue
            new = max(float(lower), float(v[i] - (gram[i] @ v + lin[i]) / diag[i]))
            biggest = max(biggest, abs(new - float(v[i])))
            v[i] = new
        if biggest <= tol * (1.0 + float(v.abs().max())):
            break
    return v


def dual_coefficients(dots: torch.Tensor, gram: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """GEM's ``v`` (float64, on the CPU) for the dot products ``dots[j] = ⟨g, g_o^j⟩`` and the memories' Gram matrix."""
    dots, gram = dots.double().cpu(), gram.double().cpu()
    if dots.numel() == 1:
        return torch.clamp(-dots / gram[0, 0].clamp_min(1e-30), min=float(margin))
    return solve_dual(gram, dots, lower=float(margin))


@torch.no_grad()
def add_memories_(tensors: Grads, memories: Sequence[Grads], coefs: Sequence[float]) -> None:
    """``tensors += Σ_j coefs[j] · memories[j]``, in place, tensor by tensor (zero coefficients skipped)."""
    for mem, coef in zip(memories, coefs):
        if coef == 0.0:
            continue
        for t, o in zip(tensors, mem):
            if t is not None and o is not None:
                t.add_(o.to(t.dtype), alpha=coef)


@torch.no_grad()
def project_(grads: Grads, memories: Sequence[Grads], margin: float = 0.0, dots: torch.Tensor | None = None,
             gram: torch.Tensor | None = None) -> dict:
    """Project ``grads`` in place; returns the dot products before and after and whether it acted.

    ``dots`` (``⟨g, g_o^j⟩``) and ``gram`` (the memories' Gram matrix) may be given when the caller already has them
    (e.g. from one :func:`inner_products` pass that also served other inner products); else they are computed here.
    """
    if not memories:
        return {"projected": False, "dots": []}
    if dots is None or gram is None:
        full = gram_matrix([grads, *memories])  # ⟨g, g_o^j⟩ and the memories' Gram matrix, one pass
        dots, gram = full[0, 1:], full[1:, 1:]
    dots, gram = dots.double().cpu(), gram.double().cpu()
    if bool((dots >= 0).all()):
        return {"projected": False, "dots": dots.tolist()}
    v = dual_coefficients(dots, gram, margin)
    add_memories_(grads, memories, v.tolist())
    after = (dots + gram @ v).tolist()
    return {"projected": True, "dots": dots.tolist(), "dots_after": after, "v": v.tolist()}
