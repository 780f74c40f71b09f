"""An erasure run as a config: dataclasses for the model, the concept(s), the method, the objective, the data, the
training loop and the export (as transformers' ``TrainingArguments`` describes a training run).

Every field is an option of both front ends, declared once here with its default and help:

* ``erase/sd.py`` turns each field into a flag (:func:`add_config_arguments`, as ``HfArgumentParser`` does), parses, and
  builds the config with :meth:`EraseConfig.from_namespace`;
* ``erase.erase_concept(base, concept, **options)`` builds it with :meth:`EraseConfig.from_options`.

Neither goes through the other. Both end in :meth:`EraseConfig.validate` (erase/diffusion/validate.py): one set of
checks and one set of messages, each a one-line :class:`erase.utils.errors.UserError` that names the bad value and what
is allowed. A method's own options are its config dataclass's fields (``erase/core/options.py``); they are kept in
``EraseConfig.method_options`` (only the ones set, plus this adapter's defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field

from erase.core import available_methods
from erase.core.options import all_option_types
from erase.diffusion.validate import GENERIC_RETAIN, RETAIN_MODES, TARGET_PRESET_NAMES, validate

DATA_SCHEDULERS = ("ddim", "pndm", "lms", "euler", "euler_a", "dpm", "flow_euler")


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


@dataclass
class ModelConfig:
    """The base model and its family."""

    pretrained_model_name_or_path: str = field(default="CompVis/stable-diffusion-v1-4", metadata=_help(
        "Base model: a hub id or a local diffusers folder of a Stable Diffusion 1.x, 2.x, XL, SD3 / SD3.5 or FLUX.1 pipeline."))
    model_family: str | None = field(default=None, metadata=_help(
        "Model family (default: detected from model_index.json and the UNet config); a family the UNet contradicts is an error.",
        choices="families"))
    revision: str | None = field(default=None, metadata=_help("Hub revision of the base model."))
    variant: str | None = field(default=None, metadata=_help("Weight variant of the base model (e.g. fp16)."))


@dataclass
class ConceptConfig:
    """What is erased and what is kept."""

    concept: str | None = field(default=None, metadata=_help(
        "A preset name (see --list_concepts), a free-form name used with --forget_prompts, or a concept file NAME.json (one "
        "preset-style object or a list of them: name, forget_prompts, anchor_prompt, retain_prompts, ...); several at once as "
        "a comma-separated list (--concept three,five,eight or --concept my_fifty.json), each with its own prompts and anchor."))
    forget_prompts: str | None = field(default=None, metadata=_help(
        "File with one forget prompt per line (free-form concept, or overrides a preset's)."))
    anchor_prompt: str | None = field(default=None, metadata=_help("Prompt the concept is redirected to (overrides the preset's)."))
    retain_prompts: str | None = field(default=None, metadata=_help(
        f"File with one retain prompt per line (default: the preset's, or the {GENERIC_RETAIN!r} preset's for a free-form concept)."))


@dataclass
class ObjectiveConfig:
    """The diffusion objective around the method: targets, retain term, ESD's sampling (the adapter's settings)."""

    targets: str | None = field(default=None, metadata=_help(
        f"Trainable denoiser parameters: a preset ({', '.join(TARGET_PRESET_NAMES)}; SD3 / Flux also text, pooled, text_pooled, "
        "joint_attn, and xattn means their token stream, text) or a regex over parameter names. Default xattn; with "
        "--robust on a UNet, attn (self- and cross-attention)."))
    exclude: str | None = field(default=None, metadata=_help("Preset or regex of parameters never touched (wins over --targets)."))
    retain_loss: str | None = field(default=None, metadata=_help(
        "What keeps the rest: distill (match the frozen base's prediction for the retain prompts at fresh pure-noise latents: "
        "no retain images needed), data (noise-prediction loss on generated / given retain images) or both. Default: distill; "
        "both when --retain_images is given; data for --method ft (fine-tuning on retain data is what FT is).",
        choices=RETAIN_MODES))
    distill_empty_fraction: float = field(default=0.1, metadata=_help(
        "Share of distillation prompts replaced by the empty prompt (the unconditional branch of guidance), in [0, 1]."))
    negative_guidance: float = field(default=1.0, metadata=_help(
        "The esd forget term's eta, the strength of the negative guidance (--method esd, or --forget_loss esd)."))
    esd_ddim_steps: int = field(default=50, metadata=_help("ESD: DDIM steps of the schedule x_t is sampled on."))
    esd_start_guidance: float = field(default=3.0, metadata=_help("ESD: guidance scale used to sample x_t."))



@dataclass
class TrainConfig:
    """The shared optimisation loop (erase.core.engine)."""

    lr: float = field(default=1e-5, metadata=_help("Learning rate."))
    optimizer: str = field(default="adam", metadata=_help("Optimizer.", choices=("adam", "adamw", "sgd")))
    lr_scheduler: str = field(default="constant", metadata=_help("Learning-rate schedule.", choices=("constant", "linear", "cosine")))
    lr_warmup_steps: int = field(default=0, metadata=_help("Linear warm-up steps."))
    max_grad_norm: float | None = field(default=None, metadata=_help("Clip the gradient norm (after the projection)."))
    max_train_steps: int | None = field(default=None, metadata=_help(
        "Repair optimizer steps (default: 100; 0 for a closed-form method, uce or speed, which takes no other value)."))
    train_batch_size: int = field(default=1, metadata=_help("Per-process batch size of the forget and retain streams."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    mixed_precision: str | None = field(default=None, metadata=_help(
        "Mixed precision (default: accelerate's config). VAE, text encoder and frozen UNets are cast to it.",
        choices=("no", "fp16", "bf16")))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute UNet activations in backward to save memory."))
    seed: int = field(default=0, metadata=_help("Seed of everything: data, trim, noise, timesteps."))
    checkpointing_steps: int = field(default=0, metadata=_help("Save checkpoint-{step} every N steps (0: never)."))
    checkpoints_total_limit: int | None = field(default=None, metadata=_help("Keep at most this many checkpoints."))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help("'latest' or a checkpoint-{step} folder."))
    log_every: int = field(default=10, metadata=_help("Log the losses every N steps."))


@dataclass
class OutputConfig:
    """Where the run writes, and what its export holds (erase/export/)."""

    output_dir: str = field(default="erased-model", metadata=_help("Where checkpoints, data and the export go."))
    overwrite: bool = field(default=False, metadata=_help(
        "Write into a non-empty --output_dir / --data_dir this tool did not create (only the entries the run writes are replaced)."))
    export_pipeline: bool = field(default=False, metadata=_help("Also write a full pipeline of the model's family into output_dir."))
    export_format: str = field(default="diffusers", metadata=_help(
        "Comma list of export formats (erase/export/formats.py): diffusers (unet/), single_file (erased.safetensors: the whole "
        "pipeline in the original LDM layout of its family, for A1111 / ComfyUI / from_single_file), lora (erased_lora.safetensors: "
        "the change as a kohya LoRA). unet_delta.safetensors is always written."))
    export_dtype: str | None = field(default=None, metadata=_help(
        "dtype of the single file and the LoRA (default fp16).", choices=("fp16", "bf16", "fp32")))
    lora_rank: int | None = field(default=None, metadata=_help("LoRA export: rank of every changed tensor (capped at its full rank)."))
    lora_energy: float | None = field(default=None, metadata=_help(
        "LoRA export: share of each change's energy (squared Frobenius norm) kept, in (0, 1] (default 0.99)."))


@dataclass
class DataConfig:
    """The forget / retain images: generated by the base model, or the user's folders."""

    data_dir: str | None = field(default=None, metadata=_help(
        "Folder of the generated images and cached latents (default: output_dir/data)."))
    forget_images: str | None = field(default=None, metadata=_help(
        "Use this folder of images as the forget set instead of generating it (x.txt beside x.png gives its caption; with "
        "several concepts, one subfolder per concept named like it)."))
    retain_images: str | None = field(default=None, metadata=_help(
        "Use this folder of images as the retain set (x.txt beside x.png gives its prompt)."))
    num_forget_images: int = field(default=100, metadata=_help("Forget images to generate."))
    num_retain_images: int = field(default=100, metadata=_help("Retain images to generate."))
    num_inference_steps: int = field(default=50, metadata=_help("Sampling steps for generating the data."))
    guidance_scale: float | None = field(default=None, metadata=_help(
        "Guidance scale for generating the data (default: the family's: 7.5 for SD 1.x / 2.x / XL, 7 for SD3, Flux's distilled 3.5)."))
    data_scheduler: str | None = field(default=None, metadata=_help(
        "Scheduler for generating the data (default: the family's: ddim for SD 1.x / 2.x / XL, flow_euler for SD3 / Flux).",
        choices=DATA_SCHEDULERS))
    generation_batch_size: int = field(default=8, metadata=_help("Images per pipeline call when generating the data."))
    resolution: int | None = field(default=None, metadata=_help("Image size (default: UNet sample size x VAE scale factor)."))


