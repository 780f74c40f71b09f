"""Float64 inner products of tensor lists, without a float64 copy of any tensor.

The projection and the check of the applied step need sums like ``Σ_t ⟨a_t, b_t⟩`` over every targeted tensor,
accurate enough to tell a step that lowers the forget loss from rounding. Products of float32 / bf16 / fp16
values are exact in float64, so summing them in float64 leaves only the float64 summation error. Converting each
tensor with ``.double()`` would allocate twice its bytes per operand (on a CPU, most of that time is spent
faulting in fresh pages); here consecutive pieces of the tensors are instead copied (converted) into the rows of
one small float64 staging buffer that stays in cache, and every full buffer adds its row dot products. Small
tensors share a buffer, so the number of kernels does not grow with the number of tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensors = Sequence[torch.Tensor | None]

#: Elements per staging row: 1 MiB of float64 on a CPU stays in cache; on an accelerator a larger piece keeps the
#: number of kernels small.
STAGE_CPU, STAGE_DEVICE = 1 << 17, 1 << 22


def _walk(lists: Sequence[Tensors], rows: int, fill: Callable[[torch.Tensor, list], None],
          flush: Callable[[torch.Tensor], None]) -> torch.device:
    """Walk the tensors of ``lists`` (equal shapes, tensor by tensor) in pieces packed into a ``rows`` × stage float64
    buffer: ``fill(columns, views)`` writes the buffer's columns for one piece (``views``: that piece of each list's
    tensor, flat; ``None`` for a missing tensor), ``flush(buffer)`` consumes every full buffer and the last part."""
    device = next((t.device for lst in lists for t in lst if t is not None), torch.device("cpu"))
    stage = STAGE_CPU if device.type == "cpu" else STAGE_DEVICE
    buf = torch.empty(rows, stage, dtype=torch.float64, device=device)
    col = 0
    for tensors in zip(*lists, strict=True):
        flat = [t.detach().reshape(-1) if t is not None else None for t in tensors]
        n = next((f.numel() for f in flat if f is not None), 0)
        start = 0
        while start < n:
            take = min(stage - col, n - start)
            fill(buf[:, col:col + take], [f[start:start + take] if f is not None else None for f in flat])
            col, start = col + take, start + take
            if col == stage:
                flush(buf)
                col = 0
    if col:
        flush(buf[:, :col])
    return device


def _copy(row: torch.Tensor, view: torch.Tensor | None) -> None:
    if view is None:
        row.zero_()
    else:
        row.copy_(view)


@torch.no_grad()
def inner_products(lists: Sequence[Tensors], pairs: Sequence[tuple[int, int]],
                   abs_pairs: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """``out[k] = Σ_t ⟨lists[a][t], lists[b][t]⟩`` for ``(a, b) = pairs[k]``, then ``Σ_t ⟨|a_t|, |b_t|⟩`` for each of
    ``abs_pairs``: one float64 vector (on the tensors' device) for tensor lists of equal shapes (``None``: zeros).
    Every list is read once."""
    parts: list[torch.Tensor] = []
    absolute = sorted({i for pair in abs_pairs for i in pair})

    def fill(columns, views):
        for row, view in zip(columns, views):
            _copy(row, view)

    def flush(rows):
        dots = [torch.dot(rows[a], rows[b]) for a, b in pairs]
        for i in absolute:  # the signed products are taken: the rows may now be made absolute in place
            rows[i].abs_()
        parts.append(torch.stack(dots + [torch.dot(rows[a], rows[b]) for a, b in abs_pairs]))

    device = _walk(lists, len(lists), fill, flush)
    return torch.stack(parts).sum(0) if parts else torch.zeros(len(pairs) + len(abs_pairs), dtype=torch.float64, device=device)


def gram_matrix(lists: Sequence[Tensors]) -> torch.Tensor:
    """``G[a, b] = Σ_t ⟨lists[a][t], lists[b][t]⟩`` (float64, :func:`inner_products`)."""
    n = len(lists)
    pairs = [(a, b) for a in range(n) for b in range(a, n)]
    values = inner_products(lists, pairs)
    gram = torch.empty(n, n, dtype=torch.float64, device=values.device)
    for (a, b), v in zip(pairs, values):
        gram[a, b] = gram[b, a] = v
    return gram


@torch.no_grad()
def add_and_measure_(tensors: Tensors, memories: Sequence[Tensors], coefs: Sequence[float],
                     origin: Tensors | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensors += Σ_j coefs[j] · memories[j]`` in place, measuring in the same pass, for every memory j,
    ``Σ_t ⟨|x_t|, |g^j_t|⟩`` of the tensors *before* the update and ``Σ_t ⟨y_t, g^j_t⟩`` *after* it, with ``y`` the
    updated tensors, or ``origin − tensors`` when ``origin`` is given. Returns both float64 vectors.

    Each tensor and memory is read once: the update is applied piece by piece, between the two measurements, through
    flat views of the tensors. A non-contiguous tensor (channels-last) has no flat view: then the three steps run
    one after the other.
    """
    m = len(memories)
    if any(t is not None and not t.is_contiguous() for t in tensors):
        absolute = inner_products([tensors, *memories], [], [(0, 1 + j) for j in range(m)])
        for mem, coef in zip(memories, coefs):
            for t, o in zip(tensors, mem):
                if t is not None and o is not None and coef != 0.0:
                    t.add_(o.to(t.dtype), alpha=coef)
        measured = [[b - t for b, t in zip(origin, tensors)]] if origin is not None else [tensors]
        return absolute, inner_products([*measured, *memories], [(0, 1 + j) for j in range(m)])
    lists = [tensors, *([origin] if origin is not None else []), *memories]
    skip = 2 if origin is not None else 1  # memories start at views[skip]; rows: 0 before, 1 after, 2.. memories
    parts: list[torch.Tensor] = []

    def fill(columns, views):
        x = views[0]
        _copy(columns[0], x)
        for j in range(m):
            _copy(columns[2 + j], views[skip + j])
            if x is not None and views[skip + j] is not None and coefs[j] != 0.0:
                x.add_(views[skip + j].to(x.dtype), alpha=coefs[j])
        _copy(columns[1], views[1] if origin is not None else x)
        if origin is not None and x is not None:
            columns[1].sub_(x)

    def flush(rows):
        after = [torch.dot(rows[1], rows[2 + j]) for j in range(m)]
        rows[0].abs_()
        rows[2:].abs_()
        parts.append(torch.stack([torch.dot(rows[0], rows[2 + j]) for j in range(m)] + after))

    device = _walk(lists, 2 + m, fill, flush)
    total = torch.stack(parts).sum(0) if parts else torch.zeros(2 * m, dtype=torch.float64, device=device)
    return total[:m], total[m:]
