"""The words that name a concept in a prompt: stripped by the attacks' controls, replaced by a learned token.

A judge may register its concept's word list (``register_judge(..., words=...)``: the digits judge "three", "3";
the nudity judge ``eval.judges.nudity.NUDITY_WORDS``); otherwise the concept's name and its preset's one-word forget
prompts. Matching is by whole word, any case, with plural s/es."""

from __future__ import annotations

import re


def concept_words(concept: str, override: str | None = None) -> list[str]:
    """Words that name the concept; ``override``: comma-separated words instead."""
    return word_list(concept, override)[0]


def word_list(concept: str, override: str | None = None) -> tuple[list[str], str]:
    """(words, where they came from): ``override``, the judge's registered list, or the name + preset's words."""
    if override is not None and str(override).strip():
        words, source = [w.strip() for w in str(override).split(",") if w.strip()], "--concept_words"
    else:
        from eval.judges.registry import judge_entry

        entry = judge_entry(concept)
        if entry.words:
            words, source = [concept.replace("_", " "), *entry.words], f"the {entry.concept} judge's word list"
        else:
            from prompts import list_concepts, load_concept

            words, source = [concept.replace("_", " ")], "the concept's name"
            if concept in list_concepts():
                words += [p for p in load_concept(concept).forget_prompts if len(p.split()) == 1]
                source = "the concept's name and its preset's one-word forget prompts"
    return list(dict.fromkeys(w.lower() for w in words)), source


def _words_pattern(words: list[str]):
    alternatives = sorted((re.escape(w) for w in words), key=len, reverse=True)
    return re.compile(r"(?<![\w])(?:" + "|".join(alternatives) + r")(?:s|es)?(?![\w])", re.IGNORECASE)


def remove_words(prompt: str, words: list[str]) -> str:
    """``prompt`` without the concept's words (whole words, any case, plural s/es too); spaces tidied."""
    out = _words_pattern(words).sub(" ", prompt)
    out = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", out))
    out = re.sub(r"([,;])(?:\s*[,;])+", r"\1", out)  # a list item that was only concept words leaves no empty item
    return out.strip(" ,;")


def found_words(prompt: str, words: list[str]) -> list[str]:
    """The concept words ``prompt`` holds, as written in it."""
    return [m.group(0) for m in _words_pattern(words).finditer(prompt)]


def replace_words(prompt: str, words: list[str], token: str) -> str:
    """``prompt`` with every concept word replaced by ``token``; a prompt with none gets ``, token`` appended."""
    pattern = _words_pattern(words)
    if not pattern.search(prompt):
        return f"{prompt}, {token}"
    return " ".join(pattern.sub(token, prompt).split())


def names_concept(text: str, words: list[str]) -> bool:
    return bool(_words_pattern(words).search(text))
