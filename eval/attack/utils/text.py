"""Prompt text through every text encoder a family has (SDXL: CLIP-L + CLIP-G; SD3: CLIP-L + CLIP-G + T5; Flux:
CLIP-L + T5), for the prompt attacks: the words typable as one token in every tokenizer, where a prefix's tokens sit
in each tokenizer's ids, and the family's packed conditioning of prompt texts with chosen input-embedding rows of
each encoder replaced (gradients kept), through the family's own text stack (erase.diffusion.families)."""

from __future__ import annotations

from contextlib import ExitStack

from erase.utils.errors import UserError
from eval.attack.utils.tokens import TokenEmbeddingOverride, content_ids, typable_tokens

#: the names of each encoder's learned embedding in an inversion file (SDXL: the clip_l / clip_g layout of SDXL
#: textual-inversion files, which A1111, ComfyUI and diffusers' SDXL recipe read); SD 1.x / 2.x keep {token: vector}
EMBEDDING_KEYS = {"sdxl": ("clip_l", "clip_g"), "sd3": ("clip_l", "clip_g", "t5"), "flux": ("clip_l", "t5")}


def embedding_keys(family) -> tuple[str, ...]:
    return EMBEDDING_KEYS.get(family.name) or tuple(enc for _, enc, _ in family.text_encoders)


def shared_typable(tokenizers, exclude_words: list[str] | None = None) -> tuple[list[list[int]], list[str]]:
    """(ids per tokenizer, texts) of the words that are one typable token in *every* tokenizer (no special token):
    the first tokenizer's typable tokens (``typable_tokens``) whose text is also exactly one token of each other one.
    Written with spaces between them, such words are the same text, and the same number of tokens, for every encoder."""
    ids0, texts = typable_tokens(tokenizers[0], exclude_words)
    keep = [True] * len(texts)
    per = [ids0]
    for tok in tokenizers[1:]:
        special = set(tok.all_special_ids)
        enc = tok(texts, add_special_tokens=False).input_ids
        keep = [k and len(e) == 1 and e[0] not in special for k, e in zip(keep, enc)]
        per.append([e[0] if len(e) == 1 else -1 for e in enc])
    idx = [i for i, k in enumerate(keep) if k]
    return [[ids[i] for i in idx] for ids in per], [texts[i] for i in idx]


def content_offset(tokenizer, text: str) -> int:
    """Where ``text``'s own tokens start in the ids the tokenizer gives it (1 after CLIP's BOS, 0 for T5)."""
    full, own = list(tokenizer(text).input_ids), content_ids(tokenizer, text)
    return next((i for i in range(len(full)) if full[i:i + len(own)] == own), 0)


class PromptEncoders:
    """The family's text stack (``pipeline_text``) with input-embedding overrides: ``encode(texts, rows)``, ``rows``
    one ``rows(input_ids) -> (mask, values) | None`` per encoder (``TokenEmbeddingOverride``), or None to leave it."""

    def __init__(self, text, device):
        self.text, self.device = text, device
        self.family = text.family
        self.tokenizers, self.encoders = list(text.tokenizers), list(text.encoders)

    def encode(self, texts: list[str], rows: list) -> object:
        """Packed conditioning of ``texts`` (one batch), gradients kept to every override's values."""
        with ExitStack() as stack:
            for enc, r in zip(self.encoders, rows):
                if r is not None:
                    stack.enter_context(TokenEmbeddingOverride(enc, r))
            return self.text.encode_with_grad(list(texts), self.device, batch_size=max(1, len(texts))).float()

    def prefix_rows(self, offsets: list[int], k: int, embeds: list):
        """One ``rows`` per encoder replacing positions ``offset .. offset + k`` of every prompt by ``embeds[e]``
        (n, k, D_e), in batch order."""
        def make(offset, values):
            def rows(input_ids):
                mask = input_ids.new_zeros(input_ids.shape, dtype=bool)
                mask[:, offset:offset + k] = True
                return mask, values.reshape(-1, values.shape[-1])
            return rows
        return [make(o, x) for o, x in zip(offsets, embeds)]

    def token_rows(self, token_ids: list[int], vecs: list):
        """One ``rows`` per encoder replacing every occurrence of its new token by its vector."""
        def make(token_id, vec):
            def rows(input_ids):
                mask = input_ids == token_id
                return (mask, vec.expand(int(mask.sum()), -1)) if mask.any() else None
            return rows
        return [make(t, v) for t, v in zip(token_ids, vecs)]

    def placeholder_offsets(self, word: str, k: int, prompt: str) -> list[int]:
        """Each tokenizer's offset of a ``k``-word prefix of ``word`` before ``prompt``; a tokenizer that does not
        keep them as ``k`` tokens of ``word`` before the prompt's own tokens is one line."""
        text = " ".join([word] * k + [prompt]).strip()
        out = []
        for tok in self.tokenizers:
            one = content_ids(tok, word)
            if content_ids(tok, text)[:k] != one * k or len(one) != 1:
                raise UserError(f"the prefix word {word!r} does not stay one token before the prompt for "
                                f"{type(tok).__name__}; cannot place the adversarial tokens")
            out.append(content_offset(tok, text))
        return out
