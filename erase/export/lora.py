"""The weight change of an erasure as a low-rank LoRA that diffusers' ``load_lora_weights`` and the UIs read.

Each changed weight ``W_erased - W_base`` of a linear or convolution layer is factorised by a truncated SVD
(a convolution reshaped to ``(out, in * kh * kw)``, as kohya's ``networks/extract_lora_from_models.py`` does):
``up @ down`` with ``up = U_r sqrt(S_r)`` and ``down = sqrt(S_r) V_r^T``. The rank is ``--lora_rank`` (capped at the
full rank) or the smallest rank whose singular values keep ``--lora_energy`` of the change's squared Frobenius norm.
A tensor whose every entry moved by at most :data:`NOISE_ULPS` units in the last place of the weight is float noise
(a round trip, not an edit): it gets no factors (an SVD of noise is full-rank) and is named in the stats.

The key style is the family's (:data:`erase.export.layouts.LAYOUTS`):

* ``kohya`` (SD 1.x / 2.x, as kohya's sd-scripts write them): ``lora_unet_<diffusers module, dots as underscores>``
  with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. Every tensor has ``alpha = 1`` (kohya's common
  ``network_alpha``), so a loader applies ``(alpha / r) * up @ down`` and the factors carry ``sqrt(r)`` each; one alpha
  for all tensors, not ``alpha = r``: diffusers 0.42 maps a kohya file's per-tensor alphas to names that match no
  module and then uses the first alpha everywhere.
* ``kohya_sgm`` (SDXL, as sd-scripts write SDXL LoRAs): the same with the original (SGM) module names,
  ``lora_unet_input_blocks_4_1_...``, ``lora_unet_label_emb_0_0``: A1111 maps diffusers-named SDXL keys only through
  its SD 1.x table and silently drops ``add_embedding`` and the first upsampler; every client maps the SGM names.
* ``peft`` (SD3 / SD3.5 / Flux): diffusers' own ``transformer.<diffusers module>.lora_A.weight`` / ``.lora_B.weight``,
  no alpha (scale 1: ``W + B A``), the format diffusers' SD3 and Flux loaders read natively and ComfyUI maps for both
  families (``comfy/lora.py``: ``transformer.*`` keys through ``mmdit_to_diffusers`` / ``flux_to_diffusers``, each of
  q, k, v onto its slice of the fused ``qkv`` / ``linear1``). Factorising the diffusers modules keeps fused
  projections exact: q, k and v are separate matrices here, each with its own rank.

InvokeAI files a kohya LoRA under a base model by the width of the first key, in file order, holding ``_attn2_to_k.``,
``_attn2_to_v.`` or ``time_emb_proj.lora_down``, and a diffusers-format one under Flux only when it holds two given
modules. A LoRA whose first such key is a resnet's ``time_emb_proj`` (1280 wide) or that has none (``--targets
selfattn``), or a Flux LoRA without those modules, gets zero rank-1 pairs there (they add nothing to any weight) so the
probe decides right; the stats name them (``probe_anchors``, :func:`probe_anchors`).

A LoRA holds matrices only: a changed bias or norm scale has no place in it and is left out (named in the stats).
Scissorhands re-initialises single entries, a sparse random change that is full-rank: the stats say how far the
LoRA is from the full change (relative Frobenius error per tensor and over the whole change).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from erase.export.formats import (DTYPES, LORA_NAME, LORA_STATS_NAME, ExportSpec, changed_tensors, denoiser_folder, save_tensors,
                                  scheduler_config, settings_metadata, write_json)
from erase.utils.errors import UserError

ALPHA = 1.0  # every kohya tensor's alpha: the loader's scale is ALPHA / rank
NOISE_ULPS = 4  # a change of at most this many units in the last place in every entry is float noise, not an edit
STYLES = ("kohya", "kohya_sgm", "peft")
logger = logging.getLogger(__name__)


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


def float_noise(erased: torch.Tensor, base: torch.Tensor) -> bool:
    """True when every entry of ``erased`` is within :data:`NOISE_ULPS` units in the last place (of its own dtype, at the
    larger magnitude of the two values) of ``base``: a round trip through another precision, not an edit."""
    e, b = erased.detach().cpu(), base.detach().cpu().to(erased.dtype)
    if not e.is_floating_point():
        return False
    mag = torch.maximum(e.abs(), b.abs())
    ulp = torch.nextafter(mag, torch.full_like(mag, math.inf)) - mag
    return bool(((e.double() - b.double()).abs() <= NOISE_ULPS * ulp.double()).all())


def lora_key(module: str, style: str = "kohya", config: dict | None = None) -> str:
    """The LoRA name of a diffusers module in ``style`` (:data:`STYLES`); ``kohya_sgm`` needs the UNet config."""
    if style == "kohya":
        return kohya_name(module)
    if style == "kohya_sgm":
        from erase.export.layouts.ldm import unet_key_to_ldm

        return kohya_name(unet_key_to_ldm(f"{module}.weight", config).removesuffix(".weight"))
    if style == "peft":
        return f"transformer.{module}"
    raise ValueError(f"LoRA style {style!r}; allowed: {', '.join(STYLES)}")


def factor_names(key: str, style: str) -> tuple[str, str, str | None]:
    """(down, up, alpha) tensor names of one LoRA module in ``style``."""
    if style == "peft":
        return f"{key}.lora_A.weight", f"{key}.lora_B.weight", None
    return f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"


def extract_lora(erased: dict[str, torch.Tensor], base: dict[str, torch.Tensor], rank: int | None = None,
                 energy: float = 0.99, dtype: torch.dtype = torch.float32, style: str = "kohya",
                 config: dict | None = None) -> tuple[dict, dict]:
    """(tensors, stats) of the LoRA of ``erased - base`` over the tensors of ``erased`` (the changed ones; names as in
    the diffusers denoiser's state dict), keys in ``style`` (``config``: the UNet config ``kohya_sgm`` names need).
    Stats: ``per_tensor`` (rank, rel_error, key, ...), ``left_out`` (changed tensors a LoRA cannot hold: biases, norms),
    ``float_noise`` (changes of a few ulps, given no factors), ``rel_error`` over the whole change (left-out and noise
    tensors count in full), sizes."""
    alpha = None if style == "peft" else ALPHA
    tensors, per, left_out, noise = {}, {}, {}, []
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
        if float_noise(erased[name], base[name]):
            noise.append(name)
            err2 += n2
            continue
        down, up, st = factorize(d, rank, energy, dtype, alpha=alpha)
        tensors.update(name_factors({module: (down, up)}, style, config, dtype))
        err2 += (st["rel_error"] ** 2) * n2
        per[name] = {**st, "key": lora_key(module, style, config)}
    ranks = [p["rank"] for p in per.values()]
    stats = {"rank": rank, "energy": None if rank is not None else energy, "dtype": str(dtype).removeprefix("torch."), "style": style,
             "per_tensor": per, "left_out": left_out, "float_noise": noise, "tensors": len(per),
             "rank_min": min(ranks) if ranks else 0, "rank_max": max(ranks) if ranks else 0,
             "rel_error": math.sqrt(err2 / total2) if total2 > 0 else 0.0,
             "max_rel_error": max((p["rel_error"] for p in per.values()), default=0.0),
             "params": sum(p["params"] for p in per.values()), "dense_params": sum(p["dense_params"] for p in per.values())}
    return tensors, stats


def name_factors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], style: str = "kohya", config: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``{diffusers module: (down, up)}`` in ``style``, with kohya's alpha where the style has one."""
    tensors = {}
    for module, (down, up) in factors.items():
        down_name, up_name, alpha_name = factor_names(lora_key(module, style, config), style)
        tensors[down_name], tensors[up_name] = down, up
        if alpha_name:
            tensors[alpha_name] = torch.tensor(ALPHA, dtype=dtype)
    return tensors


# ------------------------------------------------------------------------------------------------ InvokeAI's base probe
#: Flux: InvokeAI takes a diffusers-format LoRA for Flux only when it holds these two modules
#: (``is_state_dict_likely_in_flux_diffusers_format``); without them it tries the SD probe and refuses the file.
FLUX_PROBE_MODULES = ("single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj")


def probe_key(keys) -> str | None:
    """The key InvokeAI's SD base probe decides by: the first, in file order (safetensors writes tensors of one dtype by
    name), that holds ``_attn2_to_k.`` / ``_attn2_to_v.`` with a ``lora_down`` or ``time_emb_proj.lora_down``."""
    for key in sorted(keys):
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight") and (
                "_attn2_to_k." in key or "_attn2_to_v." in key or "time_emb_proj.lora_down" in key):
            return key
    return None


