"""The diffusion side of closed-form editors (UCE, SPEED; erase/core/closed_form.py): which denoiser layers take the
prompt alone, and what they see for each prompt table of the run.

Layers come from the family row (``Family.text_layers``): a UNet's cross-attention ``attn2.to_k`` / ``to_v`` read the
token stream (``encoder_hidden_states``); an MMDiT's ``context_embedder`` reads the token stream and
``time_text_embed.text_embedder.linear_1`` the pooled vector (``pooled_projections``). Only those among the run's
targets are offered. What a layer sees is the run's packed prompt embeddings unpacked by the family's conditioner, so
it is what the denoiser gets, token for token. Tables:

* ``forget``: every concept's forget prompts, each with its concept (``group``) and anchor row;
* ``anchor``: the concepts' anchor prompts, then the empty prompt (the anchor of a concept that has none: UCE's '');
* ``preserve``: the concept set's retain prompts (the prompts the distill term keeps);
* ``uncond``: the unconditional branch as the run makes it (the empty prompt; SDXL's zeros).

Token layout: the text stack's ``token_segments`` (one CLIP window; SD3: CLIP's then T5's; Flux: T5's), each prompt's
last word token in each found by its tokenizer (``n − 2`` of its ``n`` tokens, the begin and end tokens counted; 0
for the empty prompt).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from erase.core.closed_form import TextFeatures, TextLayer

#: the conditioner's keyword argument each text stream is
STREAM_KEYS = {"tokens": "encoder_hidden_states", "pooled": "pooled_projections"}


class TextView:
    """A run's text-input layers and their inputs per prompt table (built by ``build_adapter``, computed on first use)."""

    def __init__(self, family, text, tables, embeddings, conditioner, concepts):
        self.family, self.text, self.conditioner = family, text, conditioner
        names = [c.name for c in concepts.concepts]
        # a concept without an anchor prompt is redirected to the empty prompt, one more anchor row
        self._empty_anchor = any(not c.anchor_prompt for c in concepts.concepts)
        anchors = list(tables.anchors) + ([""] if self._empty_anchor else [])
        concept_anchor = [anchors.index(c.anchor_prompt) if c.anchor_prompt else len(anchors) - 1 for c in concepts.concepts]
        rows = [r for g in tables.groups[: len(names)] for r in g]
        group = [k for k, g in enumerate(tables.groups[: len(names)]) for _ in g]
        self._tables = {
            "forget": ([tables.forget[r] for r in rows], embeddings.forget[rows]),
            "anchor": (anchors, embeddings.anchor if tables.anchors else None),
            "preserve": (list(tables.distill), embeddings.distill),
            "uncond": ([""], embeddings.uncond),
        }
        self._forget = {"group": group, "anchor": [concept_anchor[k] for k in group], "concepts": names}
        self._cache: dict = {}

    # -- layers -----------------------------------------------------------------------------------------------
    def layers(self, model: nn.Module, params: dict) -> list[TextLayer]:
        return find_text_layers(model, self.family.text_layers, params)

    # -- inputs -----------------------------------------------------------------------------------------------
    def features(self, table: str, stream: str) -> TextFeatures:
        if table not in self._tables:
            raise ValueError(f"prompt table {table!r} is not one of {', '.join(self._tables)}")
        if stream not in STREAM_KEYS:
            raise ValueError(f"text stream {stream!r} is not one of {', '.join(STREAM_KEYS)}")
        key = (table, stream)
        if key not in self._cache:
            self._cache[key] = self._features(table, stream)
        return self._cache[key]

    def _features(self, table: str, stream: str) -> TextFeatures:
        prompts, packed = self._tables[table]
        if table == "anchor" and self._empty_anchor:  # the run encodes no '' anchor: encode it where the text stack is
            empty = self.text.encode([""], next(self.text.encoders[0].parameters()).device)
            packed = empty if packed is None else torch.cat([packed, empty.to(packed)])
        if packed is None:
            raise ValueError(f"the run encoded no {table} prompts (closed-form editors keep the concept set's retain prompts: "
                             "--retain_loss distill)")
        inputs = self.conditioner(packed)
        if STREAM_KEYS[stream] not in inputs:
            raise ValueError(f"{self.family.title} conditioning has no {stream} text input")
        values = inputs[STREAM_KEYS[stream]].float()
        if stream == "pooled":
            values = values.unsqueeze(1)
            segments, last = [(0, 0, 1)], torch.zeros(len(prompts), 1, dtype=torch.long)
        else:
            segments, last = self._layout(prompts, int(values.shape[1]))
        extra = self._forget if table == "forget" else {}
        return TextFeatures(values, last, segments, list(prompts), **extra)

    def _layout(self, prompts: list[str], length: int) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
        segments, last, start = [], [], 0
        for tok, size in self.text.token_segments():
            empty = tok("").input_ids
            first = 1 if tok.bos_token_id is not None and empty and empty[0] == tok.bos_token_id else 0
            counts = [len(tok(p, truncation=True, max_length=size).input_ids) for p in prompts]
            last.append([start + min(max(n - 2, 0), size - 1) for n in counts])
            segments.append((start, start + first, start + size))
            start += size
        if start != length:
            raise ValueError(f"the {self.family.title} token layout ({start} positions) does not match its conditioning ({length})")
        return segments, torch.tensor(last, dtype=torch.long).T.reshape(len(prompts), len(segments))


def find_text_layers(model: nn.Module, patterns, params: dict) -> list[TextLayer]:
    """The linear layers of ``model`` named by ``patterns`` ((module-name regex, stream, role), a family's
    ``text_layers``) whose weight is among the targeted ``params``, in model order."""
    targeted = {id(p) for p in params.values()}
    out = []
    for name, module in model.named_modules():
        for pattern, stream, role in patterns:
            if re.fullmatch(pattern, name) and isinstance(module, nn.Linear) and id(module.weight) in targeted:
                out.append(TextLayer(name, module, stream, role))
                break
    return out
