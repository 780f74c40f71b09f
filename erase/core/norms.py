"""Auxiliary passes (saliency, projection memories) leave normalisation statistics alone.

A BatchNorm in train mode folds every forward into its running statistics, so a memory pass on a forget batch at
each step would make the running mean and variance drift towards the forget data (Scissorhands' reference code
computes these gradients in eval mode). Layers with running statistics are put in eval mode for the pass and
restored after; GroupNorm / LayerNorm behave the same in both modes and are left as they are.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module | None):
    """BatchNorm / InstanceNorm (``_NormBase``) layers of ``model`` in eval mode inside the block."""
    switched = [m for m in (model.modules() if model is not None else ()) if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
    for m in switched:
        m.train(False)
    try:
        yield
    finally:
        for m in switched:
            m.train(True)
