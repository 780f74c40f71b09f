"""The weight change of an erasure as a low-rank LoRA in kohya's layout (A1111, ComfyUI, diffusers).

Each changed weight ``W_erased - W_base`` of a linear or convolution layer is factorised by a truncated SVD
(a convolution reshaped to ``(out, in * kh * kw)``, as kohya's ``networks/extract_lora_from_models.py`` does):
``up @ down`` with ``up = U_r sqrt(S_r)`` and ``down = sqrt(S_r) V_r^T``. Every tensor has ``alpha = 1`` (kohya's
common ``network_alpha``), so a loader applies ``(alpha / r) * up @ down`` and the factors carry ``sqrt(r)`` each. One
alpha for all tensors, not ``alpha = r`` per tensor: diffusers 0.42 maps a kohya file's per-tensor alphas to names that
match no module and then uses the first alpha everywhere, which would scale every tensor of another rank wrongly. The rank is ``--lora_rank`` (capped at the full rank) or the smallest rank whose singular
values keep ``--lora_energy`` of the change's squared Frobenius norm. Keys are kohya's:
``lora_unet_<diffusers module path, dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

A LoRA holds matrices only: a changed bias or norm scale has no place in it and is left out (named in the stats).
Scissorhands re-initialises single entries, a sparse random change that is full-rank: the stats say how far the
LoRA is from the full change (relative Frobenius error per tensor and over the whole change).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from erase.export.formats import (ARCHITECTURES, DTYPES, LORA_NAME, LORA_STATS_NAME, ExportSpec, changed_tensors, save_tensors,
                                  settings_metadata, write_json)
from erase.utils.errors import UserError

ALPHA = 1.0  # every tensor's kohya alpha: the loader's scale is ALPHA / rank


def kohya_name(module: str, prefix: str = "lora_unet") -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` -> ``lora_unet_down_blocks_1_..._attn2_to_k``."""
    return f"{prefix}_{module.replace('.', '_')}"


def choose_rank(s: torch.Tensor, rank: int | None, energy: float) -> int:
    """The rank to keep of singular values ``s`` (descending): ``rank`` capped at ``len(s)``, else the smallest r with
    ``sum(s[:r]^2) >= energy * sum(s^2)`` (at least 1)."""
    if rank is not None:
        return max(1, min(int(rank), len(s)))
    e = (s.double() ** 2).cumsum(0)
    if e[-1] <= 0:
        return 1
    r = int(torch.searchsorted(e / e[-1], torch.tensor([energy], dtype=torch.float64) - 1e-12).item()) + 1
    return max(1, min(r, len(s)))


