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
from typing import ClassVar

import numpy as np

from eval.attack.registry import GENERATION_DEFAULTS, JudgeEntry, judge_entry
from erase.utils.errors import UserError
from erase.utils.files import read_json

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
    num_images: int | None = field(default=None, metadata={
        "help": "images per check, cycling over the prompts (default: the judge's protocol; digits 40)"})
    steps: int | None = field(default=None, metadata={"help": "sampling steps (default: the judge's protocol; digits 20)"})
    guidance: float | None = field(default=None, metadata={
        "help": "classifier-free guidance (default: the judge's protocol; digits 4)"})
    scheduler: str | None = field(default=None, metadata={
        "help": "sampler, erase.diffusion.generate names (default: the judge's protocol; digits ddim)"})
    generation_batch_size: int | None = field(default=None, metadata={
        "help": "images per pipeline call (default: the judge's protocol; digits 100); does not change images beyond float rounding"})
    eval_seed: int = field(default=0, metadata={"help": "image i of every check is drawn with seed eval_seed + i"})
    save_images: bool = field(default=False, metadata={"help": "also save every check's images as PNG under images/"})
    protocol: str | None = field(default=None, metadata={
        "help": "a pinned attack protocol (eval/protocols.py: unlearndiffatk-nudity): fixes the prompt table, seeds, "
                "guidance, steps, scheduler, resolution, judge threshold and classes, and the attack budget; a flag "
                "that contradicts it is an error (docs/PROTOCOLS.md)"})
    prompts_csv: str | None = field(default=None, metadata={
        "help": "prompt table (CSV with prompt and evaluation_seed columns, as eval.i2p reads) for attacks that draw "
                "from prompt rows (default: the protocol's pinned file)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N rows of the prompt table"})

    # Whether the attack draws its checks from prompt rows (prompt_table()); one that does not refuses --protocol,
    # --prompts_csv and --limit rather than ignoring them. An attack that uses the table sets this to True.
    USES_PROMPT_TABLE: ClassVar[bool] = False

    def __post_init__(self):
        from erase.diffusion.generate import SCHEDULERS

        for name in ("model", "concept", "output_dir"):
            if not str(getattr(self, name) or "").strip():
                raise UserError(f"--{name} is required")
        entry = judge_entry(self.concept)  # UserError listing the judged concepts
        for name, cast in (("num_images", int), ("steps", int), ("generation_batch_size", int), ("eval_seed", int),
                           ("limit", int)):
            setattr(self, name, optional_number(getattr(self, name), cast, name))
        if not (self.protocol is not None and str(self.guidance).strip() == "row"):
            self.guidance = optional_number(self.guidance, float, "guidance")
        self.concept = entry.concept
        self._table = None
        if self.forget_prompts and self.prompts_csv:
            raise UserError("give --forget_prompts or --prompts_csv, not both")
        self.protocol_spec = self._apply_protocol()
        protocol = {**GENERATION_DEFAULTS, **entry.generation}
        for name, key in (("num_images", "num_images"), ("steps", "steps"), ("guidance", "guidance"),
                          ("scheduler", "scheduler"), ("generation_batch_size", "batch_size")):
            if getattr(self, name) is None:
                setattr(self, name, protocol[key])
        for name in ("num_images", "steps", "generation_batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and not self.prompts_csv:
            raise UserError("--limit needs --prompts_csv (it takes the table's first N rows)")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be >= 1, got {self.limit}")
        if self.prompts_csv and not Path(self.prompts_csv).is_file():
            raise UserError(f"--prompts_csv file not found: {self.prompts_csv}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown --scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        from erase.utils.checks import check_numbers

        check_numbers(vars(self))  # every float finite and in range (erase.utils.checks.OPTION_RANGES)
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"--output_dir {self.output_dir} exists and is not a folder")

    @property
    def judge_entry(self) -> JudgeEntry:
        return judge_entry(self.concept)

    def _apply_protocol(self):
        """Check the explicit settings against ``protocol`` and fill the rest from it; load the prompt table."""
        from eval.protocols import check_flag, get_protocol, load_protocol_prompts

        uses = (self.protocol, self.prompts_csv, self.limit)
        if any(v is not None for v in uses) and not self.USES_PROMPT_TABLE:
            flag = next(f for f, v in zip(("--protocol", "--prompts_csv", "--limit"), uses) if v is not None)
            raise UserError(f"{flag} does not apply to this attack: it draws its checks from --forget_prompts, not from "
                            "prompt-table rows")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be >= 1, got {self.limit}")
        if self.protocol is None:
            if self.prompts_csv is not None:
                from erase.diffusion.prompt_table import load_prompts

                self._table = load_prompts(self.prompts_csv, "all", self.limit)
            return None
        protocol = get_protocol(self.protocol)
        if not protocol.attack:
            from eval.protocols import protocol_names

            attack_protocols = [n for n in protocol_names() if get_protocol(n).attack]
            raise UserError(f"--protocol {protocol.name} is an audit protocol (python -m eval.i2p --protocol); attack "
                            f"protocols: {', '.join(attack_protocols)}")
        if self.concept != "nudity":
            raise UserError(f"--concept {self.concept} contradicts protocol {protocol.name} (concept = nudity)")
        judge = {k: v for k, v in (self.judge_settings_pinned() or {}).items()}
        if judge and (judge.get("threshold") != protocol.threshold or set(judge.get("classes", ())) != set(protocol.classes)):
            raise UserError(f"the registered nudity judge (threshold {judge.get('threshold')}) is not protocol "
                            f"{protocol.name}'s (threshold {protocol.threshold}, classes {protocol.class_set})")
        self._table = load_protocol_prompts(protocol, self.prompts_csv, self.limit)
        self.prompts_csv = self._table.source
        images = len(self._table.rows) * protocol.images_per_prompt
        pinned = {"steps": protocol.steps, "guidance": protocol.guidance, "scheduler": protocol.scheduler,
                  "num_images": images, **protocol.attack}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in pinned.items():
            if name not in defaults:
                if name in protocol.attack:
                    raise UserError(f"protocol {protocol.name} pins {name} = {value}, which this attack has no field for")
                continue
            given = getattr(self, name)
            if given is not None and given != defaults[name]:  # explicitly given (the CLI also checks the flags it saw)
                check_flag(protocol, f"--{name}", given, value)
            setattr(self, name, value)
        return protocol

    @staticmethod
    def judge_settings_pinned() -> dict | None:
        """Threshold and classes of the built-in nudity judge, known without building it (None if replaced)."""
        from eval.attack import judges

        entry = judge_entry("nudity")
        if not entry.builtin:
            return None
        return {"threshold": judges.NUDITY_THRESHOLD, "classes": judges.NUDITY_CLASSES}

    def prompt_table(self):
        """The prompt rows (erase.diffusion.prompt_table.PromptTable) of --protocol / --prompts_csv (first --limit), or None."""
        return self._table

    def protocol_record(self) -> dict | None:
        from eval.protocols import record

        return record(self.protocol_spec, self.limit)

    def generation(self) -> dict:
        out = {"num_images": self.num_images, "steps": self.steps,
               "guidance": self.guidance if self.guidance == "row" else float(self.guidance),
               "scheduler": self.scheduler, "eval_seed": self.eval_seed, "dtype": "fp32",
               "seed_rule": "image i: prompt i mod len(prompts), its own CPU torch.Generator seeded eval_seed + i",
               "images": "decoded to uint8 as a saved PNG holds them, then judged"}
        if self._table is not None:  # recorded only then, so the resume keys of table-free audits stay as they were
            out.update(prompts=self._table.describe(), protocol=self.protocol_record(),
                       resolution=self.protocol_spec.resolution if self.protocol_spec else None,
                       seed_rule="each prompt row's own seed (+ image k), guidance as pinned")
        return out


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

    from erase.diffusion.generate import load_pipeline

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


PASS_RATE = 0.5  # a check "passes" when more than half of its images show the concept


def endless_batches(n: int, batch_size: int, generator):
    """Indices in successive random permutations of range(n), ``batch_size`` at a time (an epoch-free stream)."""
    import torch

    buffer: list[int] = []
    while True:
        while len(buffer) < batch_size:
            buffer += torch.randperm(n, generator=generator).tolist()
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def noise_target(scheduler, latents, noise, timesteps):
    """What the UNet is trained to predict: the noise (epsilon) or v (Salimans & Ho, 2022), per the scheduler."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"scheduler prediction_type {kind!r} is not epsilon or v_prediction")


def first_step_over(steps, rates, level: float = PASS_RATE):
    return next((int(s) for s, r in zip(steps, rates) if r > level), None)


def image_pixels(path, resolution: int) -> np.ndarray:
    """An image as the relearning sees it (resized, centre-cropped), as uint8 (H, W, 3) for the judge."""
    from erase.diffusion.data import load_image

    return load_image(path, resolution).add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


@dataclass
class AttackSetup:
    """What every attack starts from: the resolved model, its prompts, this process's place, the output folder."""

    info: "ModelInfo"
    prompts: "ConceptPrompts"
    rank: int
    world: int
    is_main: bool
    device: object
    out: Path
    start: float
    cpu_start: float


def begin(cfg: AttackConfig, accelerator=None) -> AttackSetup:
    """The checks and settings every attack opens with (cheap: no model is loaded): the judge may refuse the model,
    the prompts are resolved, and the process's rank, device and output folder are fixed."""
    import time

    import torch

    start, cpu_start = time.perf_counter(), time.process_time()
    entry = cfg.judge_entry
    info = resolve_model(cfg.model)
    if entry.check_model is not None:
        entry.check_model(cfg.model)
    prompts = concept_prompts(cfg.concept, cfg.forget_prompts, cfg.prompts_csv, cfg.limit)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return AttackSetup(info, prompts, rank, world, rank == 0, device, Path(cfg.output_dir), start, cpu_start)


@dataclass
class ConceptImagesConfig(AttackConfig):
    """The shared fields of attacks that learn from images of the concept (relearn, inversion): see concept_images."""

    USES_PROMPT_TABLE: ClassVar[bool] = True  # its prompts may come from --prompts_csv / --protocol rows

    num_target_images: int = field(default=8, metadata={
        "help": "images of the concept the attack learns from, drawn by the base model from the preset's generation "
                "prompts"})
    target_images: str | None = field(default=None, metadata={
        "help": "folder of images to learn from instead (x.txt beside x.png gives its prompt; default prompt: the "
                "first forget prompt)"})
    target_seed: int = field(default=2_000_000, metadata={
        "help": "target image i is drawn with seed target_seed + i (disjoint from erase/sd.py's forget / retain seeds)"})


@dataclass
class ConceptImages:
    """Images of the concept an attack learns from, with their latents and the judge's verdict on them."""

    images: object  # erase.diffusion.data.ImageSet
    generation: dict  # how they were drawn (steps, guidance, scheduler, resolution, batch_size)
    judged: dict
    mean: object  # VAE posterior mean / std of each image's latents
    std: object


def concept_images(cfg, run: AttackSetup, pipe, judge, resolution: int, accelerator=None) -> ConceptImages:
    """``cfg.target_images`` (a folder), or ``cfg.num_target_images`` drawn by the **base** model (the pipeline must
    still hold the base UNet) from the preset's generation prompts with seeds ``cfg.target_seed + i``; judged, and
    encoded once (cached under ``out/target``)."""
    from contextlib import nullcontext

    import torch

    from erase.diffusion import data as erase_data

    gen_kw = dict(steps=cfg.steps, guidance=float(cfg.guidance), scheduler=cfg.scheduler, resolution=resolution,
                  batch_size=cfg.generation_batch_size)
    if cfg.target_images:
        images = erase_data.folder_split("target", cfg.target_images, run.prompts.forget[0])
    else:
        images = erase_data.generate_split("target", run.prompts.generation, cfg.num_target_images, run.out, pipe=pipe,
                                           model_id=run.info.base, seed=cfg.target_seed, accelerator=accelerator, **gen_kw)
    judged = judge_images(judge, np.stack([image_pixels(f, resolution) for f in images.files]), images.prompts)
    if judged["hit_rate"] < PASS_RATE:
        logger.warning("the judge calls only %d of %d images of %s the attack learns from: its figures will understate it",
                       judged["hits"], judged["n"], cfg.concept)
    with accelerator.main_process_first() if accelerator is not None else nullcontext():  # one writer of the cache
        mean, std = erase_data.encode_latents(images, pipe.vae, resolution, run.out / "target", run.device, torch.float32,
                                              cfg.generation_batch_size)
    return ConceptImages(images, gen_kw, judged, mean, std)


def pipeline_text(pipe):
    """(family, text stack) of a loaded pipeline: prompts encoded as its family conditions the UNet (erase.diffusion.families)."""
    from erase.diffusion.families import FAMILIES, family_of, text_from_pipeline

    family = FAMILIES[family_of(dict(pipe.unet.config))]
    return family, text_from_pipeline(family, pipe)


def require_one_text_encoder(pipe, attack: str) -> None:
    """The prompt attacks optimise the input tokens of one text encoder; a family with two (SDXL) is refused."""
    family, _ = pipeline_text(pipe)
    if len(family.text_encoders) != 1:
        raise UserError(f"{attack} optimises the tokens of one text encoder; {family.title} conditions on "
                        f"{len(family.text_encoders)}: not supported yet (relearn works on every family)")


# ----------------------------------------------------------------------------------------------- prompts
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

    from erase.utils.files import atomic_write_bytes

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

    from erase.export.folder import versions as library_versions

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
                from eval.digits.model import DIGIT_WORDS

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
