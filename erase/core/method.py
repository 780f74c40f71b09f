"""What a method supplies: its phases, never a loop.

``prepare`` runs once before training (e.g. the trim; a closed-form editor's whole edit), ``loss`` returns the step's
objective (``needs_forget_batch`` says on which steps it uses a forget batch),
``before_step`` / ``after_backward`` / ``after_step`` hook into each optimizer step (memory refresh, projection,
masks, a correction of the applied step). ``summary`` reports per-run counters (kept in ``RunResult``).
Tensor state that must survive a resume goes in ``state_tensors`` (saved as safetensors in checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .adapter import Adapter
from .stream import EndlessStream

if TYPE_CHECKING:  # only for annotations: the engine imports this module, never the other way round
    from accelerate import Accelerator


@dataclass
class RunContext:
    """What a method sees: the adapter, the accelerator, the targeted parameters and the streams."""

    adapter: Adapter
    accelerator: "Accelerator"
    config: object  # an erase.core.engine.EngineConfig (not imported: the engine imports this module)
    params: dict[str, nn.Parameter]
    forget: EndlessStream | None
    retain: EndlessStream | None
    memory: EndlessStream | None
    saliency: EndlessStream | None
    model: nn.Module | None = None
    step: int = 0
    #: a sharded run's gradient averaging across processes (:func:`erase.core.sharding.all_reduce_grads`), which DDP
    #: does inside the backward; None otherwise
    grad_sync: Callable[[], None] | None = None

    def backward(self, loss: torch.Tensor) -> None:
        """The backward of a method's own pass (e.g. the projection's memory gradient), its gradient averaged across
        processes as the repair's is."""
        self.accelerator.backward(loss)
        if self.grad_sync is not None:
            self.grad_sync()

    def grad_scale(self) -> float | None:
        """The loss scale ``backward`` multiplies by (fp16 grad scaler), or None."""
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="mean") if self.accelerator.num_processes > 1 else t

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


class Method:
    name: ClassVar[str]
    config_cls: ClassVar[type]
    tasks: ClassVar[tuple[str, ...]] = ("classify", "diffusion", "generic")
    uses_forget: ClassVar[bool] = True
    uses_retain: ClassVar[bool] = True
    #: a closed-form editor (UCE, SPEED) makes its whole edit in ``prepare`` from prompts alone: the run takes no
    #: repair steps (``max_train_steps`` must be 0; the engine refuses more), reads no data streams and needs no images
    closed_form: ClassVar[bool] = False
    #: the target preset the default ``--targets xattn`` means for this method on a transformer denoiser (SD3 / Flux),
    #: when it is not the family's own ``xattn`` (None: the family's)
    transformer_targets: ClassVar[str | None] = None

    def __init__(self, config):
        self.config = config

    def prepare(self, ctx: "RunContext") -> dict:
        return {}

    def loss(self, ctx: "RunContext", model, forget_batch, retain_batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def needs_forget_batch(self, ctx: "RunContext", step: int) -> bool:
        """Whether ``loss`` uses a forget batch on ``step``. The engine draws one (per micro-batch) only then, so the
        forget stream advances only by the batches used: a forget epoch is one pass over D_f. When False, ``loss``
        gets ``None``. Must depend on ``step`` and the configuration only (every process decides alike; resumable)."""
        return True

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
