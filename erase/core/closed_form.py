"""What closed-form editors (UCE, SPEED: ``erase/core/methods/uce.py``, ``speed.py``) share: the adapter's view of the
layers whose input is the prompt alone, the token positions a paper reads, and a few exact linear-algebra steps.

A closed-form editor rewrites a linear layer ``y = W x (+ b)`` whose input ``x`` is text (a cross-attention key or
value projection of a UNet, an MMDiT's context or pooled-text embedder), from the inputs that layer sees for the
forget prompts, their anchors and the prompts to preserve: no images, no gradient steps. The adapter says which layers
those are and what they see (:meth:`erase.core.adapter.Adapter.text_layers` / ``text_features``); this module picks
the positions each paper uses and stays model-agnostic (no diffusers).

Positions. A token stream is the concatenation of one *segment* per tokenizer (SD 1.x / 2.x / XL: CLIP's 77 tokens;
SD3: CLIP's 77 then T5's; Flux: T5's). In each segment a prompt's *last word token* sits at ``n − 2`` for its ``n``
tokens with the end token (and a CLIP begin token), as both papers' code counts it (``attention_mask.sum() − 2``);
the empty prompt's is its first token. A pooled stream is one vector per prompt, its own last token.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .method import Method

#: the text streams a layer may read, and the roles a text-input layer plays
STREAMS = ("tokens", "pooled")
ROLES = ("key", "value", "embed")


class ClosedFormError(ValueError):
    """A closed-form edit that cannot be made as asked (no text-input layer among the targets, no prompt to keep)."""


@dataclass
class TextLayer:
    """One linear layer whose input is the prompt alone."""

    name: str  # the module's name in the model (its weight is ``name + ".weight"``)
    module: nn.Module  # an ``nn.Linear``: weight (out, in), optional bias
    stream: str  # the text input it reads: "tokens" (one vector per token) or "pooled" (one per prompt)
    role: str  # "key" / "value" (a cross-attention projection) or "embed" (an MMDiT's text embedder)


@dataclass
class TextFeatures:
    """The inputs one stream's layers see for a table of prompts, with the token layout.

    ``values[i]`` is prompt i's (L, d) input (a pooled stream: L = 1); ``segments`` the (start, first word, end) of each
    tokenizer's segment of the L positions (first word: after a begin token, if the tokenizer puts one); ``last[i, s]``
    the position of prompt i's last word token in segment s. The forget table also says, per row, its concept
    (``group``) and the row of the anchor table it is redirected to (``anchor``), and names the concepts."""

    values: torch.Tensor
    last: torch.Tensor
    segments: list[tuple[int, int, int]]
    prompts: list[str]
    group: list[int] | None = None
    anchor: list[int] | None = None
    concepts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.values.shape[0])


POSITIONS = ("last", "last_onward", "all", "every")


def positions(f: TextFeatures, i: int, rule: str) -> list[int]:
    """The positions of prompt ``i`` a rule reads: ``last`` its last word token of each segment; ``last_onward`` from
    there to the segment's end (UCE's paper code); ``all`` every position from each segment's first word on (SPEED's
    implicit concepts, the begin token left out); ``every`` all L positions."""
    if rule not in POSITIONS:
        raise ValueError(f"token positions {rule!r} are not one of {', '.join(POSITIONS)}")
    out: list[int] = []
    for s, (start, first, end) in enumerate(f.segments):
        last = int(f.last[i, s])
        out += {"last": [last], "last_onward": list(range(last, end)), "all": list(range(first, end)),
                "every": list(range(start, end))}[rule]
    return out


def rows(f: TextFeatures, i: int, rule: str) -> torch.Tensor:
    """(n, d): prompt ``i``'s inputs at ``rule``'s positions."""
    return f.values[i, positions(f, i, rule)]


def aligned(f: TextFeatures, i: int, g: TextFeatures, j: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ``i`` of ``f`` and prompt ``j`` of ``g`` (same stream), position by position: ``last`` pairs the last
    word tokens; ``last_onward`` pairs the two tails from the last word tokens on, cut to the shorter (UCE's
    ``old_emb[final:L − (farthest − final)]``); ``all`` pairs every position from the first word on."""
    if rule == "last_onward":
        a_pos, b_pos = [], []
        for s, (_, _, end) in enumerate(f.segments):
            a, b = int(f.last[i, s]), int(g.last[j, s])
            n = end - max(a, b)
            a_pos += range(a, a + n)
            b_pos += range(b, b + n)
        return f.values[i, a_pos], g.values[j, b_pos]
    if rule not in ("last", "all"):
        raise ValueError(f"aligned positions {rule!r} are not one of last, last_onward, all")
    return rows(f, i, rule), rows(g, j, rule)


