"""Attack configs: the settings every attack shares (``AttackConfig``), the shared fields of attacks that learn from
images of the concept (``ConceptImagesConfig``), named budgets, and the CLI generated from a config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from erase.utils.checks import check_int_list
from erase.utils.errors import UserError
from eval.attack.utils.models import resolve_model
from eval.judges.registry import GENERATION_DEFAULTS, JudgeEntry, judge_entry


def int_list(value, flag: str, minimum: int | None = None) -> tuple[int, ...]:
    """``"0,1,2"`` / ``[0, 1, 2]`` -> ``(0, 1, 2)``: distinct integers, no empty entry; anything else is a
    ``UserError`` naming the flag and the bad item."""
    return tuple(check_int_list(f"--{flag}", value, -(2**63) if minimum is None else minimum, 2**63 - 1))


def str_list(value, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    items = str(value).split(",") if isinstance(value, str) else list(value)
    out = tuple(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))
    bad = [v for v in out if v not in allowed]
    if not out or bad:
        raise UserError(f"--{flag} {value!r}: choose from {', '.join(allowed)} (comma-separated)")
    return out


def optional_number(value, cast, flag: str):
    """CLI strings for ``int | None`` / ``float | None`` fields."""
    if value is None or not isinstance(value, str):
        return value
    try:
        return cast(value)
    except ValueError:
        raise UserError(f"--{flag} must be a number, got {value!r}") from None


def cast_fields(cfg, casts: dict[str, type], minimum: dict[str, int] | None = None) -> None:
    """Cast CLI strings of ``cfg``'s fields (``{name: int | float}``) and check integer minimums, one line each."""
    for name, cast in casts.items():
        setattr(cfg, name, optional_number(getattr(cfg, name), cast, name))
    for name, low in (minimum or {}).items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise UserError(f"--{name} must be >= {low}, got {value}")


def apply_budget(cfg, budgets: dict[str, dict], flag: str = "budget") -> None:
    """Fill the fields of named budget ``cfg.<flag>`` (``budgets[name]``); a field given with another value is an
    error naming it (a field is "given" when it differs from its default)."""
    name = getattr(cfg, flag)
    if name is None:
        return
    if name not in budgets:
        raise UserError(f"unknown --{flag} {name!r}; choose one of: {', '.join(sorted(budgets))}")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for key, value in budgets[name].items():
        given = getattr(cfg, key)
        if given != defaults[key] and str(given) != str(value) and _norm(given) != _norm(value):
            raise UserError(f"--{key} {_show(given)} contradicts --{flag} {name} ({key} = {_show(value)}); drop one of them")
        setattr(cfg, key, value)


