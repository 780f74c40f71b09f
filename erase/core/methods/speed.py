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
* Eigen- and singular-value decompositions and the solves run in float64 (the authors' in float32).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import torch

from ..closed_form import ClosedFormError, aligned, kmeans, rows, set_weight, text_layers
from ..method import Method
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
        for name, positive in (("null_threshold", True), ("retain_scale", True), ("invariance_lamb", False)):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


@register_method
class SPEED(Method):
    name = "speed"
    config_cls = SPEEDConfig
    tasks = ("diffusion",)
    uses_forget = False
    uses_retain = False
    closed_form = True

    def prepare(self, ctx) -> dict:
        start = time.perf_counter()
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
                d = int(forget.values.shape[-1])
                s_cc, s_ac = _moments(forget, anchor, rule, d)
                priors = _priors(keep, forget.concepts, g)
                n_priors = int(priors.shape[0])
                k2 = _null_text(null, g)
                stats = []
                for layer in (x for x in layers if x.stream == stream):
                    w = layer.module.weight.detach().to(torch.float64)
                    delta, facts = speed_delta(w, s_cc, s_ac, priors.to(w.device), k2.to(w.device), cfg, g)
                    set_weight(layer, w + delta)
                    stats.append({"layer": layer.name, **facts})
                info[stream] = {"targets": len(forget), "priors": n_priors, "null_text_keys": int(k2.shape[1]), "layers": stats}
        seconds = time.perf_counter() - start
        return {"closed_form": True, "repair_steps": 0, "token_positions": rule, "concepts": n_concepts, "priors": n_priors,
                "layers_edited": len(layers), "streams": info, "edit_seconds": seconds,
                "seconds_per_concept": seconds / max(1, n_concepts)}

    def loss(self, ctx, model, forget_batch, retain_batch):
        raise RuntimeError("speed is a closed-form edit: it has no loss and takes no repair steps")


def _moments(forget, anchor, rule: str, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S_cc = mean over forget prompts of CᵀC and S_ac of AᵀC (each prompt's inputs at ``rule``, its anchor's aligned)."""
    s_cc = torch.zeros(d, d, dtype=torch.float64, device=forget.values.device)
    s_ac = torch.zeros_like(s_cc)
    for i in range(len(forget)):
        c, a = (t.to(torch.float64) for t in aligned(forget, i, anchor, forget.anchor[i], rule))
        s_cc += c.T @ c
        s_ac += a.T @ c
    return s_cc / len(forget), s_ac / len(forget)


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


def speed_delta(w: torch.Tensor, s_cc: torch.Tensor, s_ac: torch.Tensor, priors: torch.Tensor, k2: torch.Tensor, cfg,
                g: torch.Generator) -> tuple[torch.Tensor, dict]:
    """ΔW for one layer (float64) and what its prior refinement kept (see the module docstring)."""
    d = w.shape[1]
    eye = torch.eye(d, dtype=torch.float64, device=w.device)
    erase = w @ (s_ac - s_cc) @ torch.linalg.inv(eye + s_cc)
    v_min = torch.linalg.svd(w, full_matrices=False).Vh[-1:]  # W's least right singular vector, (1, d)
    p0 = v_min.T @ v_min
    kept = priors
    if cfg.aug_num > 0 and cfg.prior_filter:
        norms = (priors @ erase.T).norm(dim=1)
        kept = priors[norms > norms.mean()]
    refined, count = torch.zeros(d, d, dtype=torch.float64, device=w.device), 0
    for i in range(0, kept.shape[0], CHUNK):
        chunk = kept[i : i + CHUNK]
        if cfg.aug_num > 0:
            chunk = torch.cat([chunk, _augment(chunk, p0, erase, cfg.aug_num, g)])
        refined += chunk.T @ chunk
        count += chunk.shape[0]
    evals, evecs = torch.linalg.eigh(refined / max(count, 1))
    null = evecs[:, evals < cfg.null_threshold]
    p = null @ null.T
    m = torch.linalg.inv(s_cc @ p + cfg.retain_scale * eye)
    inner = eye
    if k2.shape[1]:
        gram = k2.T @ p @ m @ k2 + cfg.invariance_lamb * torch.eye(k2.shape[1], dtype=torch.float64, device=w.device)
        inner = eye - m @ k2 @ torch.linalg.pinv(gram) @ k2.T @ p
    delta = w @ (s_ac - s_cc) @ p @ inner @ m
    return delta, {"priors_kept": int(kept.shape[0]), "refined_priors": count, "null_space_dim": int(null.shape[1])}
