"""Re-initialise exactly the selected entries (Scissorhands' trim, Wu & Harandi 2024, Sec. 3.2).

``default`` draws each tensor from its own PyTorch default distribution: kaiming-uniform(a=√5) for weights of
two or more dimensions (Linear/Conv: U(-1/√fan_in, 1/√fan_in)), ones for 1-d norm weights, N(0, 1) for
embeddings, zero for biases. ``uniform`` / ``normal`` use that same scale for every weight of two or more
dimensions (embeddings included) and draw a Linear/Conv bias as PyTorch does, U(±1/√fan_in) with the fan-in of
its module's *weight* (``normal``: the same variance); a bias whose module has no such weight is zeroed.
Under every init but ``zero``, 1-d weights (GroupNorm / LayerNorm / BatchNorm / RMSNorm scales) go to 1 and norm
biases to 0: a random scale near 0 would switch channels off. ``zero`` zeroes every selected entry, norm scales
included: it is pruning (the selected connections and channels are removed, as SNIP prunes), not a re-initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

INITS = ("default", "uniform", "normal", "zero")


def _fan_in(shape) -> int:
    return int(shape[1] * math.prod(shape[2:])) if len(shape) >= 2 else int(shape[0])


def _draw(name: str, p: torch.Tensor, init: str, generator: torch.Generator, kind: str | None, fan_in: int | None) -> torch.Tensor:
    shape, out = p.shape, torch.empty(p.shape, dtype=torch.float32)
    if init == "zero":
        return out.zero_()  # pruning: norm scales too
    if name.endswith("bias"):
        if init == "default" or kind == "norm" or not fan_in:
            return out.zero_()
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear / nn.Conv bias init, with the weight's fan-in
    elif p.dim() < 2:
        return out.fill_(1.0)  # norm scale
    elif kind == "embedding" and init == "default":
        return out.normal_(0.0, 1.0, generator=generator)
    else:
        bound = 1.0 / math.sqrt(max(1, _fan_in(shape)))  # kaiming_uniform(a=√5) == U(-1/√fan_in, 1/√fan_in)
    if init == "normal":
        return out.normal_(0.0, bound / math.sqrt(3.0), generator=generator)  # same variance as the uniform
    return out.uniform_(-bound, bound, generator=generator)


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or type(mod).__name__.endswith("Norm")


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
    masks: Mapping[str, torch.Tensor],
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
    stats = {}
    for name, p in params.items():
        mask = masks.get(name)
        if mask is None:
            continue
        n_reset = int(mask.sum())
        if n_reset == 0:
            stats[name] = {"numel": p.numel(), "reset": 0, "fraction": 0.0}
            continue
        new = _draw(name, p, init, gen, (kinds or {}).get(name), (fan_ins or {}).get(name)).to(device=p.device, dtype=p.dtype)
        old = p.detach()[mask].float()
        p.data[mask] = new[mask]
        stats[name] = {
            "numel": p.numel(),
            "reset": n_reset,
            "fraction": n_reset / p.numel(),
            "old_abs_mean": float(old.abs().mean()),
            "new_abs_mean": float(new[mask].float().abs().mean()),
        }
    return stats


def summarize(stats: Mapping[str, dict]) -> dict:
    total = sum(s["numel"] for s in stats.values())
    reset = sum(s["reset"] for s in stats.values())
    return {"targeted": total, "reset": reset, "fraction": reset / total if total else 0.0,
            "tensors_touched": sum(1 for s in stats.values() if s["reset"])}
