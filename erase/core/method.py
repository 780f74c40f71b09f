"""What a method supplies: its phases, never a loop.

``prepare`` runs once before training (e.g. the trim), ``loss`` returns the step's objective,
``before_step`` / ``after_backward`` / ``after_step`` hook into each optimizer step (memory refresh, projection,
masks, a correction of the applied step). ``summary`` reports per-run counters (kept in ``RunResult``).
Tensor state that must survive a resume goes in ``state_tensors`` (saved as safetensors in checkpoints).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from .engine import RunContext


class Method:
    name: ClassVar[str]
    config_cls: ClassVar[type]
    tasks: ClassVar[tuple[str, ...]] = ("classify", "diffusion", "generic")
    uses_forget: ClassVar[bool] = True
    uses_retain: ClassVar[bool] = True

    def __init__(self, config):
        self.config = config

    def prepare(self, ctx: "RunContext") -> dict:
        return {}

    def loss(self, ctx: "RunContext", model, forget_batch, retain_batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def before_step(self, ctx: "RunContext", model, step: int) -> dict:
        return {}

    def after_backward(self, ctx: "RunContext", model, step: int) -> dict:
        return {}

    def after_step(self, ctx: "RunContext", model, step: int) -> dict:
        """Right after ``optimizer.step()``, before the gradients are cleared; may change the weights."""
        return {}

    def summary(self) -> dict:
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass
