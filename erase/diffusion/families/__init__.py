"""Model families: one table from a Stable Diffusion family to what differs between families, and its detection.

A family is a row of :data:`FAMILIES`, not a code path (peft's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``,
k-diffusion's one wrapper per family). A row says which text encoders condition the UNet and how their outputs are
taken, whether the UNet takes extra conditioning (SDXL: ``added_cond_kwargs``), which diffusers pipeline class
generates, the target presets and the native resolution. The prediction type (epsilon / v) is not a family
property: it comes from the scheduler config of each model (SD 2.x base is epsilon, SD 2.x 768 is v).

* ``sd1``: SD v1.x. One CLIP text encoder, its last hidden state (after the final layer norm), as
  ``StableDiffusionPipeline`` encodes prompts.
* ``sd2``: SD v2.x. One OpenCLIP-ViT-H text encoder converted to ``CLIPTextModel`` (its config already stops at the
  penultimate OpenCLIP layer); its last hidden state, as ``StableDiffusionPipeline`` encodes them. UNet with
  linear projections and 1024-wide cross-attention.
* ``sdxl``: SDXL base. Two encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``); the penultimate hidden
  states of both, concatenated, condition the cross-attention; the second encoder's pooled (projected) embedding and
  the size ``time_ids`` (original size, crop top-left, target size) go in through ``added_cond_kwargs``
  (``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids``). With ``force_zeros_for_empty_prompt`` (the
  base's setting) the unconditional branch of guidance is zeros, not the encoded empty prompt: so is ours.

Detection (:func:`detect`) reads ``model_index.json`` and ``unet/config.json``: ``addition_embed_type ==
"text_time"`` is SDXL; ``cross_attention_dim == 1024`` or linear projections is SD 2.x; any other UNet is SD 1.x.
A folder whose denoiser is a transformer (Flux, SD3, PixArt: ``transformer/`` and no ``unet/``) is refused in one
line naming the supported families.

Packed conditioning: the adapter and the methods handle one tensor per prompt. For a family with a pooled embedding
that tensor is the hidden states with one more token appended, the pooled vector zero-padded to the hidden width;
:class:`Conditioner` turns it back into the UNet's keyword arguments. Everything that indexes, stacks or mixes
prompt embeddings (redirect, ESD's guidance, distillation) therefore works unchanged for every family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from erase.utils.errors import UserError

_ATTN_PROJ = r"(to_q|to_k|to_v|to_out\.0)\.(weight|bias)"

#: Target presets of the SD 1.x / 2.x UNet (the meaning every erase/sd.py run has had).
UNET_PRESETS: dict[str, str] = {
    "xattn": rf".*\.attn2\.{_ATTN_PROJ}",  # ESD-x / Scissorhands SD default: cross-attention q, k, v, out
    "selfattn": rf".*\.attn1\.{_ATTN_PROJ}",
    # ESD-u (as ESD's train_method "noxattn"): all but cross-attention, the time embedding and the output layers
    "noxattn": r"(?!.*\.attn2\.|time_embedding\.|conv_norm_out\.|conv_out\.).*",
    "full": r".*",
}
#: SDXL: ``xattn`` is every ``attn2`` of every transformer block (10 deep in its inner blocks); ``noxattn`` also
#: leaves out ``add_embedding``, the pooled-text + size embedding that plays the time embedding's part.
SDXL_PRESETS: dict[str, str] = {
    **UNET_PRESETS,
    "noxattn": r"(?!.*\.attn2\.|time_embedding\.|add_embedding\.|conv_norm_out\.|conv_out\.).*",
}


class ConfigUnreadable(UserError):
    """A model's config files could not be read (offline without a cache, a bad hub id, unreadable JSON)."""


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    pipeline_class: str
    #: (tokenizer subfolder, text encoder subfolder, transformers class) in the order their outputs are concatenated
    text_encoders: tuple[tuple[str, str, str], ...]
    #: which hidden state conditions the cross-attention: "last" (after the final norm) or "penultimate"
    hidden_state: str
    #: the last encoder's pooled embedding and the size time_ids go into ``added_cond_kwargs``
    pooled: bool
    #: the resolution the family's reference checkpoints were trained at (a run uses the UNet's sample_size x the VAE
    #: scale factor, which is this for them; this when the UNet config has no sample_size)
    native_resolution: int
    target_presets: dict

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline components holding weights."""
        return ("unet", "vae") + tuple(enc for _, enc, _ in self.text_encoders)

    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments every ``from_pretrained`` / constructor call of this family's pipeline gets."""
        if self.pooled:
            return {"add_watermarker": False}
        return {"safety_checker": None, "requires_safety_checker": False}


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "Stable Diffusion 1.x", "StableDiffusionPipeline", (("tokenizer", "text_encoder", "CLIPTextModel"),),
                  "last", False, 512, UNET_PRESETS),
    "sd2": Family("sd2", "Stable Diffusion 2.x", "StableDiffusionPipeline", (("tokenizer", "text_encoder", "CLIPTextModel"),),
                  "last", False, 768, UNET_PRESETS),
    "sdxl": Family("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline",
                   (("tokenizer", "text_encoder", "CLIPTextModel"), ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection")),
                   "penultimate", True, 1024, SDXL_PRESETS),
}
#: Pipelines of other denoisers, named in the refusal (their folders have transformer/ instead of unet/).
_TRANSFORMER_PIPELINES = ("Flux", "StableDiffusion3", "PixArt", "Sana", "HunyuanDiT", "Lumina", "CogView", "AuraFlow")


