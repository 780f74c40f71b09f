"""Stage 3, conditioning: the prompt tables of a run and their text-encoder outputs, computed once (the text stack is
frozen).

Tables: each concept's forget prompts form its *group* (anchored at its anchor prompt); a captioned forget image is a
group of its own (its caption), anchored like its concept. Retain images are conditioned on their own prompts; the
distill term keeps the base's predictions for the concept set's retain prompts. Every table is encoded as the family
packs prompts (erase.diffusion.families: SDXL appends its pooled embedding as a last token).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class PromptEmbeddings:
    """Text-encoder outputs, computed once (the text encoder is frozen); one row per prompt, packed as the family
    packs them (erase.diffusion.families: SDXL appends its pooled embedding as a last token).

    ``groups[g]`` lists the rows of ``forget`` a forget image of group g (its ``LatentSet.prompt_index``) draws its
    condition from, and ``group_anchor[g]`` the row of ``anchor`` it is redirected to (default: one group of every
    forget prompt, anchored at row 0).
    """

    forget: torch.Tensor  # (F, L, D): c_forget
    retain: torch.Tensor  # (R, L, D): the retain images' prompts
    anchor: torch.Tensor | None  # (A, L, D)
    uncond: torch.Tensor  # (1, L, D): the empty prompt
    distill: torch.Tensor | None = None  # (P, L, D): prompts whose base predictions the distill term keeps
    groups: list[list[int]] | None = None
    group_anchor: list[int] | None = None

    def __post_init__(self):
        if self.groups is None:
            self.groups = [list(range(self.forget.shape[0]))]
        if self.group_anchor is None:
            self.group_anchor = [0] * len(self.groups)
        if any(not g for g in self.groups) or len(self.group_anchor) != len(self.groups):
            raise ValueError("every forget group needs at least one prompt and one anchor index")


@dataclass
class PromptTables:
    """The prompts of a run, before encoding. ``image_group[i]`` is the group of forget image i; ``retain_rows[i]`` the
    row of ``retain`` of retain image i."""

    forget: list[str]
    groups: list[list[int]]
    group_anchor: list[int]
    anchors: list[str]
    retain: list[str]
    distill: list[str]
    image_group: list[int]
    retain_rows: list[int]

    def all_prompts(self) -> list[str]:
        return list(dict.fromkeys(self.forget + self.retain + self.anchors + self.distill))


def prompt_tables(concepts, data) -> PromptTables:
    """The tables of ``concepts`` (a :class:`prompts.ConceptSet`) for the images of ``data`` (stage 2's
    :class:`erase.diffusion.data.EraseData`)."""
    from erase.diffusion.data import caption_index

    forget, groups, group_anchor, anchors = [], [], [], []
    for c in concepts.concepts:
        groups.append(list(range(len(forget), len(forget) + len(c.forget_prompts))))
        forget += c.forget_prompts
        if c.anchor_prompt and c.anchor_prompt not in anchors:
            anchors.append(c.anchor_prompt)
        group_anchor.append(anchors.index(c.anchor_prompt) if c.anchor_prompt else 0)
    image_group = data.forget.concept_of()  # a generated or uncaptioned image: its concept's group
    if data.forget.captioned and any(data.forget.captioned):  # a captioned image: a group of its own, anchored like its concept
        keys, caption_of = caption_index(data.forget)
        concept_anchor = list(group_anchor)
        for caption, concept in keys:
            groups.append([len(forget)])
            forget.append(caption)
            group_anchor.append(concept_anchor[concept])
        image_group = [len(concepts) + int(i) if i >= 0 else k for i, k in zip(caption_of.tolist(), image_group)]
    retain_imgs = data.retain
    retain = sorted(set(retain_imgs.prompts)) if retain_imgs else [""]
    retain_rows = [retain.index(p) for p in retain_imgs.prompts] if retain_imgs else []
    return PromptTables(forget, groups, group_anchor, anchors, retain, list(concepts.retain_prompts), image_group, retain_rows)


def encode(tables: PromptTables, text, device, distill: bool = True) -> PromptEmbeddings:
    """Every table through the family's text stack (a prompt longer than the encoder's window is cut, with a warning);
    the distill table only when the retain term distils."""
    window = text.max_length
    cut = [p for p in tables.all_prompts() if p and len(text.tokenizers[0](p).input_ids) > window]
    if cut:
        logger.warning(f"{len(cut)} prompt(s) exceed the text encoder's {window} tokens and are cut (first: {cut[0][:60]!r})")
    return PromptEmbeddings(
        forget=text.encode(tables.forget, device),
        retain=text.encode(tables.retain, device),
        anchor=text.encode(tables.anchors, device) if tables.anchors else None,
        uncond=text.uncond(device),
        distill=text.encode(tables.distill, device) if distill else None,
        groups=tables.groups, group_anchor=tables.group_anchor,
    )
