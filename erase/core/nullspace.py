"""Null-space repair (issue 19 §3, the idea of SPEED's null-space edit and AlphaEdit): a text-input layer keeps its
outputs for the prompts to preserve, through the trim and every repair step.

A layer ``y = W x (+ b)`` whose input ``x`` is text (a cross-attention key / value projection, an MMDiT text embedder;
:meth:`erase.core.adapter.Adapter.text_layers`) sees, for the preserved prompts (the concept set's retain prompts), the
rows of ``X`` (every token position of every prompt). ``U`` (d x r) holds the eigenvectors of ``XᵀX / n`` whose
eigenvalue is at least ``threshold`` times the largest: the directions those prompts use. A change ``ΔW`` with
``ΔW U = 0`` leaves ``W x`` unchanged for every ``x`` in that span, so:

* after the trim, ``W ← W − (W − W_base) U Uᵀ``: the re-initialised entries act only off the preserved span;
* after each optimizer step, ``W ← W − (W − W_old) U Uᵀ``: the applied step (Adam's included) is projected the same way;
* a bias is a change for every input, so these layers' biases keep their base values;
* memory gradients (GEM's ``g_o``) and the step gradient are projected the same way, so the projection's correction
  (a sum of memories) stays in the null space and ``⟨g_o, Δθ⟩`` is the same with or without it.

Only ``W U`` (out x r) of the old weights is kept per layer, never a copy of a weight. Other targets are untouched.
"""

from __future__ import annotations

import torch

from .closed_form import positions, text_layers


class NullSpace:
    """The preserved spans of the targeted text-input layers, by position in the run's parameter list."""

    def __init__(self, weights: dict[int, torch.Tensor], biases: list[int], info: dict):
        self.weights, self.biases, self.info = weights, biases, info  # index -> U (d, r) float32; bias indices
        self._kept: dict[int, torch.Tensor] = {}

    @classmethod
    def build(cls, adapter, params: dict, threshold: float) -> "NullSpace":
        """From the adapter's text-input layers among ``params`` (a ``ClosedFormError`` when there are none) and what
        they see for the preserved prompts."""
        layers = text_layers(adapter, params, ("key", "value", "embed"), "--null_space")
        names = {n: i for i, n in enumerate(params)}
        spans, weights, biases, info = {}, {}, [], {"threshold": threshold, "layers": {}}
        for layer in layers:
            if layer.stream not in spans:
                f = adapter.text_features("preserve", layer.stream)
                x = torch.cat([f.values[i, positions(f, i, "every")] for i in range(len(f))]).to(torch.float64)
                evals, evecs = torch.linalg.eigh(x.T @ x / max(1, x.shape[0]))
                spans[layer.stream] = evecs[:, evals >= threshold * evals.max().clamp_min(1e-30)]
            span = spans[layer.stream]
            w = f"{layer.name}.weight"
            if w in names:
                weights[names[w]] = span.to(params[w].device, torch.float32)
            if f"{layer.name}.bias" in names:
                biases.append(names[f"{layer.name}.bias"])
            info["layers"][layer.name] = {"input_dim": int(span.shape[0]), "preserved_dim": int(span.shape[1])}
        return cls(weights, biases, info)

    # -- the weights ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def remember(self, params: list[torch.Tensor]) -> None:
        """Keep ``W U`` (and the bias) of the weights as they are now: what :meth:`restore_` goes back to."""
        self._kept = {i: params[i].detach().float() @ u for i, u in self.weights.items()}
        self._kept.update({i: params[i].detach().clone() for i in self.biases})

    @torch.no_grad()
    def restore_(self, params: list[torch.Tensor]) -> None:
        """``W ← W − (W U − W_kept U) Uᵀ`` and the bias back: since :meth:`remember`, the weights moved only off the
        preserved span."""
        for i, u in self.weights.items():
            p = params[i]
            p.sub_(((p.detach().float() @ u - self._kept[i]) @ u.T).to(p.dtype))
        for i in self.biases:
            params[i].copy_(self._kept[i])
        self._kept = {}

    # -- gradients ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def project_(self, tensors: list[torch.Tensor | None]) -> None:
        """Gradient-like tensors aligned with the parameters, in place: ``G ← G − G U Uᵀ``, biases' zeroed."""
        for i, u in self.weights.items():
            t = tensors[i]
            if t is not None:
                t.sub_(((t.float() @ u) @ u.T).to(t.dtype))
        for i in self.biases:
            if tensors[i] is not None:
                tensors[i].zero_()
