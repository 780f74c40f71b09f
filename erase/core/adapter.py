"""The task-specific view of one editable model.

An adapter holds the module that trains, its target presets, mean-reduced losses and the data streams.
Methods only talk to this interface, so the same method file serves classifiers and diffusion UNets.

Forget terms (``forget_term(kind, ...)``) are losses to *minimise* that make the model forget:
``ascent`` (−L_f, optionally bounded), and task-specific ones: ``relabel`` (classification: random labels),
``redirect`` (diffusion: match the anchor prompt's prediction), ``esd`` (diffusion: negative guidance target).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .stream import EndlessStream


class Adapter:
    task: str = "generic"
    #: preset name -> regex over parameter names (matched with re.fullmatch)
    target_presets: dict[str, str] = {}
    default_targets: str = "all"
    #: forget term used by salun-style relabelling
    relabel_kind: str = "relabel"
    forget_kinds: tuple[str, ...] = ("ascent",)

    model: nn.Module

    # -- losses -------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The task loss, mean over the batch (cross-entropy, noise-prediction MSE, ...)."""
        raise NotImplementedError

    def forget_loss(self, model: nn.Module, batch) -> torch.Tensor:
        """L_f: the task loss on a forget batch (saliency and projection memories use it)."""
        return self.loss(model, batch)

    def retain_loss(self, model: nn.Module, batch) -> torch.Tensor:
        return self.loss(model, batch)

    def forget_term(self, kind: str, model: nn.Module, batch, bound: float | None = None, **kwargs) -> torch.Tensor:
        if kind == "ascent":
            lf = self.forget_loss(model, batch)
            return -(torch.clamp(lf, max=bound) if bound is not None else lf)
        raise ValueError(f"forget term {kind!r} is not one of {self.forget_kinds} for {self.task}")

    # -- data -----------------------------------------------------------------------------------------------
    def forget_stream(self, seed: int, rank: int = 0, world: int = 1) -> EndlessStream:
        raise NotImplementedError

    def retain_stream(self, seed: int, rank: int = 0, world: int = 1) -> EndlessStream:
        raise NotImplementedError

    # -- closed-form editors (erase/core/closed_form.py) ----------------------------------------------------
    def text_layers(self, params: dict) -> list:
        """The linear layers among the targeted ``params`` whose input is the prompt alone, as
        :class:`erase.core.closed_form.TextLayer` (the diffusion adapter: a UNet's cross-attention keys and values, an
        MMDiT's context and pooled-text embedders). An adapter without text inputs has none to give."""
        raise NotImplementedError(f"the {self.task} adapter has no layers whose input is a prompt")

    def text_features(self, table: str, stream: str):
        """What the layers of ``stream`` ("tokens" / "pooled") see for the prompts of ``table`` ("forget", "anchor",
        "preserve": the concept set's retain prompts, "uncond"), as :class:`erase.core.closed_form.TextFeatures`."""
        raise NotImplementedError(f"the {self.task} adapter has no text inputs")

    # -- hooks --------------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        """JSON-able facts about the adapter recorded with a run (data sizes, model id, ...)."""
        return {}
