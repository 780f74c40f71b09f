"""The models of benchmarks/architectures.py built in code with random weights, directly on the device (nothing is
downloaded or read from disk), as the run's own objects: :class:`erase.diffusion.load.Components` (the run's stage 1)
and the family's pipeline (``erase.diffusion.families.build_pipeline``); and their FLOPs per pass, counted on the meta
device (``torch.utils.flop_counter``: no memory, no compute), for benchmarks/gpu_figures.py's time plan.

Tokenizers are eval/tiny.py's (a byte-level CLIP BPE and a T5 Unigram built in memory): they tokenize any text into ids
the real vocabularies hold, padded to the real lengths (77 CLIP tokens, the family pipeline's T5 length).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created inside are of ``dtype`` (a 12 B model built in bf16 never exists in fp32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def family_of(arch):
    from erase.diffusion.families import FAMILIES

    return FAMILIES[arch.family]


def build_tokenizers(arch) -> list:
    from eval.tiny import build_t5_tokenizer, build_tokenizer

    return [build_t5_tokenizer(max_length=arch.t5_tokens) if cls.startswith("T5") else build_tokenizer()
            for _, _, cls in family_of(arch).text_encoders]


def build_text_encoders(arch, tokenizers: list, layers: int | None = None) -> list:
    """The family's text encoders (classes from its row) from the arch's configs; ``layers`` cuts each to that many
    blocks at its real widths."""
    import transformers

    out = []
    for (_, _, cls_name), cfg, tok in zip(family_of(arch).text_encoders, arch.text, tokenizers):
        cls = getattr(transformers, cls_name)
        cfg = dict(cfg)
        t5 = cls_name.startswith("T5")
        if layers is not None:
            cfg["num_layers" if t5 else "num_hidden_layers"] = layers
        if t5:
            cfg.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id, use_cache=False)
        else:
            cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append(cls(cls.config_class(**cfg)).eval())
    return out


def build_parts(arch, device, dtype: torch.dtype = torch.float32, text_layers: int | None = None):
    """Stage 1's :class:`erase.diffusion.load.Components` of ``arch`` on ``device`` in ``dtype`` (the run loads the
    denoiser in fp32 and ``erase.diffusion.load.place`` casts what it does not train), seeded, with the family's training
    scheduler from the arch's scheduler config."""
    import diffusers
    from diffusers import AutoencoderKL

    from erase.diffusion.load import Components

    family = family_of(arch)
    tokenizers = build_tokenizers(arch)
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        denoiser = family.denoiser_cls()(**arch.denoiser)
        vae = AutoencoderKL(**arch.vae)
        encoders = build_text_encoders(arch, tokenizers, text_layers)
    text = family.make_text(tokenizers, encoders, zero_uncond=family.pooled)
    scheduler = getattr(diffusers, family.scheduler_class).from_config(arch.scheduler)
    return Components(family, text, vae.requires_grad_(False), denoiser, scheduler)


def sampler_of(arch) -> str:
    """The sampler an audit generates with: the I2P protocols' LMS for the UNet families, the family's flow-matching
    Euler for SD3 / Flux (erase.diffusion.generate.SCHEDULERS names)."""
    family = family_of(arch)
    return "lms" if family.denoiser == "unet" else family.data_scheduler


def build_generation_pipeline(arch, device, dtype: torch.dtype):
    """The family's pipeline (the run's ``build_pipeline``) over full-size parts in ``dtype``, with the audit sampler."""
    import diffusers

    from erase.diffusion.families import build_pipeline
    from erase.diffusion.generate import SCHEDULERS

    parts = build_parts(arch, device, dtype)
    scheduler = getattr(diffusers, SCHEDULERS[sampler_of(arch)]).from_config(arch.scheduler)
    pipe = build_pipeline(parts.family, parts.text, parts.vae, parts.denoiser, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cond_shape(arch) -> tuple[int, int]:
    """(tokens, width) of the text conditioning the denoiser reads: 77 CLIP tokens (SDXL's two encoders side by side);
    SD3: 77 CLIP + the T5 tokens at T5's width; Flux: the T5 tokens."""
    widths = [c.get("d_model") or c["hidden_size"] for c in arch.text]
    family = family_of(arch)
    if family.denoiser == "unet":
        return 77, sum(widths)
    return (77 if family.name == "sd3" else 0) + arch.t5_tokens, widths[-1]


def pooled_width(arch) -> int:
    family = family_of(arch)
    if not family.pooled:
        return 0
    if family.name == "sd3":
        return arch.text[0]["projection_dim"] + arch.text[1]["projection_dim"]
    if family.name == "flux":
        return arch.text[0]["hidden_size"]
    return arch.text[-1]["projection_dim"]


def denoiser_call(arch, model, conditioner, zt, t, cond):
    """One prediction as the run's adapter makes it (``DiffusionAdapter.predict``): through the family conditioner."""
    if hasattr(conditioner, "predict"):
        return conditioner.predict(model, zt, t, cond)
    return model(zt, t, **conditioner(cond), return_dict=False)[0]


def count_flops(arch) -> dict:
    """FLOPs of one denoiser forward and one VAE decode at batch 1 and the arch's resolution, and the parameter counts,
    counted on the meta device (exact for matmuls, convolutions and attention; elementwise work is not counted)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    family = family_of(arch)
    tokens, width = cond_shape(arch)
    with torch.device("meta"), default_dtype(torch.bfloat16):
        denoiser = family.denoiser_cls()(**arch.denoiser)
        vae = AutoencoderKL(**arch.vae)
        conditioner = _conditioner(arch, denoiser)
        zt = torch.randn(1, arch.vae["latent_channels"], arch.latent, arch.latent)
        cond = torch.randn(1, tokens + (1 if family.pooled else 0), width)
        t = torch.full((1,), 500.0) if family.objective == "flow" else torch.full((1,), 500, dtype=torch.long)
        out = {}
        for name, fn in (("denoiser_forward", lambda: denoiser_call(arch, denoiser, conditioner, zt, t, cond)),
                         ("vae_decode", lambda: vae.decode(zt))):
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                fn()
            out[name] = counter.get_total_flops()
    out["denoiser_parameters"] = sum(p.numel() for p in denoiser.parameters())
    return out


def _conditioner(arch, denoiser):
    """The family's conditioner for a denoiser without building its text stack (only the pooled width is read)."""
    family = family_of(arch)
    if family.conditioner is not None:
        return family.conditioner(family, arch.resolution, pooled_width(arch), denoiser)
    from erase.diffusion.families import Conditioner

    return Conditioner(family, arch.resolution, pooled_width(arch))
