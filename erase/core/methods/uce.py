"""UCE (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024): a closed-form edit of the layers
whose input is the prompt, mapping each erased concept's inputs to its anchor's outputs while keeping the preserved
prompts' outputs and staying near the old weights (the paper's eq. 7):

    W = argmin  Σ_erase s_e ‖W c − W_old a‖² + Σ_preserve s_p ‖W p − W_old p‖² + λ ‖W − W_old‖²_F
      = (λ W_old + s_e Σ W_old a cᵀ + s_p Σ W_old p pᵀ) (λ I + s_e Σ c cᵀ + s_p Σ p pᵀ)⁻¹.

Layers (the adapter's text-input layers among ``--targets``): a UNet's cross-attention keys and values
(``attn2.to_k`` / ``to_v``, the paper's; ``--no_with_to_k`` values only); on SD3 / Flux the prompt enters through the
context embedder (token stream) and the pooled-text embedder's first linear layer (``time_text_embed.text_embedder.
linear_1``), which the authors' Flux script edits. Inputs (what each layer sees, from the run's prompt tables):

* erase: every forget prompt c of each concept, paired with the concept's anchor prompt a: from each one's last word
  token to the end of its tokenizer's window, the two tails aligned and cut to the shorter (``--token_positions
  last_onward``, the paper's code ``train_erase.py``: ``old_emb[final_token_idx : 77 − (farthest − final_token_idx)]``),
  or only the two last word tokens (``last``, the authors' 2025 rewrite ``uce_sd_erase.py`` / ``uce_flux_edit.py``);
  a pooled layer: the prompt's pooled vector.
* preserve: the empty prompt and the concept set's retain prompts, every token (``last_onward``, as the paper's code)
  or each one's last word token (``last``).

Defaults are the paper code's: λ = 0.5, s_e = 1, s_p = max(0.1, 1 / (1 + the number of retain prompts)), "replace"
targets (v* = W_old a), keys and values. Several concepts (``--concept a,b,c``) are one edit: every pair goes in the
same sums.

Where we differ, and why:

* The solve is factored: since v* = W_old a and W_old p, W = W_old (I + s_e (A − C)ᵀ C D⁻¹) with D = λI + s_e CᵀC +
  s_p PᵀP (:func:`uce_update`), the same closed form, so one d x d solve serves every layer of a stream instead of one
  per layer, and a layer's update is a rank-k product for k erase rows; float64 (the paper's code inverts in float32).
* Biased layers (the MMDiT embedders): the target is W_old a, the output before the bias, so the edited layer gives the
  anchor's output with its bias once (the authors' Flux script targets ``module(a)``, the bias included, which the
  unchanged bias then adds a second time).
* Forget prompts are the concept preset's phrasings (the house's definition of a concept) rather than the bare
  concept name with the paper's optional prompt templates; the paper's '' guide (an anchor-free erase) is the preset's
  anchor here, and an empty anchor prompt behaves as the paper's ``' '``.
* The 2025 scripts change more than positions (preserve scale 1); ``--token_positions last`` changes positions only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..closed_form import (
    ClosedFormMethod,
    aligned,
    check_scales,
    gram,
    rows,
    set_weight,
    text_layers,
)
from ..registry import register_method


@dataclass
class UCEConfig:
    lamb: float = field(default=0.5, metadata={"help": "UCE's λ: the weight of staying near the old projection (the paper code's 0.5)."})
    erase_scale: float = field(default=1.0, metadata={"help": "UCE's erase scale s_e on the forget -> anchor pairs."})
    preserve_scale: float | None = field(default=None, metadata={
        "help": "UCE's preserve scale s_p on the retain prompts (default: max(0.1, 1 / (1 + their number)), the paper code's)."})
    token_positions: str = field(default="last_onward", metadata={
        "help": "Token positions of the key/value inputs: last_onward (the paper's code: from each prompt's last word token to "
                "the end, forget and anchor aligned) or last (the last word token only, the authors' 2025 scripts).",
        "choices": ("last_onward", "last")})
    with_to_k: bool = field(default=True, metadata={"help": "Also edit the cross-attention keys (attn2.to_k), as the paper; "
                                                             "off: values only (SD3 / Flux: no keys take the prompt)."})

    def __post_init__(self):
        check_scales(self, positive=("lamb",), non_negative=("erase_scale", "preserve_scale"))


@register_method
class UCE(ClosedFormMethod):
    name = "uce"
    config_cls = UCEConfig

    def edit(self, ctx) -> dict:
        cfg, adapter = self.config, ctx.adapter
        roles = ("key", "value", "embed") if cfg.with_to_k else ("value", "embed")
        layers = text_layers(adapter, ctx.params, roles, self.name)
        rule = cfg.token_positions
        info, n_preserve, n_concepts = {}, 0, 0
        with torch.no_grad():
            for stream in dict.fromkeys(layer.stream for layer in layers):
                forget, anchor = adapter.text_features("forget", stream), adapter.text_features("anchor", stream)
                keep, empty = adapter.text_features("preserve", stream), adapter.text_features("uncond", stream)
                n_preserve, n_concepts = len(keep), len(forget.concepts) or len(set(forget.group))
                s_p = cfg.preserve_scale if cfg.preserve_scale is not None else max(0.1, 1.0 / (1 + len(keep)))
                pairs = [aligned(forget, i, anchor, forget.anchor[i], rule) for i in range(len(forget))]
                kept = [rows(t, i, "every" if rule == "last_onward" else "last") for t in (empty, keep) for i in range(len(t))]
                left, right = uce_update([c for c, _ in pairs], [a for _, a in pairs], kept, cfg.lamb, cfg.erase_scale, s_p)
                for layer in (x for x in layers if x.stream == stream):
                    w = layer.module.weight.detach().to(left)
                    set_weight(layer, w + (w @ left) @ right)
                info[stream] = {"erase_pairs": len(pairs), "erase_inputs": sum(int(c.shape[0]) for c, _ in pairs),
                                "preserve_inputs": sum(int(p.shape[0]) for p in kept), "preserve_scale": s_p,
                                "layers": [x.name for x in layers if x.stream == stream]}
        return {"token_positions": rule, "concepts": n_concepts, "preserved_prompts": n_preserve, "layers_edited": len(layers),
                "streams": info}


def uce_update(erase: list[torch.Tensor], anchors: list[torch.Tensor], preserve: list[torch.Tensor], lamb: float,
               erase_scale: float, preserve_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R), float64, with W_new = W_old + (W_old L) R for every layer reading these inputs (rows are input vectors):
    the closed form W_old (λI + s_e Σ aᵀc + s_p Σ pᵀp)(λI + s_e Σ cᵀc + s_p Σ pᵀp)⁻¹ is W_old (I + s_e (A − C)ᵀ C D⁻¹)
    with D the second factor, so L = s_e (A − C)ᵀ (d x k) and R = C D⁻¹ (k x d) for the k erase rows; with k > d they
    are multiplied out (L ← L R, R ← I)."""
    c = torch.cat(erase).to(torch.float64)
    d = int(c.shape[1])
    eye = torch.eye(d, dtype=torch.float64, device=c.device)
    den = lamb * eye + gram([c], d, erase_scale) + (gram(preserve, d, preserve_scale) if preserve else 0)
    right = torch.linalg.solve(den, c.T).T  # C D⁻¹ (D symmetric)
    left = erase_scale * (torch.cat(anchors).to(torch.float64) - c).T
    if c.shape[0] > d:
        return left @ right, eye
    return left, right