def _norm(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclass
class AttackConfig:
    """Settings every attack shares; an attack's config subclasses this and adds its own fields (all defaulted)."""

    model: str = field(metadata={"help": "attacked model: erase/sd.py output (unet/ + erase_config.json), "
                                         "pipeline folder or hub id"})
    concept: str = field(metadata={"help": "concept to bring back; needs a judge (zero..nine, nudity, a shapes value such as star or red, or registered)"})
    output_dir: str = field(metadata={"help": "folder for summary.json, attacks.jsonl, the learned artefacts and the "
                                              "resumable cells (never the model's or its base's folder)"})
    forget_prompts: str | None = field(default=None, metadata={
        "help": "file of prompts the checks generate from, one a line (default: the concept preset's forget prompts)"})
    num_images: int | None = field(default=None, metadata={
        "help": "images per check, cycling over the prompts (default: the judge's protocol; digits 40)"})
    steps: int | None = field(default=None, metadata={"help": "sampling steps (default: the judge's protocol; digits 20)"})
    guidance: float | None = field(default=None, metadata={
        "help": "classifier-free guidance (default: the judge's protocol; digits 4)"})
    scheduler: str | None = field(default=None, metadata={
        "help": "sampler, erase.diffusion.generate names (default: the judge's protocol; digits: the model family's own, "
                "ddim for the UNet model, flow_euler for the transformer)"})
    generation_batch_size: int | None = field(default=None, metadata={
        "help": "images per pipeline call (default: the judge's protocol; digits 100); does not change images beyond float rounding"})
    eval_seed: int = field(default=0, metadata={
        "help": "image i of every check is drawn with seed CHECK_SEED_OFFSET (10**8) + eval_seed + i, a range no "
                "erasure draws its training images from"})
    save_images: bool = field(default=False, metadata={"help": "also save every check's images as PNG under images/"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into a non-empty --output_dir this tool did not create (only the entries the audit writes are replaced)"})
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
        from erase.utils.checks import check_int, check_numbers

        for name in ("model", "concept", "output_dir"):
            if not str(getattr(self, name) or "").strip():
                raise UserError(f"--{name} is required")
        entry = judge_entry(self.concept)  # UserError listing the judged concepts
        for name, cast in (("num_images", int), ("steps", int), ("generation_batch_size", int), ("eval_seed", int),
                           ("limit", int)):
            setattr(self, name, optional_number(getattr(self, name), cast, name))
        if not (self.protocol is not None and str(self.guidance).strip() == "row"):
            self.guidance = optional_number(self.guidance, float, "guidance")
        check_int("--eval_seed", self.eval_seed, 0, 10**8 - 1)
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
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown --scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        check_numbers(vars(self))  # every float finite and in range (erase.utils.checks.OPTION_RANGES)
        if self.scheduler is None:  # the judge leaves the sampler to the model (digits): its family's own
            from erase.diffusion.generate import family_sampler

            self.scheduler = family_sampler(resolve_model(self.model).base)
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
        from eval.judges import nudity

        entry = judge_entry("nudity")
        if not entry.builtin:
            return None
        return {"threshold": nudity.NUDITY_THRESHOLD, "classes": nudity.NUDITY_CLASSES}

    def prompt_table(self):
        """The prompt rows (erase.diffusion.prompt_table.PromptTable) of --protocol / --prompts_csv (first --limit), or None."""
        return self._table

    def protocol_record(self) -> dict | None:
        from eval.protocols import record

        return record(self.protocol_spec, self.limit)

    def generation(self) -> dict:
        from eval.attack.utils.checks import CHECK_SEED_OFFSET

        out = {"num_images": self.num_images, "steps": self.steps,
               "guidance": self.guidance if self.guidance == "row" else float(self.guidance),
               "scheduler": self.scheduler, "eval_seed": self.eval_seed, "check_seed_offset": CHECK_SEED_OFFSET,
               "dtype": "fp32",
               "seed_rule": "image i: prompt i mod len(prompts), its own CPU torch.Generator seeded "
                            "check_seed_offset + eval_seed + i",
               "images": "decoded to uint8 as a saved PNG holds them, then judged"}
        if self._table is not None:
            out.update(prompts=self._table.describe(), protocol=self.protocol_record(),
                       resolution=self.protocol_spec.resolution if self.protocol_spec else None,
                       seed_rule="each prompt row's own seed (+ image k), guidance as pinned")
        return out


@dataclass
class ConceptImagesConfig(AttackConfig):
    """The shared fields of attacks that learn from images of the concept (relearn, inversion): see images.py."""

    USES_PROMPT_TABLE: ClassVar[bool] = True  # its prompts may come from --prompts_csv / --protocol rows

    num_target_images: int = field(default=8, metadata={
        "help": "images of the concept the attack learns from, drawn by the base model from the preset's generation "
                "prompts"})
    target_images: str | None = field(default=None, metadata={
        "help": "folder of images to learn from instead (x.txt beside x.png gives its prompt; default prompt: the "
                "first forget prompt)"})
    target_seed: int = field(default=2_000_000, metadata={
        "help": "target image i is drawn with seed target_seed + i (disjoint from erase/sd.py's forget / retain seeds)"})

    def __post_init__(self):
        super().__post_init__()
        cast_fields(self, {"num_target_images": int, "target_seed": int}, {"num_target_images": 1, "target_seed": 0})
        if self.target_images and not Path(self.target_images).is_dir():
            raise UserError(f"--target_images folder not found: {self.target_images}")


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
