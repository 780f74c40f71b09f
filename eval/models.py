"""The model an audit draws with, from what a user gives on the command line.

    from eval.models import load_audited
    pipe = load_audited("nudity-erased", scheduler="ddim", dtype=torch.float32, device="cuda")

A hub id, a diffusers pipeline folder, or an erase/sd.py output with its denoiser in ``unet/`` (``transformer/`` for SD3 / Flux) loads through
``erase.diffusion.generate.load_pipeline``. An export without ``unet/`` (only ``erased_lora.safetensors``, only the
single file, only the delta: what a user shares) loads through ``erase.api.load_erased``, the same loader a notebook
uses: the base named in its ``erase_config.json`` with the export applied. Either way every weight is checked
finite, the audit's sampler is set, and the safety checker is off. (This lives in eval/ because ``erase.api`` sits
above erase.diffusion: generation cannot import it without an import circle.)
"""

from __future__ import annotations

from pathlib import Path

from erase.diffusion.generate import (check_sampler, finish_pipeline, GenerationConfig, generation_device, load_pipeline, read_export,
                                      resolve_dtype, SCHEDULERS)
from erase.utils.errors import UserError


def export_without_denoiser(model: str) -> bool:
    """An erase/sd.py output folder that has no denoiser folder (``unet/``, or ``transformer/`` for SD3 / Flux) and is
    not itself a pipeline folder."""
    path = Path(model)
    return (path.is_dir() and (path / "erase_config.json").is_file() and not (path / "model_index.json").exists()
            and not (path / "unet").is_dir() and not (path / "transformer").is_dir())


def load_audited(model: str, scheduler: str = "lms", dtype=None, device=None):
    """The pipeline ``model`` names, ready for ``erase.diffusion.generate.generate`` (see the module docstring)."""
    import torch

    if not export_without_denoiser(model):
        return load_pipeline(model, scheduler, dtype, device)
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if isinstance(dtype, str) or dtype is None:
        dtype = resolve_dtype(dtype, torch.device(device or "cpu"))
    from erase.api import load_erased

    _, family, base, _ = read_export(model)
    check_sampler(scheduler, family)
    try:
        pipe = load_erased(model, dtype=dtype, **family.pipeline_kwargs())
    except UserError:
        raise  # one line naming the export already (a non-finite weight)
    except (OSError, ValueError) as e:  # load_erased's own messages are one line already
        raise UserError(f"could not load the export {model}: {str(e).strip().splitlines()[0]}") from None
    return finish_pipeline(pipe, family, scheduler, device, model, base)


def load_for(cfg: GenerationConfig, accelerator=None):
    """``load_audited`` with a generation config's model, sampler and dtype, on the process's device."""
    device = generation_device(accelerator)
    return load_audited(cfg.model, cfg.scheduler, resolve_dtype(cfg.dtype, device), device)