BLOCK_ROWS = 8192  # rows stacked per matmul when summing second moments (few large products, bounded memory)


def _blocks(chunks: list[torch.Tensor]):
    """Consecutive runs of ``chunks`` of at most :data:`BLOCK_ROWS` rows in all (a longer chunk alone)."""
    run, rows_in = [], 0
    for i, x in enumerate(chunks):
        if run and rows_in + x.shape[0] > BLOCK_ROWS:
            yield run
            run, rows_in = [], 0
        run.append(i)
        rows_in += int(x.shape[0])
    if run:
        yield run


def gram(chunks: list[torch.Tensor], d: int, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """``scale · Σ XᵀX`` over (n, d) chunks: the d x d second moment of their rows, a few stacked blocks at a time."""
    out = torch.zeros(d, d, dtype=dtype, device=chunks[0].device if chunks else None)
    for run in _blocks(chunks):
        x = torch.cat([chunks[i] for i in run]).to(dtype)
        out += x.T @ x
    return out * scale


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> torch.Tensor:
    """(k, d) centres of Lloyd's k-means on the rows of ``x`` (Euclidean), started from k distinct rows drawn by
    ``generator``; fewer rows than k: the rows themselves."""
    if x.shape[0] <= k:
        return x.clone()
    centres = x[torch.randperm(x.shape[0], generator=generator)[:k]].clone()
    assign = None
    for _ in range(iters):
        new = torch.cdist(x, centres).argmin(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centres[c] = members.mean(0)
    return centres


def text_layers(adapter, params: dict, roles: tuple[str, ...], method: str) -> list[TextLayer]:
    """The adapter's text-input layers among the targeted ``params`` that play one of ``roles``; none is a
    ``ValueError`` naming the method and what the targets hold."""
    try:
        found = [layer for layer in adapter.text_layers(params) if layer.role in roles]
    except (AttributeError, NotImplementedError) as e:
        raise ClosedFormError(f"{method} edits the layers whose input is the prompt: {e}") from None
    if not found:
        raise ClosedFormError(f"{method} edits the text-input layers ({', '.join(roles)}) among the targets, and the targets hold none "
                         f"(target the cross-attention / text paths: --targets xattn)")
    return found


def set_weight(layer: TextLayer, weight: torch.Tensor) -> None:
    """Write ``weight`` into the layer in place (its dtype and device kept, outside autograd)."""
    with torch.no_grad():
        layer.module.weight.copy_(weight.to(layer.module.weight.dtype))


class ClosedFormMethod(Method):
    """A closed-form editor: its whole edit is :meth:`edit`, run as ``prepare`` (timed, recorded with
    ``closed_form: true`` and ``repair_steps: 0``); it has no loss, reads no stream and takes no repair step."""

    tasks = ("diffusion",)
    uses_forget = False
    uses_retain = False
    closed_form = True
    # an editor edits the layers the prompt enters through: on an MMDiT both embedders, the token stream's and the
    # pooled one (the authors' UCE-Flux script), where the trained methods' xattn is the token stream alone
    transformer_targets = "text_pooled"

    def edit(self, ctx) -> dict:
        """Edit the text-input layers in place; return what to record, with ``concepts`` (how many were erased)."""
        raise NotImplementedError

    def prepare(self, ctx) -> dict:
        start = time.perf_counter()
        info = self.edit(ctx)
        seconds = time.perf_counter() - start
        return {"closed_form": True, "repair_steps": 0, **info, "edit_seconds": seconds,
                "seconds_per_concept": seconds / max(1, int(info.get("concepts", 1)))}

    def loss(self, ctx, model, forget_batch, retain_batch):
        raise RuntimeError(f"{self.name} is a closed-form edit: it has no loss and takes no repair steps")


def check_scales(config, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """A ``ValueError`` naming the first field of ``config`` that is not a finite number > 0 (``positive``) or >= 0
    (``non_negative``); ``None`` (a computed default) passes."""
    for name in positive + non_negative:
        value = getattr(config, name)
        if value is not None and (not math.isfinite(value) or value < 0 or (name in positive and value == 0)):
            raise ValueError(f"{name} must be a finite number {'> 0' if name in positive else '>= 0'}, got {value}")