def factorize(delta: torch.Tensor, rank: int | None = None, energy: float = 0.99, dtype: torch.dtype = torch.float32,
              alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(down, up, stats) of one changed weight: linear ``(out, in)`` -> down ``(r, in)``, up ``(out, r)``; convolution
    ``(out, in, kh, kw)`` -> down ``(r, in, kh, kw)``, up ``(out, r, 1, 1)``. With ``alpha`` the factors are scaled so
    that ``(alpha / r) * up @ down`` is the approximation (a LoRA loader's scale), else ``up @ down``. Stats: rank, full
    rank, energy kept and the relative Frobenius error of the factors as stored (in ``dtype``)."""
    shape = delta.shape
    d = delta.detach().to("cpu", torch.float64).reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = choose_rank(s, rank, energy)
    scale = 1.0 if alpha is None else alpha / r
    root = (s[:r] / scale).sqrt()
    up, down = (u[:, :r] * root).to(dtype), (root[:, None] * vh[:r]).to(dtype)
    approx = scale * (up.double() @ down.double())
    norm = float(torch.linalg.norm(d))
    stats = {"rank": r, "full_rank": len(s), "shape": list(shape),
             "energy_kept": float((s[:r] ** 2).sum() / (s ** 2).sum()) if norm > 0 else 1.0,
             "rel_error": float(torch.linalg.norm(d - approx)) / norm if norm > 0 else 0.0,
             "params": up.numel() + down.numel(), "dense_params": d.numel()}
    if len(shape) == 4:
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, 1, 1)
    return down.contiguous(), up.contiguous(), stats


def extract_lora(erased: dict[str, torch.Tensor], base: dict[str, torch.Tensor], rank: int | None = None,
                 energy: float = 0.99, dtype: torch.dtype = torch.float32, prefix: str = "lora_unet") -> tuple[dict, dict]:
    """(tensors, stats) of the LoRA of ``erased - base`` over the tensors of ``erased`` (the changed ones; names as in
    the diffusers UNet state dict). Stats: ``per_tensor`` (rank, rel_error, ...), ``left_out`` (changed tensors a LoRA
    cannot hold: biases, norms), ``rel_error`` over the whole change (left-out tensors count in full), sizes."""
    tensors, per, left_out = {}, {}, {}
    err2 = total2 = 0.0
    for name in sorted(erased):
        d = erased[name].detach().to("cpu", torch.float64) - base[name].detach().to("cpu", torch.float64)
        n2 = float((d ** 2).sum())
        total2 += n2
        module, _, param = name.rpartition(".")
        if param != "weight" or d.ndim not in (2, 4):
            left_out[name] = {"shape": list(d.shape), "norm": math.sqrt(n2)}
            err2 += n2
            continue
        if n2 == 0:
            continue
        down, up, st = factorize(d, rank, energy, dtype, alpha=ALPHA)
        key = kohya_name(module, prefix)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA, dtype=dtype)
        err2 += (st["rel_error"] ** 2) * n2
        per[name] = {**st, "key": key}
    ranks = [p["rank"] for p in per.values()]
    stats = {"rank": rank, "energy": None if rank is not None else energy, "dtype": str(dtype).removeprefix("torch."),
             "per_tensor": per, "left_out": left_out, "tensors": len(per),
             "rank_min": min(ranks) if ranks else 0, "rank_max": max(ranks) if ranks else 0,
             "rel_error": math.sqrt(err2 / total2) if total2 > 0 else 0.0,
             "max_rel_error": max((p["rel_error"] for p in per.values()), default=0.0),
             "params": sum(p["params"] for p in per.values()), "dense_params": sum(p["dense_params"] for p in per.values())}
    return tensors, stats


KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def write(stage: Path, unet, base_tensors: dict, config: dict, spec: ExportSpec, family: str | None = None) -> dict:
    """``stage/erased_lora.safetensors`` (kohya layout) and ``stage/erased_lora.json`` (per-tensor rank and error)."""
    delta = changed_tensors(unet.state_dict(), base_tensors)
    if not delta:
        raise UserError("--export_format lora: the erased UNet equals the base in every targeted tensor; there is no change to export")
    tensors, stats = extract_lora(delta, base_tensors, spec.lora_rank, spec.lora_energy, DTYPES[spec.dtype])
    if not tensors:
        raise UserError("--export_format lora: only biases / norms changed, which a LoRA cannot hold; use diffusers or single_file")
    compact = {n: {"rank": p["rank"], "rel_error": round(p["rel_error"], 6)} for n, p in stats["per_tensor"].items()}
    ranks = {p["rank"] for p in stats["per_tensor"].values()}
    meta = {"format": "erase-lora-kohya", **settings_metadata(config), "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "dynamic",
            "ss_network_alpha": str(ALPHA), "lora_rank": str(spec.lora_rank),
            "lora_energy": str(None if spec.lora_rank is not None else spec.lora_energy),
            "rel_error": f"{stats['rel_error']:.6g}", "per_tensor": json.dumps(compact, sort_keys=True),
            "left_out": json.dumps(sorted(stats["left_out"]))}
    if family:
        meta["ss_base_model_version"] = KOHYA_BASE_VERSION[family]
        meta["modelspec.architecture"] = ARCHITECTURES[family] + "/lora"
    save_tensors(tensors, stage / LORA_NAME, meta)
    write_json(stage / LORA_STATS_NAME, {"format": "kohya LoRA (lora_unet_<diffusers module>.lora_down/lora_up/alpha)",
                                          "settings": spec.to_dict(), **stats})
    return {"files": [LORA_NAME, LORA_STATS_NAME], "dtype": spec.dtype, "rank": spec.lora_rank,
            "energy": None if spec.lora_rank is not None else spec.lora_energy, "tensors": stats["tensors"],
            "rank_min": stats["rank_min"], "rank_max": stats["rank_max"], "rel_error": stats["rel_error"],
            "max_rel_error": stats["max_rel_error"], "left_out": sorted(stats["left_out"]),
            "params": stats["params"], "dense_params": stats["dense_params"], "bytes": (stage / LORA_NAME).stat().st_size}
