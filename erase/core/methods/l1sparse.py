"""ℓ1-sparse: fine-tune on retain with an ℓ1 penalty on the targets (Jia et al., NeurIPS 2023).

``L_r + γ_t ‖θ‖₁`` with γ decaying linearly from ``alpha`` to 0 over the run (as in the paper) or constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..method import Method
from ..registry import register_method


@dataclass
class L1SparseConfig:
    alpha: float = field(default=5e-4, metadata={"help": "ℓ1 weight γ."})
    alpha_decay: bool = field(default=True, metadata={"help": "Decay γ linearly to 0 over the run."})


@register_method
class L1Sparse(Method):
    name = "l1sparse"
    config_cls = L1SparseConfig
    uses_forget = False

    def loss(self, ctx, model, forget_batch, retain_batch):
        lr = ctx.adapter.retain_loss(model, retain_batch)
        gamma = self.config.alpha
        if self.config.alpha_decay and ctx.config.max_train_steps:
            gamma *= 1.0 - ctx.step / ctx.config.max_train_steps
        l1 = sum(p.abs().sum() for p in ctx.params.values())
        return lr + gamma * l1, {"retain_loss": lr.detach(), "l1": l1.detach()}