def supported() -> str:
    return ", ".join(f"{f.name} ({f.title})" for f in FAMILIES.values())


def _read_json(name: str, filename: str, subfolder: str | None, revision: str | None) -> dict | None:
    """A config file of a local folder or a hub id (through the hub cache); None when it does not exist."""
    path = Path(name).expanduser()
    if path.is_dir():
        p = path / subfolder / filename if subfolder else path / filename
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigUnreadable(f"{p} is not readable JSON ({e})") from None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        found = hf_hub_download(name, filename, subfolder=subfolder, revision=revision)
    except Exception as e:  # not on the hub / offline without a cache
        missing = isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError)
        if missing or subfolder is None:
            return None  # the repository has no such file (or model_index.json is unreachable): the UNet config decides
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigUnreadable(f"could not read {subfolder}/{filename} of {name!r}: {message}") from None
    return json.loads(Path(found).read_text(encoding="utf-8"))


def family_of(unet_config: dict) -> str:
    """The family a UNet config belongs to (see the module docstring)."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def detect(name: str, revision: str | None = None, force: str | None = None) -> Family:
    """The family of the model folder or hub id ``name``; ``force`` names it instead (checked against the UNet)."""
    if force is not None and force not in FAMILIES:
        raise UserError(f"unknown model family {force!r}; supported: {supported()}")
    index = _read_json(name, "model_index.json", None, revision)
    cls = (index or {}).get("_class_name", "")
    other = cls if any(cls.startswith(p) for p in _TRANSFORMER_PIPELINES) else None
    if other is None and index is not None and "transformer" in index and "unet" not in index:
        other = cls or "transformer-denoiser pipeline"
    if other is None and Path(name).expanduser().is_dir() and (Path(name).expanduser() / "transformer").is_dir() \
            and not (Path(name).expanduser() / "unet").is_dir():
        other = cls or "transformer-denoiser pipeline"
    if other:
        raise UserError(f"{name!r} is a {other} model (its denoiser is a transformer, not a UNet); "
                        f"supported families: {supported()}")
    unet = _read_json(name, "config.json", "unet", revision)
    if unet is None:
        raise UserError(f"{name!r} has no unet/config.json: not a diffusers Stable Diffusion model; supported families: {supported()}")
    found = family_of(unet)
    if force is None:
        return FAMILIES[found]
    # sd1 and sd2 share every code path (one CLIP-style encoder, no added conditioning): either may be forced on
    # the other; SDXL's added conditioning either is in the UNet or is not.
    if (force == "sdxl") != (found == "sdxl"):
        why = "its UNet takes the text_time added conditioning" if found == "sdxl" else "its UNet has no text_time added conditioning"
        raise UserError(f"model family {force!r} contradicts {name!r}: {why}, so it is {found} ({FAMILIES[found].title})")
    return FAMILIES[force]


def load_text(family: Family, name: str, revision: str | None = None, variant: str | None = None) -> "TextStack":
    """The family's tokenizers and text encoders from a folder or hub id."""
    import transformers
    from transformers import CLIPTokenizer

    tokenizers, encoders = [], []
    for tok, enc, cls in family.text_encoders:
        tokenizers.append(CLIPTokenizer.from_pretrained(name, subfolder=tok, revision=revision))
        encoders.append(getattr(transformers, cls).from_pretrained(name, subfolder=enc, revision=revision, variant=variant))
    index = _read_json(name, "model_index.json", None, revision) or {}
    return TextStack(family, tokenizers, encoders, zero_uncond=family.pooled and bool(index.get("force_zeros_for_empty_prompt", True)))


