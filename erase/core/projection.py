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

Everything works on lists of per-tensor gradients: dot products are summed tensor by tensor, and the update is
applied in place, so no flattened copy of the gradient is made. Call it after gradient synchronisation (DDP):
all ranks then hold the same ``g`` and ``g_o`` and take the same projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Grads = Sequence[torch.Tensor]


def dot(a: Grads, b: Grads) -> float:
    return float(sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b) if x is not None and y is not None))


def solve_dual(gram: torch.Tensor, lin: torch.Tensor, lower: float = 0.0, iters: int = 10000, tol: float = 1e-12) -> torch.Tensor:
    """``argmin_{v ≥ lower} ½ vᵀ gram v + linᵀ v`` by cyclic coordinate descent (exact for one memory)."""
    gram, lin = gram.double(), lin.double()
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


@torch.no_grad()
def project_(grads: Grads, memories: Sequence[Grads], margin: float = 0.0) -> dict:
    """Project ``grads`` in place; returns the dot products before and after and whether it acted."""
    if not memories:
        return {"projected": False, "dots": []}
    m = len(memories)
    dots = torch.tensor([dot(grads, mem) for mem in memories], dtype=torch.float64)
    if bool((dots >= 0).all()):
        return {"projected": False, "dots": dots.tolist()}
    gram = torch.empty(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(i, m):
            gram[i, j] = gram[j, i] = dot(memories[i], memories[j])
    if m == 1:
        v = torch.clamp(-dots / gram[0, 0].clamp_min(1e-30), min=float(margin))
    else:
        v = solve_dual(gram, dots, lower=float(margin))
    for i, mem in enumerate(memories):
        coef = float(v[i])
        if coef == 0.0:
            continue
        for g, o in zip(grads, mem):
            if g is not None and o is not None:
                g.add_(o.to(g.dtype), alpha=coef)
    after = (dots + gram @ v).tolist()
    return {"projected": True, "dots": dots.tolist(), "dots_after": after, "v": v.tolist()}
