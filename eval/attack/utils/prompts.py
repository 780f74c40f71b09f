"""The prompts of an audit: a prompt table's rows, a file of prompts, or the concept preset's."""

from __future__ import annotations

from dataclasses import dataclass

from erase.utils.errors import UserError


@dataclass
class ConceptPrompts:
    forget: list[str]       # what the checks generate from
    generation: list[str]   # what the base model draws the concept's images from
    source: str
    rows: list | None = None  # erase.diffusion.prompt_table.PromptRow per forget prompt (its seed, guidance) for --prompts_csv
    table: dict | None = None  # the table's description (source, limit, seed and guidance columns)


def concept_prompts(concept: str, forget_file: str | None, prompts_csv: str | None = None,
                    limit: int | None = None) -> ConceptPrompts:
    """The prompts of an audit: ``--prompts_csv`` rows (first ``limit``), ``--forget_prompts`` lines, or the preset's."""
    from prompts import list_concepts, load_concept, read_prompt_file

    preset = load_concept(concept) if concept in list_concepts() else None
    if prompts_csv:
        from erase.diffusion.prompt_table import load_prompts

        table = load_prompts(prompts_csv, limit=limit)
        forget = [r.prompt for r in table.rows]
        generation = preset.generation_prompts if preset is not None else forget
        return ConceptPrompts(forget, list(generation), f"csv {table.source}", table.rows, table.describe())
    if forget_file:
        try:
            forget = read_prompt_file(forget_file)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
    elif preset is None:
        raise UserError(f"concept {concept!r} has no preset in prompts/presets; give --forget_prompts FILE")
    else:
        forget = preset.forget_prompts
    generation = preset.generation_prompts if preset is not None else forget
    return ConceptPrompts(list(forget), list(generation), "file" if forget_file else f"preset {concept}")
