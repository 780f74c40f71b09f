"""The table of families and their original layouts: a family is a row of :data:`LAYOUTS` (its layout module, the
diffusers pipeline of its single file, its denoiser's subfolder, its LoRA key style, its metadata); :func:`detect`
reads the family from the denoiser's config (and the text encoders' for the UNet families), as diffusers reads
``model_index.json`` and the component configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.export.layouts.ldm import LayoutError


@dataclass(frozen=True)
class Layout:
    """One family's exports: its layout module, the diffusers pipeline that loads its single file, the denoiser's
    subfolder (``unet`` / ``transformer``), the LoRA key style (:mod:`erase.export.lora`), kohya's
    ``ss_base_model_version`` and its modelspec architecture (Stability's model metadata spec, as kohya's
    ``library/sai_model_spec.py`` names them; :func:`architecture` refines SD 2.x and SD3.5)."""
    family: str
    module: str
    pipeline: str
    denoiser: str
    lora: str
    kohya_base: str | None
    architecture: str


LAYOUTS: dict[str, Layout] = {
    "sd1": Layout("sd1", "ldm", "StableDiffusionPipeline", "unet", "kohya", "sd_v1", "stable-diffusion-v1"),
    "sd2": Layout("sd2", "ldm", "StableDiffusionPipeline", "unet", "kohya", "sd_v2", "stable-diffusion-v2-512"),
    "sdxl": Layout("sdxl", "ldm", "StableDiffusionXLPipeline", "unet", "kohya_sgm", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    "sd3": Layout("sd3", "sd3", "StableDiffusion3Pipeline", "transformer", "peft", None, "stable-diffusion-3-medium"),
    "sd35": Layout("sd35", "sd3", "StableDiffusion3Pipeline", "transformer", "peft", None, "stable-diffusion-3-5-large"),
    "flux_dev": Layout("flux_dev", "flux", "FluxPipeline", "transformer", "peft", None, "flux-1-dev"),
    "flux_schnell": Layout("flux_schnell", "flux", "FluxPipeline", "transformer", "peft", None, "flux-1-schnell"),
}


def detect(denoiser_config: dict, text_configs: list[dict] | None = None) -> tuple[str, str]:
    """(family, why) from the denoiser's config (an SD3 or Flux transformer, else a UNet) and, for a UNet, the text
    encoders' configs in pipeline order (:func:`erase.export.layouts.ldm.detect_family`)."""
    from erase.export.layouts import flux, ldm, sd3

    for module in (sd3, flux):
        found = module.detect(denoiser_config)
        if found is not None:
            return found
    if denoiser_config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise LayoutError(f"a {denoiser_config['_class_name']} denoiser has no original layout here; supported: "
                          f"{', '.join(LAYOUTS)}")
    return ldm.detect_family(denoiser_config, list(text_configs or []))


def v_prediction(scheduler_config: dict | None) -> bool:
    return (scheduler_config or {}).get("prediction_type") == "v_prediction"


def architecture(family: str, denoiser_config: dict, scheduler_config: dict | None = None) -> str:
    """The modelspec architecture: SD 2.x 768-v (v-prediction) is ``stable-diffusion-v2-768-v``, SD 2.x base
    ``-512``; SD3.5 medium (dual-attention blocks) is ``stable-diffusion-3-5-medium``, large ``-large``."""
    if family == "sd2" and v_prediction(scheduler_config):
        return "stable-diffusion-v2-768-v"
    if family == "sd35" and denoiser_config.get("dual_attention_layers"):
        return "stable-diffusion-3-5-medium"
    return LAYOUTS[family].architecture


def markers(family: str, scheduler_config: dict | None) -> dict[str, torch.Tensor]:
    """Top-level keys a client reads the sampling parametrisation from: an SDXL v-prediction single file carries
    ``v_pred`` (and ``ztsnr`` with zero terminal SNR), which ComfyUI's ``supported_models.SDXL.model_type`` looks for
    (without them it samples as epsilon). Other families need none (SD 2.x: ComfyUI and A1111 probe the weights)."""
    if family != "sdxl" or not v_prediction(scheduler_config):
        return {}
    out = {"v_pred": torch.tensor([])}
    if (scheduler_config or {}).get("rescale_betas_zero_snr"):
        out["ztsnr"] = torch.tensor([])
    return out


def pipeline_to_file(family: str, denoiser: tuple[dict, dict], vae: tuple[dict, dict], text_states: list[dict]) -> dict[str, torch.Tensor]:
    """The whole pipeline as one flat state dict in ``family``'s original layout, tensors as given (meta tensors work:
    :func:`materialize` makes them files)."""
    from erase.export.layouts import flux, ldm, sd3

    module = LAYOUTS[family].module
    if module == "sd3":
        return sd3.pipeline_to_sd3(denoiser, vae, text_states)
    if module == "flux":
        return flux.pipeline_to_flux(denoiser, vae, text_states)
    return ldm.pipeline_keys(family, denoiser, vae, text_states)