@dataclass
class RobustConfig:
    """The robust erasure (issue 17; erase/diffusion/robust.py, docs/ROBUST.md): token embeddings learned on the model
    being erased join the forget term. Unset options take the defaults chosen on the digits tuning digits."""

    robust: bool = field(default=False, metadata=_help(
        "Robust erasure: before the trim and every --robust_every steps, learn a token embedding per concept by textual "
        "inversion on the current model and add it, in the concept's prompts, to the forget conditions (every method with "
        "a forget term)."))
    robust_every: int | None = field(default=None, metadata=_help("Steps between two searches (default 25)."))
    robust_tokens: int | None = field(default=None, metadata=_help(
        "Learned tokens kept per concept: the newest searches' (default 4)."))
    robust_steps: int | None = field(default=None, metadata=_help("Adam steps of one search (default 100)."))
    robust_lr: float | None = field(default=None, metadata=_help("Learning rate of the search (default 5e-3)."))
    robust_batch_size: int | None = field(default=None, metadata=_help("Forget images per search step (default 8)."))
    robust_start: str | None = field(default=None, metadata=_help(
        "Where a search starts: init (the neutral init word, as the attack does) or last (the concept's newest token; default, chosen on the tuning digits).",
        choices=("init", "last")))
    robust_words: str | None = field(default=None, metadata=_help(
        "Comma-separated words the learned token replaces in the concept's prompts (default: the words of its forget "
        "prompts that no retain prompt uses, e.g. three,3)."))
    robust_init_word: str | None = field(default=None, metadata=_help(
        "One-token word a search starts from (default: the first one-token word of object, thing, image, picture)."))


