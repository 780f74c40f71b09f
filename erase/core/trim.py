"""Re-initialise exactly the selected entries (Scissorhands' trim, Wu & Harandi 2024, Sec. 3.2).

``default`` draws each tensor from its own PyTorch default distribution: kaiming-uniform(a=√5) for weights of
two or more dimensions (Linear/Conv: U(-1/√fan_in, 1/√fan_in)), ones for 1-d norm weights, N(0, 1) for
embeddings, zero for biases. ``uniform`` / ``normal`` use that same scale for every weight of two or more
dimensions (embeddings included) and draw a Linear/Conv bias as PyTorch does, U(±1/√fan_in) with the fan-in of
its module's *weight* (``normal``: the same variance); a bias whose module has no such weight is zeroed.
Under every init but ``zero``, the scales of normalisation modules (GroupNorm / LayerNorm / BatchNorm / RMSNorm and
any module whose class name ends in ``Norm``, whatever the scale's dimensionality: a multi-dimensional LayerNorm, a
per-expert RMSNorm) go to 1 and their shifts (``bias``, ``beta``) to 0: a random scale near 0 would switch channels
off. ``zero`` zeroes every selected entry, norm scales included: it is pruning (the selected connections and
channels are removed, as SNIP prunes), not a re-initialisation. Norms whose neutral scale is 0 (``x·(1 + w)``, as
Gemma's RMSNorm; GlobalResponseNorm's residual ``γ``) are not told apart: their scales go to 1 too.
Values are drawn piece by piece with one seeded generator, as if each tensor were drawn whole, so no full-size
draw is held.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

INITS = ("default", "uniform", "normal", "zero")


def _fan_in(shape) -> int:
    return int(shape[1] * math.prod(shape[2:])) if len(shape) >= 2 else int(shape[0])


#: Elements drawn at a time: the trim never holds a full-size draw. A multiple of 16, so CPU ``normal_`` (which
#: transforms blocks of 16) gives the same values as one draw of the whole tensor.
PIECE = 1 << 16


def _is_shift(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.endswith("bias") or leaf == "beta"


def _rule(name: str, p: torch.Tensor, init: str, kind: str | None, fan_in: int | None) -> tuple[str, float]:
    """How a tensor is re-initialised: ``("const", value)``, ``("uniform", bound)`` or ``("normal", std)``."""
    if init == "zero":
        return "const", 0.0  # pruning: norm scales too
    if kind == "norm":  # whatever its dimensionality: a scale goes to 1, a shift to 0
        return "const", 0.0 if _is_shift(name) else 1.0
    if name.endswith("bias"):
        if init == "default" or not fan_in:
            return "const", 0.0
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear / nn.Conv bias init, with the weight's fan-in
    elif p.dim() < 2:
        return "const", 1.0  # a 1-d weight of a module of unknown kind: taken for a norm scale
    elif kind == "embedding" and init == "default":
        return "normal", 1.0
    else:
        bound = 1.0 / math.sqrt(max(1, _fan_in(p.shape)))  # kaiming_uniform(a=√5) == U(-1/√fan_in, 1/√fan_in)
    if init == "normal":
        return "normal", bound / math.sqrt(3.0)  # same variance as the uniform
    return "uniform", bound


@torch.no_grad()
def _reset_(p: torch.Tensor, mask: torch.Tensor, rule: tuple[str, float], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the rule's values into the selected entries of ``p``; return the old and new values (flat order).

    Random values come as if the whole tensor had been drawn (row-major) and the selected entries kept, but the
    draw goes piece by piece (:data:`PIECE`): the same generator state gives the same values, and neither a
    full-size draw nor a bool-mask index (int64 coordinates of every selected entry) is ever made.
    """
    kind, scale = rule
    flat = mask.reshape(-1)
    values = p.data.view(-1) if p.is_contiguous() else p.data.reshape(-1)  # a copy only for a non-contiguous tensor
    n, olds, news, start = flat.numel(), [], [], 0
    while start < n:
        stop = n if n - start < PIECE + 16 else start + PIECE  # the last piece has >= 16 entries (normal_'s blocks)
        keep = flat[start:stop]
        olds.append(values[start:stop][keep].float())
        if kind != "const":
            piece = torch.empty(stop - start, dtype=torch.float32)
            piece = piece.normal_(0.0, scale, generator=generator) if kind == "normal" else piece.uniform_(-scale, scale, generator=generator)
            news.append(piece[keep.cpu()])
        start = stop
    old = torch.cat(olds)
    new = torch.cat(news) if news else torch.full((old.numel(),), scale, dtype=torch.float32)
    new = new.to(device=p.device, dtype=p.dtype)
    values.masked_scatter_(flat, new)
    if not p.is_contiguous():
        p.data.copy_(values.view(p.shape))
    return old, new


