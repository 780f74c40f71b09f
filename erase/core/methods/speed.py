"""SPEED (Li et al., "SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion Models", ICLR 2026): a
closed-form edit of the cross-attention values confined to the null space of the preserved prompts' inputs, so what
they produce does not move, with the null text kept exactly (as the authors' ``train_erase_null.py``).

Per layer W (rows of K are input vectors; C the erased concepts' inputs, A their anchors', all at each prompt's last
word token; means over the forget prompts):

    S_cc = mean CᵀC,  S_ac = mean AᵀC,  E = W (S_ac − S_cc)(I + S_cc)⁻¹      (the unconstrained edit, ranks priors)
    prior filtering (IPF): keep the retain inputs r with ‖E r‖ above the mean (those the edit would move most)
    prior augmentation (DPA): per kept r, ``aug_num`` copies r + (ε·v)v with v W's least right singular vector (the
        direction W barely sees, so the copy means the same to the layer) and ε ~ N(0, 1); keep those with ‖E r'‖ above
        the mean; the refined prior set R is the kept r and these copies
    null space: P = Σ_{σ < τ} u uᵀ over the eigenvectors of mean RᵀR whose eigenvalue is below τ (``null_threshold``)
    invariance (IEC): K₂ = the null text's first token and 3 k-means centres of its other tokens, kept exactly
    M = (S_cc P + β I)⁻¹,  ΔW = W (S_ac − S_cc) P (I − M K₂ (K₂ᵀ P M K₂ + γ I)⁻¹ K₂ᵀ P) M

so ΔW r = 0 for every r with P r = 0 and, with γ = 0 (the default), ΔW K₂ = 0. Defaults are the official script's:
values only (``--params V``), ``aug_num`` 10, τ = 0.1, β = ``retain_scale`` 1, γ = ``invariance_lamb`` 0, filter on
(the authors turn it off, with β 0.05 and τ 1e-4, for their 10-100 celebrity runs, whose prior set is small).
Several concepts (``--concept a,b,c``) are one edit.

On SD3 / Flux no cross-attention takes the prompt: the text-input layers are the context embedder (token stream) and
the pooled-text embedder's first linear layer, and SPEED edits both whatever ``--params`` says (their pooled stream has
one vector per prompt; its K₂ is the null text's pooled vector).

Where we differ, and why:

* Targets and priors are the house's prompt tables: the concept presets' forget prompts (each at its last word token,
  paired with the concept's anchor) rather than bare concept names, and the concept set's retain prompts as the prior
  set; SPEED's filter of retain texts that name a target concept drops those that name a concept (its name, ``_`` read
  as a space) as a whole word.
* ``--all_tokens`` reads every token from the first word on (the official script does this for the concept "nudity"
  only, by its name); the default is the last word token.
* Randomness (the DPA noise, the prior shuffle that sets its chunks, the k-means start) comes from the run's seed
  through its own generator; k-means is Lloyd's from k distinct rows (``kmeans_pytorch``, which the authors use, starts
  from random rows too). Where the null text is all zeros (SDXL's ``force_zeros_for_empty_prompt`` unconditional
  branch), every layer maps it to zero whatever the edit and K₂ is left out.
* The same ΔW is computed factored (:func:`speed_delta`): the erased concepts' inputs have k << d rows, so every
  d x d inverse goes through a k x k solve and the null space through the priors' own Gram matrix, a layer costing
  O(d² k) instead of O(d³) (``dense_delta`` is the formula as the authors write it; tests/test_closed_form.py checks the
  two agree). Decompositions and solves run in float64 (the authors' in float32); a singular K₂ system (the null text
  inside the priors' span, where P K₂ = 0 and its invariance already holds) is solved by pseudo-inverse.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ..closed_form import (
    ClosedFormError,
    ClosedFormMethod,
    aligned,
    check_scales,
    kmeans,
    rows,
    set_weight,
    text_layers,
)
from ..registry import register_method

NULL_CLUSTERS = 3  # k-means centres of the null text's tokens after its first (the official script's num_clusters)
CHUNK = 128  # priors per augmentation chunk; the "above the mean" rule of DPA is taken per chunk, as the official script
MINI_BATCH = 8


@dataclass
class SPEEDConfig:
    params: str = field(default="V", metadata={
        "help": "Which cross-attention projections of a UNet SPEED edits: V (attn2.to_v, the paper's), K or KV (SD3 / Flux: "
                "their context and pooled-text embedders, whatever this says).", "choices": ("V", "K", "KV")})
    aug_num: int = field(default=10, metadata={"help": "Directed prior augmentation: perturbed copies per kept prior (0: none, and no filter)."})
    null_threshold: float = field(default=0.1, metadata={
        "help": "τ: eigenvalues of the priors' second moment below it span the null space the edit lives in."})
    retain_scale: float = field(default=1.0, metadata={"help": "β in M = (S_cc P + β I)⁻¹ (the authors use 0.05 for many concepts)."})
    invariance_lamb: float = field(default=0.0, metadata={"help": "γ: 0 keeps the null text's tokens exactly; > 0 relaxes it."})
    prior_filter: bool = field(default=True, metadata={
        "help": "Influence-based prior filtering: keep the priors the unconstrained edit moves more than the mean.",
        "negative_aliases": ("--disable_filter",)})
    all_tokens: bool = field(default=False, metadata={
        "help": "Read every token from the first word on instead of the last word token (the authors' setting for nudity)."})

    def __post_init__(self):
        if self.aug_num < 0:
            raise ValueError(f"aug_num must be >= 0, got {self.aug_num}")
        check_scales(self, positive=("null_threshold", "retain_scale"), non_negative=("invariance_lamb",))


@register_method
class SPEED(ClosedFormMethod):
    name = "speed"
    config_cls = SPEEDConfig

    def edit(self, ctx) -> dict:
        cfg, adapter = self.config, ctx.adapter
        roles = {"V": ("value",), "K": ("key",), "KV": ("key", "value")}[cfg.params] + ("embed",)
        layers = text_layers(adapter, ctx.params, roles, self.name)
        g = torch.Generator().manual_seed(int(ctx.config.seed))
        rule = "all" if cfg.all_tokens else "last"
        info, n_concepts, n_priors = {}, 0, 0
        with torch.no_grad():
            for stream in dict.fromkeys(layer.stream for layer in layers):
                forget, anchor = adapter.text_features("forget", stream), adapter.text_features("anchor", stream)
                keep, null = adapter.text_features("preserve", stream), adapter.text_features("uncond", stream)
                n_concepts = len(forget.concepts) or len(set(forget.group))
                c, dd = _factors(forget, anchor, rule)
                priors = _priors(keep, forget.concepts, g)
                n_priors = int(priors.shape[0])
                k2 = _null_text(null, g)
                stats = []
                for layer in (x for x in layers if x.stream == stream):
                    w = layer.module.weight.detach().to(torch.float64)
                    delta, facts = speed_delta(w, c.to(w.device), dd.to(w.device), priors.to(w.device), k2.to(w.device), cfg, g)
                    set_weight(layer, w + delta)
                    stats.append({"layer": layer.name, **facts})
                info[stream] = {"targets": len(forget), "priors": n_priors, "null_text_keys": int(k2.shape[1]), "layers": stats}
        return {"token_positions": rule, "concepts": n_concepts, "priors": n_priors, "layers_edited": len(layers), "streams": info}


def _factors(forget, anchor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, D), float64, with S_cc = CᵀC and S_ac − S_cc = DᵀC (means over the forget prompts): C the forget prompts'
    inputs at ``rule``, D their anchors' (aligned) minus C, both over √(number of prompts); more rows than the width
    are reduced to the width (C = QR: C ← R, D ← QᵀD) without changing either product."""
    pairs = [aligned(forget, i, anchor, forget.anchor[i], rule) for i in range(len(forget))]
    c = torch.cat([x for x, _ in pairs]).to(torch.float64) / math.sqrt(len(forget))
    dd = torch.cat([a for _, a in pairs]).to(torch.float64) / math.sqrt(len(forget)) - c
    if c.shape[0] > c.shape[1]:
        q, r = torch.linalg.qr(c)
        c, dd = r, q.T @ dd
    return c, dd


