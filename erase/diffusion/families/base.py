"""What every model family shares: the :class:`Family` row, the frozen text stack (:class:`TextStack`), packed
conditioning (:func:`pack`, :class:`Conditioner`) and the UNet target presets. One module per family beside this one
(``sd1``, ``sd2``, ``sdxl``) holds its row.

Packed conditioning: the adapter and the methods handle one tensor per prompt. For a family with a pooled embedding
that tensor is the hidden states with one more token appended, the pooled vector zero-padded to the hidden width;
:class:`Conditioner` turns it back into the UNet's keyword arguments. Everything that indexes, stacks or mixes
prompt embeddings (redirect, ESD's guidance, distillation) therefore works unchanged for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ATTN_PROJ = r"(to_q|to_k|to_v|to_out\.0)\.(weight|bias)"


#: Target presets of the SD 1.x / 2.x UNet (the meaning every erase/sd.py run has had).
UNET_PRESETS: dict[str, str] = {
    "xattn": rf".*\.attn2\.{_ATTN_PROJ}",  # ESD-x / Scissorhands SD default: cross-attention q, k, v, out
    "selfattn": rf".*\.attn1\.{_ATTN_PROJ}",
    # self- and cross-attention: --robust's default on a UNet (chosen on the tuning digits, docs/ROBUST.md)
    "attn": rf".*\.attn[12]\.{_ATTN_PROJ}",
    # ESD-u (as ESD's train_method "noxattn"): all but cross-attention, the time embedding and the output layers
    "noxattn": r"(?!.*\.attn2\.|time_embedding\.|conv_norm_out\.|conv_out\.).*",
    "full": r".*",
}

#: The UNet's layers whose input is the prompt alone (closed-form editors: erase/diffusion/closed_form.py): module-name
#: regex, the text stream it reads ("tokens": the cross-attention context), its role. An MMDiT's: families/mmdit.py.
UNET_TEXT_LAYERS: tuple[tuple[str, str, str], ...] = (
    (r".*\.attn2\.to_k", "tokens", "key"),
    (r".*\.attn2\.to_v", "tokens", "value"),
)


def token_embedding_modules(text_encoder) -> list:
    """The token-embedding modules a text encoder's forward calls: ``get_input_embeddings()`` and every other
    ``nn.Embedding`` sharing its weight (T5's encoder calls its own ``embed_tokens``, tied to ``shared``, which
    ``get_input_embeddings()`` returns), so a forward hook on each sees the tokens of CLIP and T5 alike."""
    module = text_encoder.get_input_embeddings()
    return [module] + [m for m in text_encoder.modules()
                       if m is not module and isinstance(m, torch.nn.Embedding) and m.weight is module.weight]


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
    #: whether a denoiser config (``unet/config.json``, ``transformer/config.json``) is of this family; families are
    #: asked in :data:`DETECTION_ORDER`
    matches: object = None
    #: the denoiser's subfolder and diffusers class, and the training scheduler's class
    denoiser: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    scheduler_class: str = "DDPMScheduler"
    #: the objective (erase.diffusion.objectives): "ddpm" (epsilon / v noise prediction) or "flow" (rectified flow)
    objective: str = "ddpm"
    #: the text stack and conditioner classes (None: this module's :class:`TextStack` / :class:`Conditioner`)
    text_stack: type | None = None
    conditioner: type | None = None
    #: data generation's defaults: guidance scale and sampler (erase.diffusion.generate names)
    default_guidance: float = 7.5
    data_scheduler: str = "ddim"
    #: latent pixels per image token side (Flux packs 2x2 latent patches), for the flow objective's resolution shift
    latent_patch: int = 1
    #: what a preset of ``--targets`` means in words, for ``--list_targets`` and the record
    preset_notes: dict | None = None
    #: the denoiser's layers whose input is the prompt alone: (module-name regex, text stream, role), for closed-form
    #: editors (UCE, SPEED; erase/diffusion/closed_form.py)
    text_layers: tuple = UNET_TEXT_LAYERS

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline components holding weights."""
        return (self.denoiser, "vae") + tuple(enc for _, enc, _ in self.text_encoders)

    def denoiser_cls(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class)

    def make_text(self, tokenizers: list, encoders: list, zero_uncond: bool = False) -> "TextStack":
        return (self.text_stack or TextStack)(self, tokenizers, encoders, zero_uncond=zero_uncond)

    def make_conditioner(self, resolution: int, text: "TextStack", denoiser) -> "Conditioner":
        """Packed conditioning -> the denoiser's inputs, for this family at ``resolution``."""
        if self.conditioner is not None:
            return self.conditioner(self, resolution, text.pooled_dim(), denoiser)
        return Conditioner(self, resolution, text.pooled_dim())

    def make_objective(self, scheduler, latent_shape: tuple):
        from erase.diffusion.objectives import FlowObjective, NoiseObjective

        if self.objective == "flow":
            return FlowObjective(scheduler, latent_shape, patch=self.latent_patch)
        return NoiseObjective(scheduler)

    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def call_kwargs(self, pipe) -> dict:
        """Keyword arguments every generation call of this family's pipeline gets, so that it conditions on the prompt as
        the erasure does (:class:`TextStack`): for an MMDiT, T5's sequence length, the pipeline's default capped by the T5
        tokenizer's ``model_max_length`` (the real SD3 / Flux tokenizers hold 512, so the defaults 256 / 512 stand; a small
        model trained on short prompts, like the digits transformer, is sampled at the length it learned)."""
        default = getattr(self.text_stack, "max_sequence_length", None)
        tok = getattr(pipe, self.text_encoders[-1][0], None)
        if default is None or tok is None:
            return {}
        return {"max_sequence_length": min(int(default), int(tok.model_max_length))}

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments every ``from_pretrained`` / constructor call of this family's pipeline gets."""
        if self.denoiser != "unet":
            return {}
        if self.pooled:
            return {"add_watermarker": False}
        return {"safety_checker": None, "requires_safety_checker": False}


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
        return self.encode_with_grad(prompts, device, batch_size)

    def encode_with_grad(self, prompts: list[str], device, batch_size: int = 32) -> torch.Tensor:
        """:meth:`encode` with autograd left as the caller has it (the prompt attacks of eval.attack learn input
        embeddings through the family's own encoding)."""
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

    def token_segments(self) -> list:
        """(tokenizer, length) of each tokenizer's run of the token stream, in order (closed-form editors find a prompt's
        last word token in each): SD 1.x / 2.x / XL one CLIP window (SDXL's two encoders share it, joined feature-wise)."""
        return [(self.tokenizers[0], self.max_length)]

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
