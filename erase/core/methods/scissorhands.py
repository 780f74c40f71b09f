"""Scissorhands (Wu & Harandi, ECCV 2024): trim by connection sensitivity, then projected repair.

Trim (Sec. 3.2): ``S = |θ ⊙ Σ_b |∇θ L_f(b)||`` over ``saliency_batches`` fresh forget batches, global top-k%,
re-initialise those entries. Repair (Sec. 3.3): minimise ``L_r + λ·F`` where ``F`` is a forget term (``ascent``
is −L_f, the paper's ``L_r − λ L_f``); each update ``g`` is projected so that ``⟨g̃, g_o⟩ ≥ 0`` with
``g_o = ∇(−L_f)`` on forget memory batches refreshed every ``memory_refresh`` steps (eq. 4, GEM's projection).
Adam or momentum then apply a step other than ``−lr·g̃``, so the step actually applied is checked after
``optimizer.step()`` and, where it would lower a memory's forget loss to first order, projected the same way
(``after_step``). Memory gradients are taken with BatchNorm layers in eval mode, and dropped when not finite.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from accelerate.logging import get_logger

from ..forget_weight import ForgetWeight
from ..method import Method
from ..norms import frozen_norm_stats
from ..nullspace import NullSpace
from ..relearn import RELEARN_PARAMS, relearned
from ..inner import add_and_measure_, inner_products
from ..projection import dual_coefficients, project_
from ..registry import register_method
from ..saliency import saliency_scores
from ..topk import check_k, iter_topk_masks
from ..trim import INITS, bias_fan_ins, module_kinds, summarize, trim_

logger = get_logger(__name__)

ABLATIONS = ("none", "no_trim", "no_projection", "no_forget")
#: per-run counters (``summary()``, saved with checkpoints): steps the projection ran on, gradients it changed,
#: applied updates checked / lowering a memory's forget loss to first order / corrected / still lowering it after,
#: memory gradients dropped for not being finite
COUNTS = ("projection_steps", "gradient_projected", "update_checked", "update_violated", "update_corrected",
          "update_violated_after", "memory_non_finite")


@dataclass
class ScissorhandsConfig:
    topk: float = field(default=10.0, metadata={"help": "Percent of ranked entries to re-initialise, in (0, 100]."})
    lam: float = field(default=1.0, metadata={"help": "Weight λ of the forget term (0: repair on D_r alone; the projection still runs on forget steps)."})
    forget_loss: str = field(default="ascent", metadata={"help": "Forget term: ascent (−L_f) or an adapter kind (redirect, esd, relabel)."})
    forget_bound: float | None = field(default=None, metadata={"help": "Clamp L_f at this value inside the ascent term."})
    saliency_batches: int = field(default=4, metadata={"help": "Fresh forget batches summed in the SNIP score."})
    selection: str = field(default="global", metadata={"help": "global or per_tensor top-k.", "choices": ("global", "per_tensor")})
    trim_only: str | None = field(default=None, metadata={"help": "Regex searched in names: rank over all targets, re-initialise only these (reference: last blocks)."})
    k_basis: str = field(default="ranked", metadata={"help": "ranked: k% of all ranked entries; reset: k% of the entries that may be reset.", "choices": ("ranked", "reset")})
    init: str = field(default="default", metadata={"help": "default, uniform, normal (norm scales 1, norm biases 0) or zero (prunes: every selected entry 0).", "choices": INITS})
    project: bool = field(default=True, metadata={"help": "Project updates so the forget loss does not drop.", "negative_aliases": ("--no_projection",)})
    project_update: bool = field(default=True, metadata={"help": "Also correct the step the optimizer applied (Adam, momentum) so it does not lower the memory forget loss to first order; False only measures it.", "negative_aliases": ("--no_update_projection",)})
    margin: float = field(default=0.0, metadata={"help": "GEM memory strength: the projection's dual is solved under v ≥ margin, as GEM does (0 = exact projection)."})
    memory_refresh: int = field(default=1, metadata={"help": "Recompute the memory gradient every N steps."})
    num_memories: int = field(default=1, metadata={"help": "Forget memory batches, one constraint each."})
    forget_steps: str = field(default="every", metadata={"help": "every: forget term and projection on each step; first_per_epoch: only on the steps holding the first ⌈|D_f|/batch⌉ retain micro-batches of each retain epoch (reference).", "choices": ("every", "first_per_epoch")})
    ablation: str = field(default="none", metadata={"help": "Drop one part to measure what it contributes.", "choices": ABLATIONS})
    null_space: bool = field(default=False, metadata={"help": "Null-space repair: the trim and every step change the text-input layers (cross-attention keys / values, MMDiT text embedders) only off the span of the preserved prompts' inputs, so those prompts' keys and values stay the base's (erase/core/nullspace.py)."})
    null_space_threshold: float = field(default=0.01, metadata={"help": "With --null_space: input directions whose second-moment eigenvalue is at least this share of the largest are preserved."})
    relearn_radius: float = field(default=0.0, metadata={"help": "Weight-space adversary: take the forget term's gradient at the weights one relearning step reaches (a step down the concept's loss of this length, relative to the targets' norm; erase/core/relearn.py). 0: off."})
    relearn_params: str = field(default="targets", metadata={"help": "Which weights the relearning step of --relearn_radius moves: targets (the erasure's own), rest (every other weight of the model: those a relearning attack moves and the erasure never trains) or all; the radius is relative to their norm.", "choices": RELEARN_PARAMS})
    forget_target: float | None = field(default=None, metadata={"help": "Adaptive λ: hold the forget term's running mean at most this share of its mean over the first 5 forget steps, raising λ while it is above and lowering it while below (dual ascent; --lam is the starting weight; erase/core/forget_weight.py). In (0, 1); None: λ fixed."})
    forget_gain: float = field(default=0.05, metadata={"help": "With --forget_target: the step of log λ per optimizer step at full error (the relative error is clipped to [-1, 1])."})

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
        if not 0.0 <= self.relearn_radius < 1.0:
            raise ValueError(f"relearn_radius must lie in [0, 1), got {self.relearn_radius}")
        if self.relearn_params not in RELEARN_PARAMS:
            raise ValueError(f"relearn_params {self.relearn_params!r} is not one of {RELEARN_PARAMS}")
        if self.relearn_params != "targets" and self.relearn_radius == 0:
            raise ValueError(f"relearn_params {self.relearn_params!r} sets what the weight-space adversary moves; it needs relearn_radius > 0")
        if self.forget_target is not None:
            if not 0.0 < self.forget_target < 1.0:
                raise ValueError(f"forget_target must lie in (0, 1), got {self.forget_target}")
            if self.lam <= 0 or self.forget_loss == "ascent":
                raise ValueError(f"forget_target adapts λ of a forget term that falls as the concept is forgotten: it needs lam > 0 "
                                 f"and a forget_loss other than ascent (got lam {self.lam}, forget_loss {self.forget_loss!r})")
        if not 0.0 < self.forget_gain <= 1.0:
            raise ValueError(f"forget_gain must lie in (0, 1], got {self.forget_gain}")
        if not 0.0 < self.null_space_threshold < 1.0:
            raise ValueError(f"null_space_threshold must lie in (0, 1), got {self.null_space_threshold}")


@register_method
class Scissorhands(Method):
    name = "scissorhands"
    config_cls = ScissorhandsConfig

    def __init__(self, config: ScissorhandsConfig):
        super().__init__(config)
        self.memories: list[list[torch.Tensor]] = []
        self.counts: dict[str, int] = dict.fromkeys(COUNTS, 0)
        self._pending: _Pending | None = None  # what after_step needs to check the applied step
        self._unchecked = False  # memories refreshed and not yet checked for non-finite entries
        self.null: NullSpace | None = None  # --null_space: built in prepare, or on the first step of a resumed run
        self.weight = ForgetWeight(config.lam, config.forget_target, config.forget_gain)  # λ, fixed or adaptive

    def _null(self, ctx) -> NullSpace | None:
        if self.config.null_space and self.null is None:
            self.null = NullSpace.build(ctx.adapter, ctx.params, self.config.null_space_threshold)
        return self.null

    # -- trim ---------------------------------------------------------------------------------------------
    def prepare(self, ctx) -> dict:
        c = self.config
        info = {"config": asdict(c)}
        null = self._null(ctx)
        if null is not None:
            info["null_space"] = null.info
        if c.ablation == "no_trim":
            info["trim"] = {"skipped": "ablation no_trim"}
            return info
        params = ctx.params
        if null is not None:
            null.remember(list(params.values()))
        with ctx.accelerator.autocast():
            scores = saliency_scores(lambda b: ctx.adapter.forget_loss(ctx.model, b), ctx.saliency, params,
                                     num_batches=c.saliency_batches, kind="snip", backward=ctx.accelerator.backward,
                                     reduce_grad=ctx.reduce_mean if ctx.accelerator.num_processes > 1 else None, model=ctx.model,
                                     grad_scale=ctx.grad_scale())
        resettable = {n for n in params if c.trim_only is None or re.search(c.trim_only, n)}
        if not resettable:
            raise ValueError(f"trim_only {c.trim_only!r} matches none of the {len(params)} targeted tensors")
        ranked = scores if c.k_basis == "ranked" else {n: s for n, s in scores.items() if n in resettable}
        del scores  # from here ``ranked`` holds the only reference: each score is released as its mask is made
        selection = {}
        masks = iter_topk_masks(ranked, c.topk, c.selection, info=selection, flag="--topk", release=True)
        stats = trim_(params, ((n, m) for n, m in masks if n in resettable), init=c.init, seed=ctx.config.seed,
                      kinds=module_kinds(ctx.model), fan_ins=bias_fan_ins(ctx.model))
        info["trim"] = {"summary": summarize(stats), "selection": selection, "per_tensor": stats}
        if null is not None:  # the re-initialised entries act only off the preserved span
            null.restore_(list(params.values()))
        return info

    # -- repair -------------------------------------------------------------------------------------------
    def _forget_step(self, ctx, step: int) -> bool:
        """Whether ``step`` is a forget step of the schedule: every step, or (``first_per_epoch``, as the reference
        loops over the retain loader) a step holding one of the first ⌈|D_f|/batch⌉ retain micro-batches of a
        retain epoch. Counted in micro-batches: each optimizer step draws ``gradient_accumulation_steps`` of them."""
        if self.config.forget_steps == "every":
            return True
        accum = ctx.config.gradient_accumulation_steps
        per_epoch, forget = ctx.retain.steps_per_epoch, ctx.forget.steps_per_epoch
        return any((step * accum + m) % per_epoch < forget for m in range(accum))

    def _forget_active(self, ctx, step: int) -> bool:
        """The forget term is in the loss: a forget step, λ ≠ 0 and not ablated."""
        return self.config.ablation != "no_forget" and self.config.lam != 0 and self._forget_step(ctx, step)

    def _projecting(self, ctx, step) -> bool:
        """The projection runs on every forget step, also with λ = 0 or ``no_forget`` (repair on D_r alone, kept
        from lowering L_f: the paper's reading of the projection)."""
        return self.config.project and self.config.ablation != "no_projection" and self._forget_step(ctx, step)

    def before_step(self, ctx, model, step: int) -> dict:
        if not self._projecting(ctx, step):
            return {}
        if self.memories and step % self.config.memory_refresh != 0:
            return {}
        ctx.zero_grad()
        memories, null = [], self._null(ctx)
        # DDP with gradient_as_bucket_view: .grad is a view of the bucket the next backward overwrites; else the
        # gradient tensor is handed over to the memory as it is (no copy)
        copy = bool(getattr(model, "gradient_as_bucket_view", False))
        with frozen_norm_stats(model):  # no BatchNorm statistics from the memory batch
            for _ in range(self.config.num_memories):
                with ctx.accelerator.autocast():
                    loss = -ctx.adapter.forget_loss(model, next(ctx.memory))
                ctx.backward(loss)
                memories.append([(p.grad.detach().clone() if copy else p.grad.detach()) if p.grad is not None else torch.zeros_like(p)
                                 for p in ctx.params.values()])
                if null is not None:  # corrections made of memories then stay off the preserved span
                    null.project_(memories[-1])
                ctx.zero_grad()
        self.memories = memories
        self._unchecked = True  # after_backward drops those that are not finite (from the norms it computes anyway)
        return {"memory_forget_loss": -float(loss.detach())}

    def needs_forget_batch(self, ctx, step: int) -> bool:
        return self._forget_active(ctx, step)

    def loss(self, ctx, model, forget_batch, retain_batch):
        if self.config.relearn_radius > 0 and self._forget_active(ctx, ctx.step):
            # the forget term one relearning step ahead, its backward taken here, before the retain term's forward at θ
            with relearned(ctx, model, forget_batch, self.config.relearn_radius, self.config.relearn_params) as info:
                term = ctx.adapter.forget_term(self.config.forget_loss, model, forget_batch, bound=self.config.forget_bound)
                ctx.backward(self.weight.lam * term)
            self.weight.observe(term)
            lr = ctx.adapter.retain_loss(model, retain_batch)
            parts = {"retain_loss": lr.detach(), "forget_term": term.detach(), **{k: torch.tensor(v) for k, v in info.items()}}
            return lr + self.weight.lam * term.detach(), parts  # the total is logged and checked; its gradient is L_r's
        lr = ctx.adapter.retain_loss(model, retain_batch)
        parts = {"retain_loss": lr.detach()}
        if not self._forget_active(ctx, ctx.step):
            return lr, parts
        term = ctx.adapter.forget_term(self.config.forget_loss, model, forget_batch, bound=self.config.forget_bound)
        parts["forget_term"] = term.detach()
        self.weight.observe(term)
        return lr + self.weight.lam * term, parts

    def after_backward(self, ctx, model, step: int) -> dict:
        self._pending = None
        null = self._null(ctx)
        if null is not None:  # the step's gradient off the preserved span; after_step projects the applied step too
            null.project_([p.grad for p in ctx.params.values()])
            null.remember(list(ctx.params.values()))
        if not self._projecting(ctx, step) or not self.memories:
            return {}
        params = list(ctx.params.values())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        # one pass: ⟨g, g_o^j⟩ for the projection, ⟨θ, g_o^j⟩ for after_step, the memories' Gram matrix for both
        m = len(self.memories)
        mem = [2 + j for j in range(m)]
        pairs = [(0, j) for j in mem] + [(1, j) for j in mem] + [(i, j) for i in mem for j in mem if j >= i]
        values = inner_products([grads, params, *self.memories], pairs).cpu()
        dots, anchor, gram = values[:m], values[m:2 * m], torch.empty(m, m, dtype=torch.float64)
        for (i, j), v in zip(pairs[2 * m:], values[2 * m:]):
            gram[i - 2, j - 2] = gram[j - 2, i - 2] = v
        logs = {}
        if self._unchecked:  # fresh memories: decided on the gradient, which DDP has averaged (every process alike)
            self._unchecked = False
            keep = [j for j in range(m) if _finite(float(gram[j, j]), self.memories[j])]
            if len(keep) < m:
                dropped = m - len(keep)
                self.counts["memory_non_finite"] += dropped
                logs["memory_non_finite"] = float(dropped)
                logger.warning(f"step {step}: {dropped} of {m} memory gradients are not finite; "
                               + ("projecting on the others" if keep else "no projection on this step"), main_process_only=True)
                self.memories = [self.memories[j] for j in keep]  # none left: no projection, a fresh draw next step
                if not keep:
                    return logs
                dots, anchor, gram = dots[keep], anchor[keep], gram[keep][:, keep]
        info = project_(grads, self.memories, margin=self.config.margin, dots=dots, gram=gram)
        self.counts["projection_steps"] += 1
        self.counts["gradient_projected"] += int(info["projected"])
        # float32 / bf16 / fp16 weights: ⟨g_o, θ_old − θ_new⟩ = ⟨g_o, θ_old⟩ − ⟨g_o, θ_new⟩ with exact float64 products,
        # so no copy of the weights is needed; float64 weights keep a copy (their products round in float64)
        before = [p.detach().clone() for p in params] if any(p.dtype.itemsize > 4 for p in params) else None
        self._pending = _Pending(anchor=anchor, gram=gram, before=before)
        return {**logs, "projected": float(info["projected"]), "dot_before": min(info["dots"])}

    @torch.no_grad()
    def after_step(self, ctx, model, step: int) -> dict:
        """Make the guarantee hold for the displacement the optimizer applied (Adam, momentum, weight decay change it).

        With ``Δθ`` the applied step, ``⟨∇L_f, Δθ⟩ = ⟨g_o, θ_old − θ_new⟩`` is the first-order change of the memory
        forget loss. If it is negative for a memory, ``θ_old − θ_new`` is projected exactly as a gradient is
        (:func:`project_`, margin 0: the margin is in gradient units), which gives the closest displacement that
        lowers no memory's forget loss: ``θ_old − (θ_old − θ_new + Σ_j v_j g_o^j)``, i.e. ``θ_new − Σ_j v_j g_o^j`` is
        written back. Every process holds the same weights and memories, so every process makes the same correction.
        A step counts as violated when the change is below ``−ε·Σ|g_o|·|θ|`` (ε of the weights' dtype): what rounding
        the stored weights can explain is not counted. The check reads the weights and memories once (twice after a
        correction) and copies nothing.
        """
        pending, self._pending = self._pending, None
        weight = self.weight.update(ctx.reduce_mean)  # λ for the next step, from this step's forget terms
        if self.null is not None:  # Adam's step moved the weights on the span too: undo that part
            self.null.restore_(list(ctx.params.values()))
        if pending is None:
            return weight
        params = list(ctx.params.values())
        dots = pending.dots(params, self.memories)
        corrected = bool(self.config.project_update) and min(dots) < 0
        tols, after = [0.0] * len(dots), dots  # a tolerance matters only for a negative change
        if corrected:  # θ_new − Σ_j v_j g_o^j, with the tolerance (at θ_new) and the change as stored, in one pass
            v = dual_coefficients(torch.tensor(dots, dtype=torch.float64), pending.gram)
            absolute, measured = add_and_measure_(params, self.memories, (-v).tolist(), origin=pending.before)
            tols = pending.tolerance(params, absolute)
            after = (measured if pending.before is not None else pending.anchor - measured.cpu()).tolist()
        elif min(dots) < 0:  # measured only (project_update off)
            absolute = inner_products([params, *self.memories], [], [(0, 1 + j) for j in range(len(dots))])
            tols = pending.tolerance(params, absolute)
        violated = any(d < -t for d, t in zip(dots, tols))
        still = any(d < -t for d, t in zip(after, tols))
        self.counts["update_checked"] += 1
        self.counts["update_violated"] += int(violated)
        self.counts["update_corrected"] += int(corrected)
        self.counts["update_violated_after"] += int(still)
        return {**weight, "update_projected": float(corrected), "update_dot_before": min(dots), "update_dot_after": min(after)}

    def summary(self) -> dict:
        return {**self.counts, **self.weight.summary()}

    # -- resume -------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        # memory_refresh = 1: a resumed run recomputes the memories at its first step, so they are not saved
        # (a checkpoint that holds them still loads: they are replaced before use)
        out = {f"memory.{j}.{i}": t for j, mem in enumerate(self.memories) for i, t in enumerate(mem)} if self.config.memory_refresh > 1 else {}
        out["counts"] = torch.tensor([self.counts[k] for k in COUNTS], dtype=torch.int64)
        if self.weight.adaptive:
            out["forget_weight"] = self.weight.state_tensor()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        counts = tensors.get("counts")
        self.counts = dict(zip(COUNTS, (int(c) for c in counts.tolist()))) if counts is not None else dict.fromkeys(COUNTS, 0)
        if self.weight.adaptive and "forget_weight" in tensors:
            self.weight.load_state_tensor(tensors["forget_weight"])
        mems = [k for k in tensors if k.startswith("memory.")]
        if not mems:
            self.memories = []
            return
        count = 1 + max(int(k.split(".")[1]) for k in mems)
        per = 1 + max(int(k.split(".")[2]) for k in mems)
        self.memories = [[tensors[f"memory.{j}.{i}"] for i in range(per)] for j in range(count)]


def _finite(norm2: float, tensors) -> bool:
    """Every entry of ``tensors`` finite, given their squared norm in float64: for float32 / bf16 / fp16 entries it is
    finite exactly then (their squares cannot overflow float64); float64 entries are checked one by one when it is not."""
    return math.isfinite(norm2) or all(bool(torch.isfinite(t).all()) for t in tensors)


@dataclass
class _Pending:
    """What ``after_step`` needs, recorded before ``optimizer.step()``: ``anchor[j] = ⟨g_o^j, θ_old⟩`` (float64), the
    memories' Gram matrix, and for float64 weights a copy ``before`` of them."""

    anchor: torch.Tensor
    gram: torch.Tensor
    before: list[torch.Tensor] | None

    def dots(self, params, memories) -> list[float]:
        """``⟨g_o^j, θ_old − θ⟩`` for every memory, from one pass over the weights and memories."""
        m = len(memories)
        rows = [params] if self.before is None else [[b - p.detach() for b, p in zip(self.before, params)]]
        values = inner_products([*rows, *memories], [(0, 1 + j) for j in range(m)]).cpu()
        return (values if self.before is not None else self.anchor.cpu() - values).tolist()

    @staticmethod
    def tolerance(params, absolute: torch.Tensor) -> list[float]:
        """``ε·Σ|g_o^j|·|θ|`` from the sums of absolute products. One dtype for the targets in practice; with several,
        the largest ε (the most rounding a step can show)."""
        return (max(torch.finfo(p.dtype).eps for p in params) * absolute.cpu()).tolist()