#: The sections of an :class:`EraseConfig`, in the order their flags are listed, with their help headings.
SECTIONS: dict[str, tuple[type, str]] = {
    "model": (ModelConfig, "model"),
    "concepts": (ConceptConfig, "concept"),
    "objective": (ObjectiveConfig, "objective and targets"),
    "train": (TrainConfig, "optimisation"),
    "output": (OutputConfig, "checkpoints and output"),
    "data": (DataConfig, "data"),
    "robustness": (RobustConfig, "robust erasure (--robust)"),
}


@dataclass
class EraseConfig:
    """One erasure run. Every option reads flat too: ``config.lr`` is ``config.train.lr``, ``config.topk`` the method's
    ``topk`` (None when the method does not have it or it was not set)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    method: str = "scissorhands"
    #: the chosen method's options that were set (and, after validation, this adapter's defaults for it)
    method_options: dict = field(default_factory=dict)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    data: DataConfig = field(default_factory=DataConfig)
    robustness: RobustConfig = field(default_factory=RobustConfig)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        for section in SECTIONS:
            obj = self.__dict__.get(section)
            if obj is not None and name in obj.__dataclass_fields__:
                return getattr(obj, name)
        if name in method_option_names():
            return self.__dict__.get("method_options", {}).get(name)
        raise AttributeError(f"EraseConfig has no option {name!r}")

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "EraseConfig":
        """From parsed flags (:func:`add_config_arguments`): each section takes its fields; the method's options are
        every method flag that was set (a flag of another method is refused by :meth:`validate`)."""
        values = vars(ns)
        sections = {name: sec(**{f.name: values[f.name] for f in dataclasses.fields(sec) if f.name in values})
                    for name, (sec, _) in SECTIONS.items()}
        options = {k: values[k] for k in method_option_names() if values.get(k) is not None}
        return cls(method=values.get("method", "scissorhands"), method_options=options, **sections)

    @classmethod
    def from_options(cls, pretrained_model_name_or_path: str, concept: str | list[str], method: str = "scissorhands",
                     output_dir: str | None = None, **options) -> "EraseConfig":
        """From keyword options named like the flags (``lr=1e-3``, ``topk=2``, ``export_format=["lora"]``). An option
        that is none of them is a ``TypeError`` listing the allowed ones; a value of the wrong kind a ``ValueError``."""
        allowed = sorted(set(option_types()) - RESERVED)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"erase_concept() got an unknown option {unknown[0]!r}; allowed: {', '.join(allowed)}")
        if isinstance(concept, (list, tuple)):
            concept = ",".join(str(c) for c in concept)
        values = {"pretrained_model_name_or_path": str(pretrained_model_name_or_path), "concept": concept}
        if output_dir is not None:
            values["output_dir"] = str(output_dir)
        for name, value in options.items():
            if value is not None:
                values[name] = _coerce(name, value, option_types()[name])
        sections = {name: sec(**{f.name: values[f.name] for f in dataclasses.fields(sec) if f.name in values})
                    for name, (sec, _) in SECTIONS.items()}
        method_opts = {k: v for k, v in values.items() if k in method_option_names()}
        return cls(method=method, method_options=method_opts, **sections)

    # -- what the run reads -----------------------------------------------------------------------------------
    def validate(self) -> "EraseConfig":
        """Check every value and fill the defaults that depend on others (erase/diffusion/validate.py); returns self."""
        validate(self)
        return self

    def settings(self) -> dict:
        """Every option by name, sorted (``erase_config.json``'s ``settings``): the sections' fields, the method, and
        every method option flag (None where this run's method does not set it), as the command line's flags."""
        out = {}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        out["method"] = self.method
        for name in method_option_names():  # an adapter option a method shares (negative_guidance) keeps its section's value
            out.setdefault(name, self.method_options.get(name))
        return dict(sorted(out.items()))


#: Options erase_concept sets from its own arguments, or that do not run an erasure.
RESERVED = {"pretrained_model_name_or_path", "concept", "method", "output_dir"}


def method_option_names() -> list[str]:
    """Every option of every diffusion method (one flag per name; erase/core/options.py)."""
    return list(all_option_types("diffusion"))


def option_types() -> dict[str, type]:
    """Every option's scalar type: the sections' fields and the methods' options."""
    out = {}
    for sec, _ in SECTIONS.values():
        hints = typing.get_type_hints(sec)
        for f in dataclasses.fields(sec):
            out[f.name] = _scalar(hints[f.name])
    for name, kind in all_option_types("diffusion").items():
        out.setdefault(name, kind)
    return out


def _scalar(annotation) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _coerce(name: str, value, kind: type):
    """A keyword option as the flag would have parsed it: lists join into comma lists, on/off options take bools."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"option {name!r} is on/off: give True or False, got {value!r}")
        return value
    if isinstance(value, (list, tuple)) and kind is str:
        return ",".join(str(v) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and not isinstance(value, str):
        return str(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"option {name!r} takes an integer, got {value!r}")
    if kind is float and not isinstance(value, float):
        raise ValueError(f"option {name!r} takes a number, got {value!r}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, families: tuple[str, ...]) -> None:
    """One flag per field of every section, in section order, each under its section's heading: ``--name`` with the
    field's type, default, help and choices; a ``bool`` field is a switch (``store_true``)."""
    for name, (sec, title) in SECTIONS.items():
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(sec)
        for f in dataclasses.fields(sec):
            kind = _scalar(hints[f.name])
            meta = dict(f.metadata)
            text = meta.get("help", "").replace("%", "%%")
            choices = meta.get("choices")
            if choices == "families":
                choices = families
            if kind is bool:
                group.add_argument(f"--{f.name}", action="store_true", help=text)
            else:
                group.add_argument(f"--{f.name}", type=kind, default=f.default, choices=choices, help=text)
        if name == "concepts":  # the method comes right after what is erased, as before
            group.add_argument("--method", type=str, default="scissorhands", choices=available_methods("diffusion"),
                               help="Erasure method (every registered method that fits a diffusion adapter).")