_NORM_NAME = re.compile(r"Norm(\d[dD])?$|NormGated$")  # LayerNorm, RMSNorm, LayerNorm2d, FrozenBatchNorm2d, RMSNormGated


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)) or bool(_NORM_NAME.search(type(mod).__name__))


def module_kinds(model: nn.Module) -> dict[str, str]:
    """Parameter name -> 'embedding' | 'norm' | 'other', for default inits."""
    kinds = {}
    for mname, mod in model.named_modules():
        kind = "embedding" if isinstance(mod, nn.Embedding) else "norm" if _is_norm(mod) else "other"
        for pname, _ in mod.named_parameters(recurse=False):
            kinds[f"{mname}.{pname}" if mname else pname] = kind
    return kinds


def bias_fan_ins(model: nn.Module) -> dict[str, int]:
    """Bias name -> fan-in of its module's weight (modules whose ``weight`` has two or more dimensions)."""
    out = {}
    for mname, mod in model.named_modules():
        w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
        if isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and w.dim() >= 2 and not _is_norm(mod):
            out[f"{mname}.bias" if mname else "bias"] = _fan_in(w.shape)
    return out


@torch.no_grad()
def trim_(
    params: Mapping[str, nn.Parameter],
    masks: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    init: str = "default",
    seed: int = 0,
    kinds: Mapping[str, str] | None = None,
    fan_ins: Mapping[str, int] | None = None,
) -> dict[str, dict]:
    """Overwrite ``params[n][masks[n]]`` in place with fresh draws; return per-tensor statistics.

    ``kinds`` (:func:`module_kinds`) and ``fan_ins`` (:func:`bias_fan_ins`) come from the model; without them a
    1-d weight is taken for a norm scale and a bias is zeroed.
    """
    if init not in INITS:
        raise ValueError(f"init {init!r} is not one of {INITS}")
    gen = torch.Generator().manual_seed(int(seed))
    # a mapping is taken in the order of ``params`` (the order of the draws); an iterator in its own order, one mask
    # at a time (:func:`~.topk.iter_topk_masks`)
    items = ((n, masks[n]) for n in params if n in masks) if isinstance(masks, Mapping) else masks
    stats = {}
    for name, mask in items:
        p = params.get(name)
        if p is None:
            continue
        n_reset = int(mask.sum())
        if n_reset == 0:
            stats[name] = {"numel": p.numel(), "reset": 0, "fraction": 0.0}
            continue
        rule = _rule(name, p, init, (kinds or {}).get(name), (fan_ins or {}).get(name))
        old, new = _reset_(p, mask.to(p.device), rule, gen)
        stats[name] = {
            "numel": p.numel(),
            "reset": n_reset,
            "fraction": n_reset / p.numel(),
            "old_abs_mean": float(old.abs().mean()),
            "new_abs_mean": float(new.float().abs().mean()),
        }
        del mask, new, old
    return stats


def summarize(stats: Mapping[str, dict]) -> dict:
    total = sum(s["numel"] for s in stats.values())
    reset = sum(s["reset"] for s in stats.values())
    return {"targeted": total, "reset": reset, "fraction": reset / total if total else 0.0,
            "tensors_touched": sum(1 for s in stats.values() if s["reset"])}