def probe_anchors(tensors: dict, family: str | None, style: str, shapes: dict[str, tuple], config: dict | None,
                  dtype: torch.dtype) -> list[str]:
    """Zero rank-1 pairs (they add nothing to any weight) that make InvokeAI file the LoRA under its base; returns
    their keys. ``shapes``: the denoiser's weight shapes by name. UNet (kohya styles): on the UNet's first
    cross-attention key when the probe would decide by anything else (a resnet's 1280-wide ``time_emb_proj``, or
    nothing: ``--targets selfattn``). Flux (``peft``): on :data:`FLUX_PROBE_MODULES` when absent."""
    if style == "peft":
        modules = [m for m in FLUX_PROBE_MODULES if family in ("flux_dev", "flux_schnell") and f"transformer.{m}.lora_A.weight" not in tensors]
    else:
        found = probe_key(tensors)
        if found is not None and "_attn2_" in found:
            return []
        cross = sorted((lora_key(n.removesuffix(".weight"), style, config), n.removesuffix(".weight"))
                       for n in shapes if n.endswith(".attn2.to_k.weight"))
        if not cross or (found is not None and cross[0][0] > found):
            logger.warning("InvokeAI will not file this LoRA under its base: no cross-attention key of this UNet comes first in "
                           "file order (the first is %s)", found)
            return []
        modules = [cross[0][1]]
    for module in modules:
        out, width = shapes[f"{module}.weight"][:2]
        tensors.update(name_factors({module: (torch.zeros(1, width, dtype=dtype), torch.zeros(out, 1, dtype=dtype))}, style, config, dtype))
    return [lora_key(m, style, config) for m in modules]


