"""SalUn (Fan et al., ICLR 2024): gradient-saliency mask + random labelling / redirection.

Mask: the top ``mask_ratio`` % of ``|Σ_b ∇θ L_f(b)|`` (gradient magnitude, not SNIP). Step loss: the adapter's
relabel term (classification: random labels; diffusion: the forget prompt redirected to the anchor) plus
``alpha · L_r``; only masked entries are updated (gradients outside the mask are zeroed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..method import Method
from ..registry import register_method
from ..saliency import saliency_scores
from ..topk import check_k, topk_masks


@dataclass
class SalUnConfig:
    mask_ratio: float = field(default=50.0, metadata={"help": "Percent of targeted entries the update may change."})
    alpha: float = field(default=1.0, metadata={"help": "Weight of the retain loss."})
    forget_loss: str | None = field(default=None, metadata={"help": "Forget term (default: the adapter's relabel kind)."})
    saliency_batches: int = field(default=4, metadata={"help": "Forget batches summed in the gradient saliency."})

    def __post_init__(self):
        check_k(self.mask_ratio)


@register_method
class SalUn(Method):
    name = "salun"
    config_cls = SalUnConfig

    def __init__(self, config):
        super().__init__(config)
        self.masks: dict[str, torch.Tensor] = {}

    def prepare(self, ctx) -> dict:
        with ctx.accelerator.autocast():
            scores = saliency_scores(lambda b: ctx.adapter.forget_loss(ctx.model, b), ctx.saliency, ctx.params,
                                     num_batches=self.config.saliency_batches, kind="grad", backward=ctx.accelerator.backward,
                                     reduce_grad=ctx.reduce_mean if ctx.accelerator.num_processes > 1 else None, model=ctx.model,
                                     grad_scale=ctx.grad_scale())
        selection = {}
        self.masks = topk_masks(scores, self.config.mask_ratio, info=selection, flag="--mask_ratio")
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return {"mask": {"selected": kept, "total": total, "fraction": kept / total,
                         "requested_k": selection["requested_k"], "zero_score_excluded": selection["zero_score_excluded"]}}

    def loss(self, ctx, model, forget_batch, retain_batch):
        kind = self.config.forget_loss or ctx.adapter.relabel_kind
        term = ctx.adapter.forget_term(kind, model, forget_batch)
        lr = ctx.adapter.retain_loss(model, retain_batch)
        return term + self.config.alpha * lr, {"forget_term": term.detach(), "retain_loss": lr.detach()}

    def after_backward(self, ctx, model, step):
        for n, p in ctx.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n])  # the bool mask is cast on the fly: no float copy per step
        return {}

    def state_tensors(self):
        return {f"mask.{n}": m.to(torch.uint8) for n, m in self.masks.items()}

    def load_state_tensors(self, tensors):
        if tensors:
            self.masks = {k[len("mask."):]: v.bool() for k, v in tensors.items()}
