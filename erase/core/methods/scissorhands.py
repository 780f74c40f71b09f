"""Scissorhands (Wu & Harandi, ECCV 2024): trim by connection sensitivity, then projected repair.

Trim (Sec. 3.2): ``S = |θ ⊙ Σ_b |∇θ L_f(b)||`` over ``saliency_batches`` fresh forget batches, global top-k%,
re-initialise those entries. Repair (Sec. 3.3): minimise ``L_r + λ·F`` where ``F`` is a forget term (``ascent``
is −L_f, the paper's ``L_r − λ L_f``); each update ``g`` is projected so that ``⟨g̃, g_o⟩ ≥ 0`` with
``g_o = ∇(−L_f)`` on forget memory batches refreshed every ``memory_refresh`` steps.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

from ..method import Method
from ..projection import project_
from ..registry import register_method
from ..saliency import saliency_scores
from ..topk import check_k, topk_masks
from ..trim import bias_fan_ins, module_kinds, summarize, trim_

ABLATIONS = ("none", "no_trim", "no_projection", "no_forget")


@dataclass
class ScissorhandsConfig:
    topk: float = field(default=10.0, metadata={"help": "Percent of ranked entries to re-initialise, in (0, 100]."})
    lam: float = field(default=1.0, metadata={"help": "Weight λ of the forget term."})
    forget_loss: str = field(default="ascent", metadata={"help": "Forget term: ascent (−L_f) or an adapter kind (redirect, esd, relabel)."})
    forget_bound: float | None = field(default=None, metadata={"help": "Clamp L_f at this value inside the ascent term."})
    saliency_batches: int = field(default=4, metadata={"help": "Fresh forget batches summed in the SNIP score."})
    selection: str = field(default="global", metadata={"help": "global or per_tensor top-k."})
    trim_only: str | None = field(default=None, metadata={"help": "Regex searched in names: rank over all targets, re-initialise only these (reference: last blocks)."})
    k_basis: str = field(default="ranked", metadata={"help": "ranked: k% of all ranked entries; reset: k% of the entries that may be reset."})
    init: str = field(default="default", metadata={"help": "default, uniform, normal (norm scales 1, norm biases 0) or zero (prunes: every selected entry 0)."})
    project: bool = field(default=True, metadata={"help": "Project updates so the forget loss does not drop."})
    margin: float = field(default=0.0, metadata={"help": "GEM memory strength: the projection's dual is solved under v ≥ margin, as GEM does (0 = exact projection)."})
    memory_refresh: int = field(default=1, metadata={"help": "Recompute the memory gradient every N steps."})
    num_memories: int = field(default=1, metadata={"help": "Forget memory batches, one constraint each."})
    forget_steps: str = field(default="every", metadata={"help": "every: forget term and projection on each step; first_per_epoch: only the first ⌈|D_f|/batch⌉ steps of each retain epoch (reference)."})
    ablation: str = field(default="none", metadata={"help": f"One of {ABLATIONS}: drop one part to measure what it contributes."})

    def __post_init__(self):
        check_k(self.topk)
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation {self.ablation!r} is not one of {ABLATIONS}")
        if self.k_basis not in ("ranked", "reset"):
            raise ValueError(f"k_basis {self.k_basis!r} is not one of ('ranked', 'reset')")
        if self.forget_steps not in ("every", "first_per_epoch"):
            raise ValueError(f"forget_steps {self.forget_steps!r} is not one of ('every', 'first_per_epoch')")
        if not self.margin >= 0.0 or self.margin == float("inf"):
            raise ValueError(f"margin must be a finite number >= 0, got {self.margin}")
        if self.memory_refresh < 1 or self.num_memories < 1 or self.saliency_batches < 1:
            raise ValueError("memory_refresh, num_memories and saliency_batches must be >= 1")


@register_method
class Scissorhands(Method):
    name = "scissorhands"
    config_cls = ScissorhandsConfig

    def __init__(self, config: ScissorhandsConfig):
        super().__init__(config)
        self.memories: list[list[torch.Tensor]] = []

    # -- trim ---------------------------------------------------------------------------------------------
    def prepare(self, ctx) -> dict:
        c = self.config
        info = {"config": asdict(c)}
        if c.ablation == "no_trim":
            info["trim"] = {"skipped": "ablation no_trim"}
            return info
        params = ctx.params
        with ctx.accelerator.autocast():
            scores = saliency_scores(lambda b: ctx.adapter.forget_loss(ctx.model, b), ctx.saliency, params,
                                     num_batches=c.saliency_batches, kind="snip", backward=ctx.accelerator.backward,
                                     reduce_grad=ctx.reduce_mean if ctx.accelerator.num_processes > 1 else None, model=ctx.model,
                                     grad_scale=ctx.grad_scale())
        resettable = [n for n in params if c.trim_only is None or re.search(c.trim_only, n)]
        if not resettable:
            raise ValueError(f"trim_only {c.trim_only!r} matches none of the {len(params)} targeted tensors")
        ranked = scores if c.k_basis == "ranked" else {n: scores[n] for n in resettable}
        masks = topk_masks(ranked, c.topk, c.selection)
        masks = {n: m for n, m in masks.items() if n in resettable}
        del scores, ranked
        stats = trim_({n: params[n] for n in masks}, masks, init=c.init, seed=ctx.config.seed,
                      kinds=module_kinds(ctx.model), fan_ins=bias_fan_ins(ctx.model))
        info["trim"] = {"summary": summarize(stats), "per_tensor": stats}
        return info

    # -- repair -------------------------------------------------------------------------------------------
    def _forget_active(self, ctx, step: int) -> bool:
        if self.config.ablation == "no_forget" or self.config.lam == 0:
            return False
        if self.config.forget_steps == "every":
            return True
        per_epoch = ctx.retain.steps_per_epoch
        return (step % per_epoch) < ctx.forget.steps_per_epoch

    def _projecting(self, ctx, step) -> bool:
        if not self.config.project or self.config.ablation == "no_projection":
            return False
        return self.config.forget_steps == "every" or self._forget_active(ctx, step)

    def before_step(self, ctx, model, step: int) -> dict:
        if not self._projecting(ctx, step):
            return {}
        if self.memories and step % self.config.memory_refresh != 0:
            return {}
        ctx.zero_grad()
        memories = []
        for _ in range(self.config.num_memories):
            with ctx.accelerator.autocast():
                loss = -ctx.adapter.forget_loss(model, next(ctx.memory))
            ctx.backward(loss)
            memories.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in ctx.params.values()])
            ctx.zero_grad()
        self.memories = memories
        return {"memory_forget_loss": -float(loss.detach())}

    def loss(self, ctx, model, forget_batch, retain_batch):
        lr = ctx.adapter.retain_loss(model, retain_batch)
        parts = {"retain_loss": lr.detach()}
        if not self._forget_active(ctx, ctx.step):
            return lr, parts
        term = ctx.adapter.forget_term(self.config.forget_loss, model, forget_batch, bound=self.config.forget_bound)
        parts["forget_term"] = term.detach()
        return lr + self.config.lam * term, parts

    def after_backward(self, ctx, model, step: int) -> dict:
        if not self._projecting(ctx, step) or not self.memories:
            return {}
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ctx.params.values()]
        for p, g in zip(ctx.params.values(), grads):
            p.grad = g
        info = project_(grads, self.memories, margin=self.config.margin)
        return {"projected": float(info["projected"]), "dot_before": min(info["dots"])}

    # -- resume -------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"memory.{j}.{i}": t for j, mem in enumerate(self.memories) for i, t in enumerate(mem)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            self.memories = []
            return
        count = 1 + max(int(k.split(".")[1]) for k in tensors)
        per = 1 + max(int(k.split(".")[2]) for k in tensors)
        self.memories = [[tensors[f"memory.{j}.{i}"] for i in range(per)] for j in range(count)]


