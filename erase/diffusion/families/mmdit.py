"""What the MMDiT families (SD3 / SD3.5, Flux) share: a text stack that encodes through the family pipeline's own
``encode_prompt`` (so our conditioning is the pipeline's, token for token), and the target presets that name each text
path of a joint-attention transformer.

An MMDiT has no cross-attention: the prompt enters as a token stream (``context_embedder``, then the text-stream
projections of the joint blocks: ``add_q_proj`` / ``add_k_proj`` / ``add_v_proj`` / ``to_add_out``, then, in Flux, the
concatenated tokens of the single blocks) and as a pooled CLIP vector in the timestep / adaLN embedding
(``time_text_embed.text_embedder``). The presets:

* ``text``: the token stream's entry and the joint blocks' text-stream attention projections;
* ``pooled``: the pooled path (``time_text_embed.text_embedder``);
* ``text_pooled``: both;
* ``xattn`` = ``text``, the default: chosen by the transformer digits table on the tuning digits seven and one by the
  written rule of ``benchmarks/digits_tune.py`` (docs/FAMILIES.md, "Which text path is cut", gives the table);
* ``joint_attn``: every attention projection of every block, image and text streams (and Flux's single blocks);
* ``selfattn``: the image stream's attention projections; ``noxattn``: everything but the text paths; ``full``.
"""

from __future__ import annotations

import torch

from erase.diffusion.families.base import TextStack, pack

_TEXT_STREAM = r"transformer_blocks\.\d+\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)\.(weight|bias)"
_CONTEXT = r"context_embedder\.(weight|bias)"
_POOLED = r"time_text_embed\.text_embedder\..*"
_IMAGE_ATTN = r"(single_)?transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)"

MMDIT_PRESETS: dict[str, str] = {
    "text": rf"({_CONTEXT}|{_TEXT_STREAM})",
    "pooled": _POOLED,
    "text_pooled": rf"({_CONTEXT}|{_TEXT_STREAM}|{_POOLED})",
    "xattn": rf"({_CONTEXT}|{_TEXT_STREAM})",  # the default: the token stream (chosen on the tuning digits, see above)
    "joint_attn": rf"({_TEXT_STREAM}|{_IMAGE_ATTN})",
    "selfattn": _IMAGE_ATTN,
    "noxattn": rf"(?!{_CONTEXT}$|{_TEXT_STREAM}$|{_POOLED}$).*",
    "full": r".*",
}
PRESET_NOTES = {
    "text": "the token stream: context_embedder and the joint blocks' text-stream q/k/v/out projections",
    "pooled": "the pooled CLIP path into the timestep/adaLN embedding (time_text_embed.text_embedder)",
    "text_pooled": "both text paths: the token stream and the pooled path",
    "xattn": "the default, the token stream (text): an MMDiT has no cross-attention; chosen on the tuning digits over "
             "text_pooled, pooled, joint_attn and full (docs/FAMILIES.md)",
    "joint_attn": "every attention projection of every block, image and text streams",
    "selfattn": "the image stream's attention projections",
    "noxattn": "everything but the two text paths",
    "full": "the whole transformer",
}

#: The layers whose input is the prompt alone (closed-form editors): the token stream's embedder and the first linear
#: layer of the pooled path (its second one follows an activation).
MMDIT_TEXT_LAYERS: tuple[tuple[str, str, str], ...] = (
    (r"context_embedder", "tokens", "embed"),
    (r"time_text_embed\.text_embedder\.linear_1", "pooled", "embed"),
)


class PipelineTextStack(TextStack):
    """The text side of an MMDiT family, encoded by its pipeline's own ``encode_prompt`` over the shared text encoders
    (a pipeline object with no transformer, VAE or scheduler), packed as hidden tokens + the pooled vector."""

    #: the pipeline's default T5 length (SD3 256, Flux 512), capped by the tokenizer's
    max_sequence_length = 256

    def __init__(self, family, tokenizers: list, encoders: list, zero_uncond: bool = False):
        super().__init__(family, tokenizers, encoders, zero_uncond=False)
        parts = {"transformer": None, "vae": None, "scheduler": None}
        for (tok, enc, _), t, e in zip(family.text_encoders, tokenizers, encoders):
            parts[tok], parts[enc] = t, e
        self.pipe = family.pipeline_cls()(**parts)
        self.sequence_length = min(self.max_sequence_length, int(tokenizers[-1].model_max_length))

    @property
    def max_length(self) -> int:
        return int(self.tokenizers[0].model_max_length)

    def _embed(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def encode_with_grad(self, prompts: list[str], device, batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), batch_size):
            hidden, pooled = self._embed(prompts[i : i + batch_size], device)
            out.append(pack(hidden, pooled))
        return torch.cat(out)

    def uncond(self, device) -> torch.Tensor:
        return self.encode([""], device)
