"""Prompt tables for audits: the I2P benchmark (hub or local CSV), its subsets, and COCO caption CSVs.

A table needs a `prompt` column and a seed column (`evaluation_seed`, as in the ESD/SalUn/MACE copies, or
`sd_seed`, as on the hub). Guidance (`evaluation_guidance` / `sd_guidance_scale`), `categories` and
`nudity_percentage` are read when present and required only by the option that uses them. Each row keeps
its 0-based position in the table as `index`, whatever subset is taken, so file names stay comparable.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from erase.utils.checks import GENERATOR_SEED_MAX
from erase.utils.errors import UserError

logger = logging.getLogger(__name__)

I2P_HUB_ID = "AIML-TUDA/i2p"
SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale")
META_COLUMNS = ("categories", "nudity_percentage", "inappropriate_percentage", "hard", "case_number", "image_id",
                "sd_image_width", "sd_image_height")  # the size I2P's own images were drawn at (resolution 'row')


def _sexual(row) -> bool:
    return "sexual" in {c.strip() for c in str(row.get("categories", "")).split(",")}


def _nudity(row) -> bool:
    return float(row.get("nudity_percentage", 0) or 0) > 0


# name -> (required column, predicate on a row dict). "all" keeps every row.
SUBSETS = {
    "all": (None, None),
    "sexual": ("categories", _sexual),
    "nudity": ("nudity_percentage", _nudity),
}


@dataclass
class PromptRow:
    index: int
    prompt: str
    seed: int
    guidance: float | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class PromptTable:
    rows: list[PromptRow]
    source: str
    subset: str
    skipped_empty: list[int]
    limit: int | None = None
    seed_column: str | None = None
    guidance_column: str | None = None

    def describe(self) -> dict:
        return {
            "prompt_source": self.source,
            "subset": self.subset,
            "limit": self.limit,
            "prompts": len(self.rows),
            "skipped_empty_prompts": len(self.skipped_empty),
            "seed_column": self.seed_column,
            "guidance_column": self.guidance_column,
        }


def _read_frame(prompts_csv: str | None):
    import pandas as pd

    if prompts_csv is None:
        try:
            import datasets

            frame = datasets.load_dataset(I2P_HUB_ID, split="train").to_pandas()
        except Exception as e:  # offline, gated, renamed: one line, with the local alternative
            raise UserError(
                f"could not load {I2P_HUB_ID} from the hub ({type(e).__name__}); pass --prompts_csv PATH to a local copy"
            ) from None
        return frame, I2P_HUB_ID
    try:
        frame = pd.read_csv(prompts_csv, dtype={"image_id": str})
    except FileNotFoundError:
        raise UserError(f"prompts CSV not found: {prompts_csv}") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"prompts CSV is empty: {prompts_csv}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"prompts CSV is malformed: {prompts_csv} ({first})") from None
    return frame, str(prompts_csv)


def _pick(columns, candidates):
    return next((c for c in candidates if c in columns), None)


def load_prompts(
    prompts_csv: str | None = None, subset: str = "all", limit: int | None = None, need_guidance: bool = False
) -> PromptTable:
    """Read a prompt table, validate its columns, take a subset and the first `limit` rows of it."""
    if subset not in SUBSETS:
        raise UserError(f"unknown subset {subset!r}; choose one of: {', '.join(SUBSETS)}")
    if limit is not None and limit < 1:  # auditing no prompt is not a clean result
        raise UserError(f"limit must be >= 1, got {limit}")
    frame, source = _read_frame(prompts_csv)
    columns = list(frame.columns)
    seed_col, guidance_col = _pick(columns, SEED_COLUMNS), _pick(columns, GUIDANCE_COLUMNS)
    missing = []
    if "prompt" not in columns:
        missing.append("prompt")
    if seed_col is None:
        missing.append(" or ".join(SEED_COLUMNS))
    if need_guidance and guidance_col is None:
        missing.append(" or ".join(GUIDANCE_COLUMNS) + " (needed by guidance 'row')")
    subset_col, predicate = SUBSETS[subset]
    if subset_col is not None and subset_col not in columns:
        missing.append(f"{subset_col} (needed by --subset {subset})")
    if missing:
        raise UserError(f"{source} is missing column(s): {'; '.join(missing)} (found: {', '.join(map(str, columns))})")

    rows, skipped = [], []
    for index, record in enumerate(frame.to_dict("records")):
        if predicate is not None and not predicate(record):
            continue
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            skipped.append(index)
            continue
        try:
            seed = int(record[seed_col])
            guidance = float(record[guidance_col]) if guidance_col is not None else None
        except (TypeError, ValueError, OverflowError):
            raise UserError(
                f"{source} row {index}: seed/guidance must be numbers, got "
                f"{record[seed_col]!r}/{record.get(guidance_col)!r}"
            ) from None
        if not 0 <= seed <= GENERATOR_SEED_MAX:
            raise UserError(f"{source} row {index}: seed {record[seed_col]} is outside [0, {GENERATOR_SEED_MAX}] (a 64-bit generator seed)")
        if guidance is not None and not math.isfinite(guidance):
            if need_guidance:
                raise UserError(f"{source} row {index}: guidance {record[guidance_col]!r} is not a finite number (needed by guidance 'row')")
            guidance = None  # an empty cell; unused without --guidance row
        meta = {k: _plain(record[k]) for k in META_COLUMNS if k in record}
        rows.append(PromptRow(index=index, prompt=prompt, seed=seed, guidance=guidance, meta=meta))
        if limit is not None and len(rows) >= limit:
            break
    if skipped:
        logger.warning("skipped %d row(s) with an empty prompt: %s", len(skipped), skipped[:20])
    if not rows:  # a header-only table, or a subset with no row: nothing to audit is an error, not a clean result
        raise UserError(f"{source} has no prompt row to audit" + (f" in subset {subset!r}" if subset != "all" else "")
                        + (f" ({len(skipped)} empty prompt(s) skipped)" if skipped else ""))
    return PromptTable(rows=rows, source=source, subset=subset, skipped_empty=skipped, limit=limit,
                       seed_column=seed_col, guidance_column=guidance_col)


def _plain(value):
    """numpy scalars and NaN -> JSON-able python values."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value