def lora_metadata(family: str | None, style: str, model_config: dict, sched: dict | None) -> dict:
    """What clients read from a LoRA's metadata: kohya's ``ss_*`` keys (A1111 files a LoRA under SD 2.x only with
    ``ss_v2``, under SDXL by ``ss_base_model_version``) and the modelspec architecture."""
    from erase.export.layouts import LAYOUTS, architecture, v_prediction

    meta = {"ss_network_module": "networks.lora"} if style != "peft" else {}
    if family:
        if LAYOUTS[family].kohya_base:
            meta["ss_base_model_version"] = LAYOUTS[family].kohya_base
        if family == "sd2":
            meta["ss_v2"] = "True"
        if style != "peft" and v_prediction(sched):
            meta["ss_v_parameterization"] = "True"
        meta["modelspec.architecture"] = architecture(family, model_config, sched) + "/lora"
    return meta


def write(stage: Path, model, base_tensors: dict, config: dict, spec: ExportSpec, family: str | None = None) -> dict:
    """``stage/erased_lora.safetensors`` (the family's key style) and ``stage/erased_lora.json`` (per-tensor rank and error)."""
    from erase.export.layouts import LAYOUTS

    state = model.state_dict()
    delta = changed_tensors(state, base_tensors)
    if not delta:
        raise UserError("--export_format lora: the erased model equals the base in every targeted tensor; there is no change to export")
    model_config = dict(model.config)
    style = LAYOUTS[family].lora if family else ("kohya" if denoiser_folder(model) == "unet" else "peft")
    dtype = DTYPES[spec.dtype]
    tensors, stats = extract_lora(delta, base_tensors, spec.lora_rank, spec.lora_energy, dtype, style, model_config)
    if not tensors:
        raise UserError("--export_format lora: only biases / norms changed (or changes of a few ulps), which a LoRA cannot hold; "
                        "use diffusers or single_file")
    stats["probe_anchors"] = probe_anchors(tensors, family, style, {n: tuple(t.shape) for n, t in state.items()}, model_config, dtype)
    compact = {n: {"rank": p["rank"], "rel_error": round(p["rel_error"], 6)} for n, p in stats["per_tensor"].items()}
    ranks = {p["rank"] for p in stats["per_tensor"].values()}
    meta = {"format": f"erase-lora-{'peft' if style == 'peft' else 'kohya'}", **settings_metadata(config),
            "lora_rank": str(spec.lora_rank), "lora_energy": str(None if spec.lora_rank is not None else spec.lora_energy),
            "rel_error": f"{stats['rel_error']:.6g}", "per_tensor": json.dumps(compact, sort_keys=True),
            "left_out": json.dumps(sorted(stats["left_out"])),
            **lora_metadata(family, style, model_config, scheduler_config(config))}
    if style != "peft":
        meta.update(ss_network_dim=str(ranks.pop()) if len(ranks) == 1 else "dynamic", ss_network_alpha=str(ALPHA))
    if stats["float_noise"]:
        meta["float_noise"] = json.dumps(stats["float_noise"])
    save_tensors(tensors, stage / LORA_NAME, meta)
    write_json(stage / LORA_STATS_NAME, {"format": STYLE_FORMATS[style], "settings": spec.to_dict(), **stats})
    return {"files": [LORA_NAME, LORA_STATS_NAME], "dtype": spec.dtype, "style": style, "rank": spec.lora_rank,
            "energy": None if spec.lora_rank is not None else spec.lora_energy, "tensors": stats["tensors"],
            "rank_min": stats["rank_min"], "rank_max": stats["rank_max"], "rel_error": stats["rel_error"],
            "max_rel_error": stats["max_rel_error"], "left_out": sorted(stats["left_out"]), "float_noise": stats["float_noise"],
            "probe_anchors": stats["probe_anchors"], "params": stats["params"], "dense_params": stats["dense_params"],
            "bytes": (stage / LORA_NAME).stat().st_size}


STYLE_FORMATS = {"kohya": "kohya LoRA (lora_unet_<diffusers module>.lora_down/lora_up/alpha)",
                 "kohya_sgm": "kohya LoRA (lora_unet_<original SGM module>.lora_down/lora_up/alpha)",
                 "peft": "diffusers / PEFT LoRA (transformer.<diffusers module>.lora_A/lora_B, scale 1)"}
