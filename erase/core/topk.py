"""Top-k% selection over many score tensors without concatenating them.

The reference code ranks by ``torch.cat`` of every score (3.4 GB extra on the SD UNet). Here the global threshold
is found by bisection on the IEEE-754 bit pattern of the (non-negative) scores: 31 counting passes, each touching
one tensor at a time, so the extra memory is one boolean tensor the size of the largest score tensor. The masks can
then be made one tensor at a time (:func:`iter_topk_masks`), each score released as its mask is made.
Exact up to ties, which are broken deterministically: among entries equal to the threshold, earlier tensors (in
the given order) and lower flat indices win, i.e. the same set as a stable descending sort of the concatenation.

An entry with score 0 (no gradient on the forget data) is never selected: when fewer than k entries score above 0,
only those are selected, with a warning, and ``info`` (when given) records ``requested_k``, ``selected`` and
``zero_score_excluded``. A k that rounds to 0 raises :class:`TopKError` instead of selecting nothing unnoticed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, MutableMapping

import torch

logger = logging.getLogger(__name__)


class TopKError(ValueError):
    """The top-k% of the ranked entries is 0 entries."""


def num_selected(total: int, k_percent: float) -> int:
    """``round(k/100 · N)`` entries."""
    check_k(k_percent)
    return int(round(total * k_percent / 100.0))


def check_k(k_percent: float) -> None:
    if not (0.0 < float(k_percent) <= 100.0):
        raise ValueError(f"top-k {k_percent!r} is outside (0, 100] (percent of targeted entries)")


def _bits(score: torch.Tensor) -> torch.Tensor:
    """The int32 bit pattern of a flat float32 score (a view when the score is float32 and contiguous): for
    non-negative floats, bit order is value order."""
    s = score.detach()
    s = (s if s.dtype == torch.float32 else s.float()).reshape(-1)  # a view for float32 scores: no copy
    b = s.view(torch.int32)
    if b.numel() == 0:
        return b
    low, high = (int(v) for v in torch.aminmax(b))
    if low >= 0 and high <= 0x7F800000:  # no negative score, no -0.0, no NaN: one reduction, no temporary
        return b
    if bool((s < 0).any()) or bool(torch.isnan(s).any()):
        raise ValueError("scores must be non-negative and not NaN")
    return torch.where(b == torch.iinfo(torch.int32).min, torch.zeros_like(b), b)  # -0.0 -> +0.0


def _count_ge(bits, t: int) -> int:
    # pieces of 2^20 entries: the comparison's temporary stays small (and in cache) however large a tensor is
    return int(sum(int(torch.count_nonzero(piece >= t)) for b in bits for piece in b.split(1 << 20)))


def _threshold(bits: list[torch.Tensor], k: int) -> tuple[int, int]:
    """``(t, ties)``: the top ``k`` entries over ``bits`` (``0 < k`` ≤ the number of positive entries) are those
    ``> t`` plus the first ``ties`` entries ``== t`` (tensor order, then flat index)."""
    # Largest t with count(bits >= t) >= k; bits of non-negative finite floats lie in [0, 0x7F800000].
    lo, hi = 1, 0x7F800000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count_ge(bits, mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo, k - _count_ge(bits, lo + 1)


def _mask(b: torch.Tensor, t: int, ties: int) -> tuple[torch.Tensor, int]:
    """Flat mask ``b > t`` plus up to ``ties`` entries ``== t`` (lowest indices); returns it and the ties left."""
    m = b > t
    if ties > 0:
        take = torch.nonzero(b == t).reshape(-1)[:ties]
        m[take] = True
        ties -= take.numel()
    return m, ties


def _report(info: dict | None, k_percent: float, ranked: int, requested: int, selected: int, flag: str) -> None:
    if requested == 0:
        raise TopKError(f"top-k {k_percent:g}% of {ranked} targeted entries selects 0; raise {flag}")
    if selected < requested:
        logger.warning(f"top-k {k_percent:g}% asks for {requested} of {ranked} entries but only {selected} have a non-zero "
                       f"score; selecting those {selected} (zero scores are never selected)")
    if info is not None:
        info.update({"ranked": ranked, "requested_k": requested, "selected": selected, "zero_score_excluded": requested - selected})


def iter_topk_masks(scores: MutableMapping[str, torch.Tensor], k_percent: float, scope: str = "global", info: dict | None = None,
                    flag: str = "--topk", release: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, mask)`` for every score tensor in order: the top ``round(k% · N)`` entries with a non-zero score over
    all tensors (``scope`` global) or of each tensor (``per_tensor``).

    Everything that can fail (range of k, a k that selects nothing, negative or NaN scores) and ``info`` are settled
    before this returns; the masks are then made one at a time as the iterator is consumed. ``release``: each score
    is removed from ``scores`` as its mask is made, so a caller that applies each mask and drops it (the trim) holds
    one mask and the scores not yet reached, never a full set of masks next to the full set of scores.
    """
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"selection scope {scope!r} is not one of ('global', 'per_tensor')")
    check_k(k_percent)
    names = list(scores)
    bits = {n: _bits(scores[n]) for n in names}
    total = sum(b.numel() for b in bits.values())
    if scope == "global":
        requested = num_selected(total, k_percent)
        selected = min(requested, _count_ge(bits.values(), 1))  # bits >= 1: score > 0
        takes = None
    else:
        takes = {n: min(num_selected(b.numel(), k_percent), _count_ge([b], 1)) for n, b in bits.items()}
        requested = sum(num_selected(b.numel(), k_percent) for b in bits.values())
        selected = sum(takes.values())
    _report(info, k_percent, total, requested, selected, flag)
    t, ties = _threshold(list(bits.values()), selected) if takes is None else (None, 0)

    def masks() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal ties
        for n in names:
            b = bits.pop(n)
            shape = scores[n].shape
            if release:
                del scores[n]
            if takes is None:
                m, ties = _mask(b, t, ties)
            else:
                m = _mask(b, *_threshold([b], takes[n]))[0] if takes[n] else torch.zeros_like(b, dtype=torch.bool)
            del b
            yield n, m.reshape(shape)

    return masks()


def global_topk_masks(scores: Mapping[str, torch.Tensor], k_percent: float, info: dict | None = None,
                      flag: str = "--topk") -> dict[str, torch.Tensor]:
    """Boolean masks selecting the global top ``round(k% · N)`` entries with a non-zero score over all tensors."""
    return dict(iter_topk_masks(dict(scores), k_percent, "global", info, flag))


def per_tensor_topk_masks(scores: Mapping[str, torch.Tensor], k_percent: float, info: dict | None = None,
                          flag: str = "--topk") -> dict[str, torch.Tensor]:
    """Top ``round(k% · n_t)`` non-zero entries of each tensor separately (same tie-break)."""
    return dict(iter_topk_masks(dict(scores), k_percent, "per_tensor", info, flag))


def topk_masks(scores: Mapping[str, torch.Tensor], k_percent: float, scope: str = "global", info: dict | None = None,
               flag: str = "--topk") -> dict[str, torch.Tensor]:
    """``scope`` global or per_tensor; ``info`` receives what was requested and selected; ``flag`` names the
    option to raise in a :class:`TopKError`."""
    return dict(iter_topk_masks(dict(scores), k_percent, scope, info, flag))
