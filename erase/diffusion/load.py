"""Stage 1, load: the family's parts of the base model (text stack, VAE, denoiser: a UNet or an MMDiT transformer, the
training scheduler), their placement on the device, and what ``--targets`` selects (also without any weights, for
``--list_targets``)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from erase.core import TargetError, select_parameters
from erase.core.targets import describe
from erase.diffusion.families import Conditioner, Family, TextStack, detect, load_text, text_from_pipeline
from erase.utils.checks import check_weights
from erase.utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """The parts of a base model a run uses: only the denoiser trains; text stack and VAE stay frozen."""

    family: Family
    text: TextStack
    vae: torch.nn.Module
    denoiser: torch.nn.Module  # the UNet (SD 1.x / 2.x / XL) or the MMDiT transformer (SD3, Flux)
    noise_scheduler: object  # the training scheduler: DDPM (epsilon or v from its config) or flow-matching Euler

    @property
    def unet(self) -> torch.nn.Module:  # the name every UNet-family caller has used
        return self.denoiser

    def conditioner(self, resolution: int) -> Conditioner:
        """Packed prompt embeddings -> the denoiser's inputs (SDXL: pooled + size ids at ``resolution``; Flux: packed
        latents and position ids)."""
        return self.family.make_conditioner(resolution, self.text, self.denoiser)


def resolve_family(config) -> Family:
    """The family the config names or its base folder / hub id has (a hub id's configs come through the hub cache)."""
    if getattr(config, "family", None) is None:
        from erase.diffusion.validate import apply_family

        m = config.model
        config.family = detect(m.pretrained_model_name_or_path, m.revision, m.model_family)
        apply_family(config, config.family)
    return config.family


def load_components(config) -> Components:
    """The family's text encoders (a :class:`erase.diffusion.families.TextStack`), VAE, denoiser and training scheduler
    (DDPM for the UNet families, flow-matching Euler for SD3 / Flux) from the base folder / hub id; a part with missing
    (meta) or non-finite weights is one line."""
    import diffusers
    from diffusers import AutoencoderKL

    family = resolve_family(config)
    m = config.model
    name, kw = m.pretrained_model_name_or_path, {"revision": m.revision}
    try:
        text = load_text(family, name, m.revision, m.variant)
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=m.variant, **kw)
        denoiser = family.denoiser_cls().from_pretrained(name, subfolder=family.denoiser, variant=m.variant, **kw)
        noise_scheduler = getattr(diffusers, family.scheduler_class).from_pretrained(name, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {family.title} from {name!r}: {str(e).strip().splitlines()[0]}") from None
    encoders = [(enc, mod) for (_, enc, _), mod in zip(family.text_encoders, text.encoders)]
    for part, module in [(family.denoiser, denoiser), ("vae", vae), *encoders]:  # a file missing tensors loads as meta
        check_weights(module.state_dict().items(), f"the base model's {part} ({name})")
    return Components(family, text, vae, denoiser, noise_scheduler)


def components_from_pipeline(pipe, family: Family) -> Components:
    """The parts of an already loaded pipeline: its UNet is copied (the caller's pipeline keeps its weights), the frozen
    parts are shared, the training scheduler is built from its scheduler's config as :func:`load_components` does."""
    import diffusers

    missing = [p for p in ("vae", family.denoiser, "scheduler") if getattr(pipe, p, None) is None]
    if missing:
        raise UserError(f"the pipeline has no {missing[0]}; erase_concept needs a text-to-image pipeline of a supported family")
    return Components(family, text_from_pipeline(family, pipe), pipe.vae, copy.deepcopy(getattr(pipe, family.denoiser)),
                      getattr(diffusers, family.scheduler_class).from_config(pipe.scheduler.config))


@dataclass
class Placement:
    """Where and in which dtypes the parts run: the denoiser's mixed-precision dtype for the frozen parts, the VAE's
    own (SDXL's VAE overflows in fp16 and stays fp32), the device and the image resolution."""

    device: torch.device
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    resolution: int


def place(parts: Components, accelerator, resolution: int | None, targeted: dict | None = None, denoiser_device=None) -> Placement:
    """Freeze the VAE, cast the frozen parts to the mixed-precision dtype and move every part to the device. Under mixed
    precision the denoiser's weights that the run does not train are cast too (as diffusers' LoRA training scripts cast
    every non-trainable weight), the ``targeted`` ones stay fp32 masters: a Flux-dev run holds its 12 B frozen weights
    in bf16, not fp32. ``denoiser_device``: where the denoiser goes instead (a sharded run keeps it on the CPU until the
    engine shards it onto the devices)."""
    parts.vae.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # SDXL's VAE overflows in fp16 (its config sets force_upcast, which its pipeline honours when decoding): it encodes
    # the latents in fp32. SD 1.x / 2.x keep their VAE in the weight dtype.
    vae_dtype = (torch.float32 if weight_dtype == torch.float16 and parts.family.name == "sdxl" and parts.vae.config.get("force_upcast", False)
                 else weight_dtype)
    if vae_dtype != weight_dtype:
        logger.warning(f"{parts.family.title}: its VAE overflows in fp16 and stays in fp32; bf16 mixed precision is the safer choice")
    device = accelerator.device
    parts.vae.to(device, dtype=vae_dtype)
    parts.text.to(device, dtype=weight_dtype)
    parts.denoiser.to(denoiser_device or device)
    if targeted is not None and weight_dtype != torch.float32:
        trained = {id(p) for p in targeted.values()}
        for p in parts.denoiser.parameters():
            if id(p) not in trained and p.is_floating_point():
                p.data = p.data.to(weight_dtype)
    return Placement(device, weight_dtype, vae_dtype, resolution or default_resolution(parts))


def default_resolution(parts: Components) -> int:
    """The denoiser's sample size x the VAE's scale factor; else the VAE's own sample size (Flux's transformer has
    none); else the family's native resolution."""
    vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    sample = parts.denoiser.config.get("sample_size")
    if sample:
        return int(sample) * vae_scale
    if parts.family.denoiser == "unet":
        return parts.family.native_resolution
    return int(parts.vae.config.get("sample_size") or parts.family.native_resolution)


def select_targets(config, unet, family: Family) -> dict:
    """The parameters ``--targets`` / ``--exclude`` select (a selection of nothing is one line)."""
    try:
        return select_parameters(unet, config.objective.targets, config.objective.exclude, family.target_presets)
    except TargetError as e:
        raise UserError(str(e)) from None


def list_targets(config) -> dict:
    """What ``--targets`` / ``--exclude`` select, from the denoiser's config alone (meta tensors: no weights, no memory):
    ``describe()`` of the selection plus the family, what the preset means and the denoiser's parameter count."""
    from accelerate import init_empty_weights

    family = resolve_family(config)  # an unvalidated config's default targets are the family's (validate.apply_family)
    m = config.model
    cls = family.denoiser_cls()
    try:
        denoiser_config = cls.load_config(m.pretrained_model_name_or_path, subfolder=family.denoiser, revision=m.revision)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read a {family.denoiser} config from {m.pretrained_model_name_or_path!r}: "
                        f"{str(e).strip().splitlines()[0]}") from None
    with init_empty_weights():
        denoiser = cls.from_config(denoiser_config)
    info = describe(select_targets(config, denoiser, family))
    note = (family.preset_notes or {}).get(config.objective.targets)
    return {**info, "model_family": family.name, "family_title": family.title, "pipeline_class": family.pipeline_class,
            "denoiser": family.denoiser, "preset_note": note, "total_parameters": sum(p.numel() for p in denoiser.parameters())}
