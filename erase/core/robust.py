"""Robust erasure: any method, with an adversary that searches the model being erased for new ways of asking for the
concept and hands what it finds to the forget term (issue 17; the STEREO line of work, Srivatsan et al. 2024).

:class:`RobustMethod` wraps the chosen method and changes nothing of its phases but two moments:

* before the inner ``prepare`` (Scissorhands' trim, SalUn's mask) the adversary searches once, on the base model, so
  the saliency and the first memories already see the adversarial conditions;
* before every ``every``-th optimizer step (step R, 2R, ...) it searches again, on the current model, before the inner
  ``before_step`` (Scissorhands' projection memory then draws from the refreshed conditions too).

What the adversary learns is its own business (erase/diffusion/robust.py: token embeddings found by textual inversion);
this file only needs its :class:`Adversary` interface. Its state joins the inner method's ``state_tensors`` under the
``robust.`` prefix, so a checkpoint holds it and a resumed run continues with exactly the conditions an uninterrupted
one had. The wrapper reports the inner method's name and config: a checkpoint's method record is the method's, and the
adversary's settings are compared through the caller's run settings.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from .method import Method, RunContext

PREFIX = "robust."


class Adversary(Protocol):
    """What :class:`RobustMethod` needs from an adversary."""

    def refresh(self, ctx: RunContext, model, step: int) -> dict:
        """Search ``model`` (possibly DDP-wrapped) for adversarial conditions and install them where the forget term
        reads its conditions; returns log values. Deterministic given the step and the state, on every process."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the state and re-install the conditions it implies (an empty dict: the state before any search)."""

    def describe(self) -> dict:
        """JSON-able facts about what the adversary searches (recorded with the trim's info)."""


class RobustMethod(Method):
    """``inner`` with an adversary refreshed before the trim and every ``every`` steps (see the module docstring)."""

    def __init__(self, inner: Method, adversary: Adversary, every: int):
        if int(every) < 1:
            raise ValueError(f"the adversary's refresh interval must be >= 1 step, got {every}")
        super().__init__(inner.config)
        self.inner, self.adversary, self.every = inner, adversary, int(every)
        self.name = inner.name
        self.config_cls = inner.config_cls
        self.tasks, self.uses_forget, self.uses_retain = inner.tasks, inner.uses_forget, inner.uses_retain
        if not self.uses_forget:
            raise ValueError(f"method {inner.name} has no forget term for the adversary's conditions to join")
        self.searches = 0
        self.search_seconds = 0.0
        self.last: dict = {}

    def _refresh(self, ctx: RunContext, model, step: int) -> dict:
        tick = time.perf_counter()
        logs = dict(self.adversary.refresh(ctx, model, step) or {})
        self.search_seconds += time.perf_counter() - tick
        self.searches += 1
        self.last = {"step": step, **logs}
        return logs

    def prepare(self, ctx: RunContext) -> dict:
        first = self._refresh(ctx, ctx.model, 0)  # on the base model, before the trim and its saliency
        info = dict(self.inner.prepare(ctx) or {})
        info["robust"] = {"every": self.every, "first_search": first, **self.adversary.describe()}
        return info

    def before_step(self, ctx: RunContext, model, step: int) -> dict:
        logs = self._refresh(ctx, model, step) if step > 0 and step % self.every == 0 else {}
        logs.update(self.inner.before_step(ctx, model, step) or {})
        return logs

    def loss(self, ctx: RunContext, model, forget_batch, retain_batch):
        return self.inner.loss(ctx, model, forget_batch, retain_batch)

    def after_backward(self, ctx: RunContext, model, step: int) -> dict:
        return self.inner.after_backward(ctx, model, step)

    def after_step(self, ctx: RunContext, model, step: int) -> dict:
        return self.inner.after_step(ctx, model, step)

    def summary(self) -> dict:
        """The inner method's counters and the adversary's: searches run by this process (a resumed run counts its
        own), their seconds, and the last search's logs."""
        return {**self.inner.summary(), "robust_searches": self.searches, "robust_search_seconds": round(self.search_seconds, 3),
                "robust_last_search": self.last}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.inner.state_tensors())
        clash = [k for k in out if k.startswith(PREFIX)]
        if clash:
            raise ValueError(f"method {self.name}'s state tensor {clash[0]!r} uses the adversary's prefix {PREFIX!r}")
        out.update({PREFIX + k: v for k, v in self.adversary.state_tensors().items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith(PREFIX)})
        self.adversary.load_state_tensors({k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)})