def _priors(keep, concepts: list[str], g: torch.Generator) -> torch.Tensor:
    """(N, d) float64: the last word token(s) of every retain prompt that names no erased concept as a whole word,
    shuffled (the shuffle sets the augmentation chunks)."""
    words = [re.compile(r"\b" + re.escape(c.replace("_", " ").lower()) + r"\b") for c in concepts]
    picked = [i for i, p in enumerate(keep.prompts) if not any(w.search(p.lower()) for w in words)]
    if not picked:
        raise ClosedFormError("every retain prompt names an erased concept: SPEED has no prior to keep (give --retain_prompts)")
    out = torch.cat([rows(keep, i, "last") for i in picked]).to(torch.float64)
    return out[torch.randperm(out.shape[0], generator=g)]


def _null_text(null, g: torch.Generator) -> torch.Tensor:
    """K₂ (d, k): the null text's first token and k-means centres of its other tokens (a pooled stream: its vector);
    zero columns (an all-zero unconditional branch) dropped."""
    x = null.values[0].to(torch.float64)
    keys = x if x.shape[0] == 1 else torch.cat([x[:1], kmeans(x[1:], NULL_CLUSTERS, g)])
    return keys[keys.norm(dim=1) > 0].T


def _augment(chunk: torch.Tensor, p0: torch.Tensor, erase: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """DPA: ``n`` copies r + εᵀP₀ per prior (ε ~ N(0, I)), those whose ‖E r'‖ exceeds the mean over the chunk's copies."""
    made = []
    for i in range(0, chunk.shape[0], MINI_BATCH):
        part = chunk[i : i + MINI_BATCH]
        for _ in range(n):
            made.append(part + torch.randn(part.shape, generator=g, dtype=part.dtype).to(part.device) @ p0)
    made = torch.cat(made)
    norms = (made @ erase.T).norm(dim=1)
    return made[norms > norms.mean()]


def speed_delta(w: torch.Tensor, c: torch.Tensor, dd: torch.Tensor, priors: torch.Tensor, k2: torch.Tensor, cfg,
                g: torch.Generator) -> tuple[torch.Tensor, dict]:
    """ΔW for one layer (float64) and what its prior refinement kept (see the module docstring), from the factors of
    :func:`_factors` (k rows, k <= d): every d x d inverse of the formula is taken through a k x k one (push-through and
    Woodbury identities: (I + CᵀC)⁻¹ and M = (CᵀC P + βI)⁻¹) and the null space through the priors' own Gram matrix
    when they are fewer than d, so a layer costs O(d² k) instead of O(d³); ``dense_delta`` is the formula as written."""
    d, k = w.shape[1], c.shape[0]
    eye_k = torch.eye(k, dtype=torch.float64, device=w.device)
    erase = (w @ dd.T) @ torch.linalg.solve(eye_k + c @ c.T, c)  # W (S_ac − S_cc)(I + S_cc)⁻¹
    v_min = least_right_singular_vector(w)
    p0 = v_min.T @ v_min
    kept = priors
    if cfg.aug_num > 0 and cfg.prior_filter:
        norms = (priors @ erase.T).norm(dim=1)
        kept = priors[norms > norms.mean()]
    chunks = []
    for i in range(0, kept.shape[0], CHUNK):
        chunk = kept[i : i + CHUNK]
        chunks.append(torch.cat([chunk, _augment(chunk, p0, erase, cfg.aug_num, g)]) if cfg.aug_num > 0 else chunk)
    refined = torch.cat(chunks)
    span = _span(refined / math.sqrt(max(refined.shape[0], 1)), cfg.null_threshold)  # (d, r): P = I − span spanᵀ

    def proj(x):  # x P
        return x - (x @ span) @ span.T

    cp = proj(c)  # C P
    gram = cfg.retain_scale * eye_k + cp @ c.T  # βI + C P Cᵀ (k x k)

    def times_m(z):  # z M = z (CᵀC P + βI)⁻¹
        return (z - (z @ c.T) @ torch.linalg.solve(gram, cp)) / cfg.retain_scale

    y = cp  # C P, then C P (I − M K₂ (K₂ᵀ P M K₂ + γI)⁻¹ K₂ᵀ P)
    if k2.shape[1]:
        pk2 = proj(k2.T).T  # P K₂
        mk2 = (k2 - c.T @ torch.linalg.solve(gram, c @ pk2)) / cfg.retain_scale  # M K₂
        h = pk2.T @ mk2 + cfg.invariance_lamb * torch.eye(k2.shape[1], dtype=torch.float64, device=w.device)
        y = cp - (cp @ mk2) @ torch.linalg.pinv(h) @ pk2.T
    delta = (w @ dd.T) @ times_m(y)
    return delta, {"priors_kept": int(kept.shape[0]), "refined_priors": int(refined.shape[0]), "null_space_dim": d - int(span.shape[1])}


def least_right_singular_vector(w: torch.Tensor) -> torch.Tensor:
    """(1, d): the right singular vector of W's least singular value among its min(out, in) (``torch.svd``'s last
    column of V, as the official script takes it), from the eigenvectors of the smaller of WᵀW and WWᵀ."""
    if w.shape[0] >= w.shape[1]:
        return torch.linalg.eigh(w.T @ w).eigenvectors[:, :1].T
    u = torch.linalg.eigh(w @ w.T).eigenvectors[:, :1]
    v = w.T @ u
    norm = v.norm()
    if norm <= torch.finfo(w.dtype).eps * w.norm():  # W has a zero singular value there: fall back to the SVD
        return torch.linalg.svd(w, full_matrices=False).Vh[-1:]
    return (v / norm).T


def _span(r: torch.Tensor, threshold: float) -> torch.Tensor:
    """(d, r) orthonormal eigenvectors of RᵀR whose eigenvalue is at least ``threshold`` (the complement of the null
    space), through R Rᵀ when R has fewer rows than columns (same non-zero eigenvalues; u = Rᵀv / √λ)."""
    if r.shape[0] >= r.shape[1]:
        evals, evecs = torch.linalg.eigh(r.T @ r)
        return evecs[:, evals >= threshold]
    evals, evecs = torch.linalg.eigh(r @ r.T)
    big = evals >= threshold
    return (r.T @ evecs[:, big]) / evals[big].sqrt()


def dense_delta(w, s_cc, s_ac, refined, k2, null_threshold: float, retain_scale: float, invariance_lamb: float) -> torch.Tensor:
    """The official script's ΔW as written, every d x d matrix formed (a reference for tests): P from the eigenvectors
    of mean RᵀR below the threshold, M = (S_cc P + βI)⁻¹, ΔW = W (S_ac − S_cc) P (I − M K₂ (K₂ᵀ P M K₂ + γI)⁻¹ K₂ᵀ P) M."""
    d = w.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(refined.T @ refined / refined.shape[0])
    null = evecs[:, evals < null_threshold]
    p = null @ null.T
    m = torch.linalg.inv(s_cc @ p + retain_scale * eye)
    inner = eye - m @ k2 @ torch.linalg.inv(k2.T @ p @ m @ k2 + invariance_lamb * torch.eye(k2.shape[1], dtype=torch.float64)) @ k2.T @ p
    return w @ (s_ac - s_cc) @ p @ inner @ m
