"""Re-initialise exactly the selected entries (Scissorhands' trim, Wu & Harandi 2024, Sec. 3.2).

``default`` draws each tensor from its own PyTorch default distribution: kaiming-uniform(a=√5) for weights of
two or more dimensions (Linear/Conv: U(-1/√fan_in, 1/√fan_in)), ones for 1-d norm weights, N(0, 1) for
embeddings, zero for biases. ``uniform`` / ``normal`` use that same scale for every weight; ``zero`` zeroes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

INITS = ("default", "uniform", "normal", "zero")


def _fan_in(shape) -> int:
    return int(shape[1] * math.prod(shape[2:])) if len(shape) >= 2 else int(shape[0])


def _draw(name: str, p: torch.Tensor, init: str, generator: torch.Generator, kind: str | None) -> torch.Tensor:
    shape, out = p.shape, torch.empty(p.shape, dtype=torch.float32)
    is_bias = name.endswith("bias")
    if init == "zero" or (is_bias and init == "default"):
        return out.zero_()
    if kind == "embedding" and init == "default":
        return out.normal_(0.0, 1.0, generator=generator)
    if p.dim() < 2 and init == "default":
        return out.fill_(1.0)  # norm scale
    bound = 1.0 / math.sqrt(max(1, _fan_in(shape)))  # kaiming_uniform(a=√5) == U(-1/√fan_in, 1/√fan_in)
    if init == "normal":
        return out.normal_(0.0, bound / math.sqrt(3.0), generator=generator)  # same variance as the uniform
    return out.uniform_(-bound, bound, generator=generator)


def module_kinds(model: nn.Module) -> dict[str, str]:
    """Parameter name -> 'embedding' | 'norm' | 'other', for default inits."""
    kinds = {}
    for mname, mod in model.named_modules():
        kind = "embedding" if isinstance(mod, nn.Embedding) else (
            "norm" if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) else "other")
        for pname, _ in mod.named_parameters(recurse=False):
            kinds[f"{mname}.{pname}" if mname else pname] = kind
    return kinds


@torch.no_grad()
def trim_(
    params: Mapping[str, nn.Parameter],
    masks: Mapping[str, torch.Tensor],
    init: str = "default",
    seed: int = 0,
    kinds: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """Overwrite ``params[n][masks[n]]`` in place with fresh draws; return per-tensor statistics."""
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
        new = _draw(name, p, init, gen, (kinds or {}).get(name)).to(device=p.device, dtype=p.dtype)
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
