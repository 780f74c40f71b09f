"""Classification adapter: cross-entropy on (x, y) tensors; random labels for SalUn's relabel term."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from erase.core.adapter import Adapter
from erase.core.stream import EndlessStream, stack_collate


class ClassifierAdapter(Adapter):
    task = "classify"
    default_targets = "all"
    relabel_kind = "relabel"
    forget_kinds = ("ascent", "relabel")

    def __init__(self, model: nn.Module, forget: tuple[torch.Tensor, torch.Tensor], retain: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, batch_size: int = 64,
                 target_presets: dict[str, str] | None = None):
        self.model = model
        self.forget_x, self.forget_y = forget
        self.retain_x, self.retain_y = retain
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.target_presets = dict(target_presets or getattr(model, "target_presets", {}))

    def loss(self, model, batch):
        x, y = batch
        x, y = x.to(_device(model)), y.to(_device(model))
        return F.cross_entropy(model(x), y)

    def forget_term(self, kind, model, batch, bound=None, **kwargs):
        if kind == "relabel":
            x, y = batch
            x, y = x.to(_device(model)), y.to(_device(model))
            # A random *wrong* label for every example (SalUn's random labelling).
            shift = torch.randint(1, self.num_classes, y.shape, device=y.device)
            return F.cross_entropy(model(x), (y + shift) % self.num_classes)
        return super().forget_term(kind, model, batch, bound=bound, **kwargs)

    def forget_stream(self, seed, rank=0, world=1):
        return EndlessStream(len(self.forget_y), min(self.batch_size, len(self.forget_y)), stack_collate(self.forget_x, self.forget_y),
                             seed=seed, rank=rank, world=world, name="forget set")

    def retain_stream(self, seed, rank=0, world=1):
        return EndlessStream(len(self.retain_y), self.batch_size, stack_collate(self.retain_x, self.retain_y),
                             seed=seed, rank=rank, world=world, name="retain set")

    def extra_state(self):
        return {"forget_size": len(self.forget_y), "retain_size": len(self.retain_y), "num_classes": self.num_classes}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
