"""Tokens: the typable vocabulary, prompt ids with an adversarial prefix, and replacing token embeddings inside
the text encoder while keeping gradients to the replacements."""

from __future__ import annotations


def typable_tokens(tokenizer, exclude_words: list[str] | None = None) -> tuple[list[int], list[str]]:
    """(ids, texts) of the tokens whose decoded text re-tokenises to exactly that one token; no special tokens.

    Such tokens, written with spaces between them, re-tokenise to themselves: a prompt built from them is text."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    ids = sorted(i for i in vocab.values() if i not in special)
    texts = [t.strip() for t in tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)]
    ok_ids, ok_texts = [], []
    candidates = [(i, t) for i, t in zip(ids, texts) if t and t.isprintable() and not any(c.isspace() for c in t)]
    encoded = tokenizer([t for _, t in candidates], add_special_tokens=False).input_ids
    banned = {w.lower() for w in exclude_words or []}
    for (i, t), enc in zip(candidates, encoded):
        if list(enc) == [i] and t.lower() not in banned:
            ok_ids.append(i)
            ok_texts.append(t)
    return ok_ids, ok_texts


def content_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def build_ids(tokenizer, adv: list[int], prompt_ids: list[int]) -> tuple[list[int], bool]:
    """[BOS] + adv + prompt + [EOS], padded to the window; True if the prompt had to be cut to fit."""
    room = tokenizer.model_max_length - 2 - len(adv)
    ids = [tokenizer.bos_token_id] + list(adv) + list(prompt_ids[:room]) + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ids + [pad] * (tokenizer.model_max_length - len(ids)), len(prompt_ids) > room


def join_prompt(prefix: str, prompt: str) -> str:
    return f"{prefix} {prompt}".strip()


def reencodes(tokenizer, text: str, adv: list[int], prompt: str) -> bool:
    """Does ``text`` tokenise to the adversarial tokens followed by the prompt's own tokens?"""
    return content_ids(tokenizer, text) == list(adv) + content_ids(tokenizer, prompt)


class TokenEmbeddingOverride:
    """While active, the text encoder's token-embedding output at chosen places is replaced by given vectors.

    ``rows(input_ids) -> (mask, values)``: ``mask`` (B, L) bool, ``values`` (mask.sum(), D) in mask order. A forward
    hook on ``text_encoder.get_input_embeddings()`` and on every other embedding module sharing its weight (T5's
    encoder calls its own ``embed_tokens``, tied to ``shared``), so it works for CLIP and T5 encoders and keeps
    gradients to ``values``."""

    def __init__(self, text_encoder, rows):
        from erase.diffusion.families.base import token_embedding_modules

        self.modules = token_embedding_modules(text_encoder)
        self.module = self.modules[0]
        self.rows = rows
        self.handles = []

    def _hook(self, module, inputs, output):
        got = self.rows(inputs[0])
        if got is None:
            return output
        mask, values = got
        out = output.clone()
        out[mask] = values.to(out.dtype)
        return out

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
