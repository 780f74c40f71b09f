"""An adaptive forget weight: λ raised while the forget term stays above a target share of where it started.

A fixed λ sets how hard the repair pushes, and where forgetting starts moves with the concept: on the shapes world the
λ that erased the tuning concepts left 2.5-42.5 % of others (docs/SHAPES.md). With a target ρ the repair holds a
constraint instead of a weight: minimise the retain loss subject to ``F̄ ≤ ρ·F₀``, where F is the forget term (a
distance the erasure drives down: redirect, esd, relabel), F̄ its running mean and F₀ its mean over the first
``WARMUP`` forget steps. λ is the constraint's multiplier and follows it by dual ascent (the basic differential
multiplier method, Platt & Barr, NeurIPS 1987; GECO, Rezende & Viola 2018, for a reconstruction constraint); after
every optimizer step that used the forget term,

    u = clip((F̄/F₀ − ρ) / ρ, −1, 1),    λ ← λ · exp(η · u)

so λ grows while the concept is still there and shrinks once the constraint holds with room to spare. The λ given on
the command line is the starting weight; λ is held during the warm-up. The step's forget terms are averaged across
processes, so every process holds the same λ, and the state (λ, F₀, F̄, the largest λ, the counts) is checkpointed: a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math

import torch

WARMUP = 5  # forget steps whose mean is F₀ (λ held)
EMA = 0.9  # F̄ ← EMA·F̄ + (1 − EMA)·F


class ForgetWeight:
    """λ for the repair's forget term: fixed (``target`` None) or adapted to hold ``F̄ ≤ target·F₀``."""

    def __init__(self, lam: float, target: float | None = None, gain: float = 0.05):
        self.start, self.target, self.gain = float(lam), target, float(gain)
        self.lam = self.largest = float(lam)
        self.f0 = self.mean = 0.0
        self.updates = 0  # forget steps seen
        self._terms: list[torch.Tensor] = []

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def observe(self, term: torch.Tensor) -> None:
        """Remember one micro-batch's forget term (detached) for the step's update."""
        if self.adaptive:
            self._terms.append(term.detach().float().reshape(()))

    def update(self, reduce=None) -> dict:
        """After an optimizer step: fold the step's terms into F̄ (``reduce`` averages across processes) and move λ."""
        if not self.adaptive or not self._terms:
            return {}
        term = torch.stack(self._terms).mean()
        self._terms = []
        value = float(reduce(term) if reduce is not None else term)
        if not math.isfinite(value):  # a non-finite loss stops the run in the engine; λ does not move on it
            return {}
        self.updates += 1
        if self.updates <= WARMUP:
            self.f0 += (value - self.f0) / self.updates
            self.mean = self.f0
            if self.updates == WARMUP and not self.f0 > 0:
                raise ValueError(f"--forget_target needs a forget term that is positive and falls as the concept is "
                                 f"forgotten (redirect, esd, relabel); its mean over the first {WARMUP} steps is {self.f0:.4g}")
            return {"lam": self.lam}
        self.mean = EMA * self.mean + (1.0 - EMA) * value
        ratio = self.mean / self.f0
        u = min(1.0, max(-1.0, (ratio - self.target) / self.target))
        self.lam *= math.exp(self.gain * u)
        self.largest = max(self.largest, self.lam)
        return {"lam": self.lam, "forget_ratio": ratio}

    def summary(self) -> dict:
        if not self.adaptive:
            return {}
        return {"forget_weight": {"target": self.target, "gain": self.gain, "lam_start": self.start, "lam_final": self.lam,
                                  "lam_max": self.largest, "forget_ratio_final": self.mean / self.f0 if self.f0 > 0 else None,
                                  "forget_steps": self.updates}}

    def state_tensor(self) -> torch.Tensor:
        return torch.tensor([self.lam, self.f0, self.mean, self.largest, float(self.updates)], dtype=torch.float64)

    def load_state_tensor(self, t: torch.Tensor) -> None:
        self.lam, self.f0, self.mean, self.largest, updates = (float(v) for v in t.tolist())
        self.updates = int(updates)