def text_from_pipeline(family: Family, pipe) -> "TextStack":
    """The family's tokenizers and text encoders of an already loaded pipeline (shared, not copied)."""
    tokenizers = [getattr(pipe, tok, None) for tok, _, _ in family.text_encoders]
    encoders = [getattr(pipe, enc, None) for _, enc, _ in family.text_encoders]
    missing = [name for (tok, enc, _), t, e in zip(family.text_encoders, tokenizers, encoders) for name, part in ((tok, t), (enc, e)) if part is None]
    if missing:
        raise UserError(f"the pipeline has no {missing[0]}, which a {family.title} model needs")
    zero = family.pooled and bool(getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", True))
    return TextStack(family, tokenizers, encoders, zero_uncond=zero)


class TextStack:
    """The frozen text side of one family: prompts -> packed conditioning tensors (see the module docstring)."""

    def __init__(self, family: Family, tokenizers: list, encoders: list, zero_uncond: bool = False):
        self.family, self.tokenizers, self.encoders, self.zero_uncond = family, tokenizers, encoders, zero_uncond

    @property
    def max_length(self) -> int:
        return min(t.model_max_length for t in self.tokenizers)

    def to(self, device, dtype=None) -> "TextStack":
        for e in self.encoders:
            e.requires_grad_(False)
            e.to(device, dtype=dtype)
        return self

    def pooled_dim(self) -> int:
        return int(self.encoders[-1].config.projection_dim) if self.family.pooled else 0

    @torch.no_grad()
    def encode(self, prompts: list[str], device, batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            hidden, pooled = [], None
            for tok, enc in zip(self.tokenizers, self.encoders):
                ids = tok(chunk, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(device)
                if self.family.hidden_state == "last":
                    res = enc(ids)
                    hidden.append(res[0])
                else:
                    res = enc(ids, output_hidden_states=True)
                    hidden.append(res.hidden_states[-2])
                pooled = res[0] if self.family.pooled else None  # the last encoder's projected text embedding
            h = torch.cat(hidden, dim=-1)
            if self.family.pooled:
                h = pack(h, pooled)
            out.append(h)
        return torch.cat(out)

    def uncond(self, device) -> torch.Tensor:
        """The unconditional branch of guidance: the empty prompt, or zeros where the pipeline zeroes it."""
        e = self.encode([""], device)
        return torch.zeros_like(e) if self.zero_uncond else e


def pack(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, L, D) hidden states + (B, P) pooled -> (B, L + 1, D), the pooled vector zero-padded as the last token."""
    if pooled.shape[-1] > hidden.shape[-1]:
        raise ValueError(f"pooled width {pooled.shape[-1]} exceeds the hidden width {hidden.shape[-1]}; cannot pack")
    row = torch.zeros(hidden.shape[0], 1, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    row[:, 0, : pooled.shape[-1]] = pooled.to(hidden.dtype)
    return torch.cat([hidden, row], dim=1)


class Conditioner:
    """Packed conditioning -> the UNet's keyword arguments (``encoder_hidden_states``, SDXL's ``added_cond_kwargs``)."""

    def __init__(self, family: Family, resolution: int = 0, pooled_dim: int = 0):
        self.family, self.resolution, self.pooled_dim = family, int(resolution), int(pooled_dim)
        if family.pooled and (self.resolution < 8 or self.pooled_dim < 1):
            raise ValueError(f"{family.name} conditioning needs the resolution and the pooled width")
        # SDXL micro-conditioning: original size, crop top-left, target size (training images are square crops)
        self.time_ids = torch.tensor([[self.resolution, self.resolution, 0, 0, self.resolution, self.resolution]], dtype=torch.float32)

    def __call__(self, cond: torch.Tensor) -> dict:
        if not self.family.pooled:
            return {"encoder_hidden_states": cond}
        n = cond.shape[0]
        return {"encoder_hidden_states": cond[:, :-1],
                "added_cond_kwargs": {"text_embeds": cond[:, -1, : self.pooled_dim],
                                      "time_ids": self.time_ids.to(cond.device, cond.dtype).expand(n, -1)}}

    def describe(self) -> dict:
        out = {"model_family": self.family.name, "hidden_state": self.family.hidden_state}
        if self.family.pooled:
            out.update(time_ids=self.time_ids[0].tolist(), pooled_dim=self.pooled_dim)
        return out


def build_pipeline(family: Family, text: TextStack, vae, unet, scheduler):
    """The family's pipeline over already loaded components (data generation by the base model)."""
    parts = {"vae": vae, "unet": unet, "scheduler": scheduler, "feature_extractor": None}
    for (tok, enc, _), t, e in zip(family.text_encoders, text.tokenizers, text.encoders):
        parts[tok], parts[enc] = t, e
    kwargs = family.pipeline_kwargs()
    if family.pooled:
        kwargs["force_zeros_for_empty_prompt"] = text.zero_uncond
        kwargs["image_encoder"] = None
    return family.pipeline_cls()(**parts, **kwargs)
