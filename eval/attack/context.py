"""What every attack shares: its base config (model, concept, prompts, audit generation), loading the attacked
model over its base, drawing and judging check images, resumable cell files, and the CLI generated from configs.

A check generates ``num_images`` images: image i uses prompt ``prompts[i % len(prompts)]`` and its own CPU
generator seeded ``eval_seed + i`` (as ``eval.digits score`` with seed 0), so every check of an audit sees the same
prompts and initial noise, and the images are decoded to uint8 exactly as a saved PNG would hold them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.attack.registry import GENERATION_DEFAULTS, JudgeEntry, judge_entry
from eval.common import UserError, read_json

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- config
def int_list(value, flag: str, minimum: int | None = None) -> tuple[int, ...]:
    """``"0,1,2"`` / ``[0, 1, 2]`` -> ``(0, 1, 2)``; anything else is a ``UserError`` naming the flag."""
    items = str(value).split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(int(str(v).strip()) for v in items if str(v).strip())
    except ValueError:
        raise UserError(f"--{flag} must be comma-separated integers, got {value!r}") from None
    if not out:
        raise UserError(f"--{flag} is empty")
    if minimum is not None and min(out) < minimum:
        raise UserError(f"--{flag} values must be >= {minimum}, got {value!r}")
    if len(set(out)) != len(out):
        raise UserError(f"--{flag} has repeated values: {value!r}")
    return out


def str_list(value, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    items = str(value).split(",") if isinstance(value, str) else list(value)
    out = tuple(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))
    bad = [v for v in out if v not in allowed]
    if not out or bad:
        raise UserError(f"--{flag} {value!r}: choose from {', '.join(allowed)} (comma-separated)")
    return out


@dataclass
class AttackConfig:
    """Settings every attack shares; an attack's config subclasses this and adds its own fields (all defaulted)."""

    model: str = field(metadata={"help": "attacked model: erase/sd.py output (unet/ + erase_config.json), "
                                         "pipeline folder or hub id"})
    concept: str = field(metadata={"help": "concept to bring back; needs a judge (zero..nine, nudity, or registered)"})
    output_dir: str = field(metadata={"help": "folder for summary.json, attacks.jsonl and the resumable cells"})
    forget_prompts: str | None = field(default=None, metadata={
        "help": "file of prompts the checks generate from, one a line (default: the concept preset's forget prompts)"})
    prompts_csv: str | None = field(default=None, metadata={
        "help": "prompt table (CSV with a prompt column and an evaluation_seed or sd_seed column, e.g. "
                "i2p_nudity_142.csv) to take the prompts from instead; rows keep their seeds and guidance where an "
                "attack uses them (eval.prompts_table)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N rows of --prompts_csv"})
    num_images: int | None = field(default=None, metadata={
        "help": "images per check, cycling over the prompts (default: the judge's protocol; digits 40)"})
    steps: int | None = field(default=None, metadata={"help": "sampling steps (default: the judge's protocol; digits 20)"})
    guidance: float | None = field(default=None, metadata={
        "help": "classifier-free guidance (default: the judge's protocol; digits 4)"})
    scheduler: str | None = field(default=None, metadata={
        "help": "sampler, eval.generate names (default: the judge's protocol; digits ddim)"})
    generation_batch_size: int | None = field(default=None, metadata={
        "help": "images per pipeline call (default: the judge's protocol; digits 100); does not change images beyond float rounding"})
    eval_seed: int = field(default=0, metadata={"help": "image i of every check is drawn with seed eval_seed + i"})
    save_images: bool = field(default=False, metadata={"help": "also save every check's images as PNG under images/"})

    def __post_init__(self):
        from eval.generate import SCHEDULERS

        for name in ("model", "concept", "output_dir"):
            if not str(getattr(self, name) or "").strip():
                raise UserError(f"--{name} is required")
        entry = judge_entry(self.concept)  # UserError listing the judged concepts
        for name, cast in (("num_images", int), ("steps", int), ("guidance", float), ("generation_batch_size", int),
                           ("eval_seed", int), ("limit", int)):
            setattr(self, name, optional_number(getattr(self, name), cast, name))
        self.concept = entry.concept
        protocol = {**GENERATION_DEFAULTS, **entry.generation}
        for name, key in (("num_images", "num_images"), ("steps", "steps"), ("guidance", "guidance"),
                          ("scheduler", "scheduler"), ("generation_batch_size", "batch_size")):
            if getattr(self, name) is None:
                setattr(self, name, protocol[key])
        for name in ("num_images", "steps", "generation_batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.forget_prompts and self.prompts_csv:
            raise UserError("give --forget_prompts or --prompts_csv, not both")
        if self.limit is not None and not self.prompts_csv:
            raise UserError("--limit needs --prompts_csv (it takes the table's first N rows)")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be >= 1, got {self.limit}")
        if self.prompts_csv and not Path(self.prompts_csv).is_file():
            raise UserError(f"--prompts_csv file not found: {self.prompts_csv}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown --scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        from erase.safety import check_numbers

        check_numbers(vars(self))  # every float finite and in range (erase.safety.OPTION_RANGES)
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"--output_dir {self.output_dir} exists and is not a folder")

    @property
    def judge_entry(self) -> JudgeEntry:
        return judge_entry(self.concept)

    def generation(self) -> dict:
        return {"num_images": self.num_images, "steps": self.steps, "guidance": float(self.guidance),
                "scheduler": self.scheduler, "eval_seed": self.eval_seed, "dtype": "fp32",
                "seed_rule": "image i: prompt i mod len(prompts), its own CPU torch.Generator seeded eval_seed + i",
                "images": "decoded to uint8 as a saved PNG holds them, then judged"}


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of an attack config (flat snake_case, a help each); lists are comma-separated strings."""
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        text = f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action="store_true", help=text)
            continue
        kw = {"required": required, "help": text if required or default is None else f"{text} (default: {_show(default)})"}
        if default is not None and not isinstance(default, (tuple, list)):
            kw["type"] = type(default)
        else:
            kw["type"] = str  # optional values and lists: validated by the config
        parser.add_argument(f"--{f.name}", default=default if not isinstance(default, (tuple, list)) else _show(default), **kw)


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def optional_number(value, cast, flag: str):
    """CLI strings for ``int | None`` / ``float | None`` fields."""
    if value is None or not isinstance(value, str):
        return value
    try:
        return cast(value)
    except ValueError:
        raise UserError(f"--{flag} must be a number, got {value!r}") from None


# ----------------------------------------------------------------------------------------------- model
@dataclass
class ModelInfo:
    model: str
    base: str
    erase_config: dict | None

    @property
    def erased(self) -> bool:
        return self.erase_config is not None


def resolve_model(model: str) -> ModelInfo:
    """Base and erase config of an erase/sd.py output; a pipeline folder or hub id is its own base."""
    path = Path(model)
    if path.is_dir() and (path / "erase_config.json").is_file():
        config = read_json(path / "erase_config.json", "erase config")
        base = config.get("pretrained_model_name_or_path")
        if not base:
            raise UserError(f"{path / 'erase_config.json'} has no 'pretrained_model_name_or_path' naming the base model")
        if not (path / "unet").is_dir():
            raise UserError(f"{model} has an erase_config.json but no unet/ folder")
        return ModelInfo(str(model), str(base), config)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{model} is neither a diffusers pipeline folder (model_index.json) nor an erase/sd.py "
                            "output (erase_config.json)")
        return ModelInfo(str(model), str(model), None)
    if str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise UserError(f"model not found: {model} (give a pipeline folder, an erase/sd.py output or a hub id)")
    return ModelInfo(str(model), str(model), None)


def load_attacked(info: ModelInfo, scheduler: str, device):
    """(pipeline of the base model, the attacked UNet): the pipeline still holds the base UNet; swap it with
    ``pipe.register_modules(unet=...)`` once the base model's work (drawing target images) is done."""
    import torch

    from eval.generate import load_pipeline

    pipe = load_pipeline(info.base, scheduler=scheduler, dtype=torch.float32, device=device)
    pipe.set_progress_bar_config(disable=True)
    if not info.erased:
        return pipe, pipe.unet
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(info.model, subfolder="unet", dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the UNet of {info.model!r}: {str(e).strip().splitlines()[0]}") from None
    return pipe, unet.to(device)


# ----------------------------------------------------------------------------------------------- prompts
@dataclass
class ConceptPrompts:
    forget: list[str]       # what the checks generate from
    generation: list[str]   # what the base model draws the concept's images from
    source: str
    rows: list | None = None  # eval.prompts_table.PromptRow per forget prompt (its seed, guidance) for --prompts_csv
    table: dict | None = None  # the table's description (source, limit, seed and guidance columns)


def concept_prompts(concept: str, forget_file: str | None, prompts_csv: str | None = None,
                    limit: int | None = None) -> ConceptPrompts:
    """The prompts of an audit: ``--prompts_csv`` rows (first ``limit``), ``--forget_prompts`` lines, or the preset's."""
    from prompts import list_concepts, load_concept, read_prompt_file

    preset = load_concept(concept) if concept in list_concepts() else None
    if prompts_csv:
        from eval.prompts_table import load_prompts

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


# ----------------------------------------------------------------------------------------------- checks
def draw(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, resolution: int,
         batch_size: int) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images, each from its own seeded CPU generator, ``batch_size`` per pipeline call."""
    import torch

    out = []
    for i in range(0, len(prompts), batch_size):
        with torch.no_grad():
            images = pipe(prompt=prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                          height=resolution, width=resolution, output_type="np",
                          generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]).images
        out.append((np.asarray(images) * 255).round().astype(np.uint8))  # as diffusers' numpy_to_pil
    return np.concatenate(out)


def judge_images(judge, images: np.ndarray, prompts: list[str]) -> dict:
    """Hit count, rate, per-prompt hits and a tally of the judge's labels for one batch of images."""
    flags, labels = judge(images)
    per_prompt: dict[str, list[int]] = {}
    for p, f in zip(prompts, flags):
        per_prompt.setdefault(p, [0, 0])
        per_prompt[p][0] += int(f)
        per_prompt[p][1] += 1
    tally: dict[str, int] = {}
    for lab in labels or []:
        for x in lab if isinstance(lab, list) else [lab]:
            tally[str(x)] = tally.get(str(x), 0) + 1
    hits = int(sum(flags))
    return {"hits": hits, "n": len(flags), "hit_rate": hits / len(flags) if flags else 0.0,
            "per_prompt": per_prompt, "labels": dict(sorted(tally.items())) if labels is not None else None}


def save_pngs(images: np.ndarray, folder: Path) -> None:
    import io

    from PIL import Image

    from eval.common import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        atomic_write_bytes(folder / f"{i:05d}.png", buf.getvalue())


# ----------------------------------------------------------------------------------------------- records
def read_cell(path: Path, key: str) -> dict | None:
    """A finished cell written with the same settings key, else None (a cell from other settings is redone)."""
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if cell.get("key") != key:
        logger.warning("%s was computed with other settings; recomputing it", path)
        return None
    return cell


def versions() -> dict:
    import numpy
    import tqdm

    from erase.export import versions as library_versions

    import transformers

    return {**library_versions(), "numpy": numpy.__version__, "tqdm": tqdm.__version__,
            "transformers": transformers.__version__}  # the tokenizer and text encoder come from it


# ----------------------------------------------------------------------------------------------- concept words
def concept_words(concept: str, override: str | None = None) -> list[str]:
    """Words that name the concept, removed from (or replaced in) prompts by the attacks' controls.

    ``override``: comma-separated words. Default: the concept's name (``_`` as a space); for a digit preset also its
    numeral ("three", "3"); and every one-word forget prompt of its preset (nudity: nudity, naked, nude, erotic,
    sexual)."""
    if override is not None and str(override).strip():
        words = [w.strip() for w in str(override).split(",") if w.strip()]
    else:
        from prompts import list_concepts, load_concept

        words = [concept.replace("_", " ")]
        if concept in list_concepts():
            preset = load_concept(concept)
            if preset.category == "digit":
                from eval.digits_model import DIGIT_WORDS

                if concept in DIGIT_WORDS:
                    words.append(str(DIGIT_WORDS.index(concept)))
            words += [p for p in preset.forget_prompts if len(p.split()) == 1]
    return list(dict.fromkeys(w.lower() for w in words))


def _words_pattern(words: list[str]):
    import re

    alternatives = sorted((re.escape(w) for w in words), key=len, reverse=True)
    return re.compile(r"(?<![\w])(?:" + "|".join(alternatives) + r")(?:s|es)?(?![\w])", re.IGNORECASE)


def remove_words(prompt: str, words: list[str]) -> str:
    """``prompt`` without the concept's words (whole words, any case, plural s/es too); spaces tidied."""
    import re

    out = _words_pattern(words).sub(" ", prompt)
    out = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", out)).strip()
    return out


def replace_words(prompt: str, words: list[str], token: str) -> str:
    """``prompt`` with every concept word replaced by ``token``; a prompt with none gets ``, token`` appended."""
    pattern = _words_pattern(words)
    if not pattern.search(prompt):
        return f"{prompt}, {token}"
    return " ".join(pattern.sub(token, prompt).split())


def names_concept(text: str, words: list[str]) -> bool:
    return bool(_words_pattern(words).search(text))


# ----------------------------------------------------------------------------------------------- token embeddings
class TokenEmbeddingOverride:
    """While active, the text encoder's token-embedding output at chosen places is replaced by given vectors.

    ``rows(input_ids) -> (mask, values)``: ``mask`` (B, L) bool, ``values`` (mask.sum(), D) in mask order. A forward
    hook on ``text_encoder.get_input_embeddings()``, so it works for any CLIP-like encoder and keeps gradients to
    ``values``."""

    def __init__(self, text_encoder, rows):
        self.module = text_encoder.get_input_embeddings()
        self.rows = rows
        self.handle = None

    def _hook(self, module, inputs, output):
        got = self.rows(inputs[0])
        if got is None:
            return output
        mask, values = got
        out = output.clone()
        out[mask] = values.to(out.dtype)
        return out

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        self.handle = None
