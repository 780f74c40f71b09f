"""The one validation of an :class:`erase.diffusion.config.EraseConfig`, shared by ``erase/sd.py`` and ``erase_concept``.

Every check raises a one-line :class:`erase.utils.errors.UserError` naming the bad value (as its flag) and what is
allowed; nothing is loaded or written. Besides checking, it fills what depends on other options (as ``erase/sd.py``
always has): Scissorhands' diffusion defaults (``topk`` 2, ``lam`` 0.3: chosen on the digits model's tuning digits,
docs/DIGITS.md), the forget term (redirect to the concept's anchor, else a bounded ascent), the retain term (distill;
both with retain images; data for FT), the concepts (:attr:`EraseConfig.concept_set`) and, for a local folder, the
model family (:attr:`EraseConfig.family`; a hub id's is read when the run starts).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from erase.core import available_methods, build_method
from erase.core.options import all_option_types, method_options, option_names
from erase.core.registry import get_method_class
from erase.diffusion.adapter import RETAIN_MODES  # noqa: F401  (re-exported for the config)
from erase.utils.checks import check_int, check_numbers
from erase.utils.errors import UserError
from prompts import (ConceptSet, concept_set, custom_concept, is_concept_file, list_concepts, load_concept, load_concept_file,
                     read_prompt_file)

#: repair steps of a trained method when --max_train_steps is not given (a closed-form method takes 0)
DEFAULT_REPAIR_STEPS = 100
GENERIC_RETAIN = "nudity"  # a free-form concept without --retain_prompts borrows this preset's varied safe prompts
FORGET_LOSSES = ("ascent", "redirect", "esd")
TARGET_PRESET_NAMES = ("xattn", "selfattn", "attn", "noxattn", "full")
#: --targets when none is given: the cross-attention; with --robust on a UNet, the self-attention too (the adversary's
#: conditions then meet the layers that draw the concept; chosen on the tuning digits seven and one, docs/ROBUST.md).
#: An MMDiT keeps its token stream under --robust (measured on the transformer digits, benchmarks/RESULTS.md).
DEFAULT_TARGETS, ROBUST_TARGETS = "xattn", "attn"


def default_targets(robust: bool, family=None) -> str:
    """``--targets`` when none is given (:data:`DEFAULT_TARGETS`, :data:`ROBUST_TARGETS`); ``family`` None: not known yet."""
    return ROBUST_TARGETS if robust and (family is None or family.denoiser != "transformer") else DEFAULT_TARGETS


# Scissorhands on a diffusion UNet: trim 2 % of the cross-attention, forget term weight 0.3 (with the redirect term and the
# distill retain term), chosen on the digits model's tuning digits seven and one (docs/DIGITS.md)
SD_DEFAULTS = {"topk": 2.0, "lam": 0.3}
#: Adapter options that a method config may also have (the adapter uses them whatever the method).
ADAPTER_OPTIONS = {"negative_guidance"}
DEFAULT_FORGET_BOUND = 1.0  # ascent stops once L_f passes the MSE of predicting zero noise (unit-variance target)
FLOW_FORGET_BOUND = 2.0  # the same for a flow family: the velocity ε − x0 of unit-variance latents has variance 2


def validate(config) -> None:
    """Check ``config`` and fill its dependent defaults in place (see the module docstring)."""
    if config.method not in available_methods("diffusion"):
        raise UserError(f"--method {config.method!r} is not a diffusion method; choose one of {', '.join(available_methods('diffusion'))}")
    _method_options(config)
    opts = config.method_options
    if opts.get("forget_loss") is not None and opts["forget_loss"] not in FORGET_LOSSES:
        raise UserError(f"--forget_loss {opts['forget_loss']!r} is not one of the diffusion forget terms: {', '.join(FORGET_LOSSES)}")
    check_numbers(config.settings())  # every float option finite and in range (erase.utils.checks.OPTION_RANGES)
    check_int("--seed", config.train.seed)
    spec = export_spec(config)  # --export_format, --export_dtype, --lora_rank / --lora_energy
    if config.output.export_pipeline and "diffusers" not in spec.formats:
        raise UserError(f"--export_pipeline writes the diffusers format; --export_format {config.output.export_format!r} does not have it")
    config.concept_set = _concepts(config)
    config.family = _family(config)
    _closed_form(config)
    _method_defaults(config)
    if config.family is not None:
        apply_family(config, config.family)
    _counts(config)
    _data(config)
    from erase.diffusion.robust import check_robust  # --robust (issue 17): its options and defaults

    check_robust(config)
    try:  # the method's own config checks (ranges, choices), before any work
        build_method(config.method, "diffusion", **config.method_options)
    except (TypeError, ValueError) as e:
        raise UserError(f"--method {config.method}: {e}") from None


def apply_family(config, family) -> None:
    """The defaults that depend on the model family (data guidance and sampler; an MMDiT's ``--targets xattn`` means its
    text paths), and the family's own refusals: a DDPM sampler cannot draw from a flow model nor the reverse."""
    d = config.data
    if getattr(config, "bound_defaulted", False):
        config.method_options["forget_bound"] = FLOW_FORGET_BOUND if family.objective == "flow" else DEFAULT_FORGET_BOUND
    if d.guidance_scale is None:
        d.guidance_scale = family.default_guidance
    if d.data_scheduler is None:
        d.data_scheduler = family.data_scheduler
    flow_sampler = d.data_scheduler == "flow_euler"
    if flow_sampler != (family.objective == "flow"):
        allowed = "flow_euler" if family.objective == "flow" else "a DDPM sampler (ddim, pndm, lms, euler, euler_a, dpm)"
        raise UserError(f"--data_scheduler {d.data_scheduler} cannot sample from {family.title}; use {allowed}")
    targets = config.objective.targets
    if targets is None or getattr(config, "targets_defaulted", False):  # an MMDiT keeps its token stream under --robust too
        targets = config.objective.targets = default_targets(config.robustness.robust, family)
        config.targets_defaulted = True
    own = get_method_class(config.method, "diffusion").transformer_targets
    if targets == "xattn" and family.denoiser == "transformer" and own:  # the method's own default there (UCE, SPEED)
        targets = config.objective.targets = own
    if targets not in TARGET_PRESET_NAMES and targets not in family.target_presets:
        try:
            re.compile(targets)
        except re.error as e:
            raise UserError(f"--targets {targets!r} is neither a preset of {family.name} ({', '.join(family.target_presets)}) nor a "
                            f"valid regex: {e}") from None


def export_spec(config):
    """The checked :class:`erase.export.formats.ExportSpec` of the config's export options."""
    from erase.export.formats import spec_from_args

    return spec_from_args(config.output)


def _method_options(config) -> None:
    """Keep the options of the chosen method; an option of another method only is an error, never silently dropped. The
    adapter's own options that the method also has (ESD's ``negative_guidance``) are passed on from the adapter."""
    set_options = {k: v for k, v in config.method_options.items() if v is not None and k not in ADAPTER_OPTIONS}
    try:
        method_options(SimpleNamespace(**{**dict.fromkeys(all_option_types("diffusion")), **set_options}), config.method, "diffusion")
    except ValueError as e:
        raise UserError(str(e)) from None
    mine = option_names(config.method, "diffusion")
    kept = {k: v for k, v in set_options.items() if k in mine}
    for name in ADAPTER_OPTIONS & set(mine):
        kept[name] = getattr(config.objective, name)
    config.method_options = kept


def _concepts(config) -> ConceptSet:
    c = config.concepts
    if not c.concept or not c.concept.strip(","):
        raise UserError("--concept is required (a preset: " + ", ".join(list_concepts()) + "; or a name with --forget_prompts FILE)")
    names = [n.strip() for n in c.concept.split(",")]
    if any(not n for n in names):
        raise UserError(f"--concept {c.concept!r} has an empty name in its comma-separated list")
    try:
        concepts, from_prompt_file = [], False
        for name in names:
            if name in list_concepts():
                concepts.append(load_concept(name))
            elif is_concept_file(name):
                concepts += load_concept_file(name)
            elif len(names) > 1:
                raise UserError(f"unknown concept {name!r} in --concept {c.concept!r}; several concepts must each be a preset "
                                f"({', '.join(list_concepts())}) or a concept file (*.json)")
            elif c.forget_prompts:
                concepts.append(custom_concept(name, read_prompt_file(c.forget_prompts)))
                from_prompt_file = True
            else:
                raise UserError(f"unknown concept {name!r}; presets: {', '.join(list_concepts())} (or give --forget_prompts FILE for a "
                                "free-form concept, or a concept file NAME.json)")
        if c.forget_prompts and len(concepts) > 1:
            raise UserError("--forget_prompts applies to one concept; with several concepts each one's own prompts are used "
                            "(put them in a concept file)")
        if c.forget_prompts and not from_prompt_file:
            concepts[0].forget_prompts = read_prompt_file(c.forget_prompts)
        if c.anchor_prompt is not None:
            if not c.anchor_prompt.strip():
                raise UserError("--anchor_prompt is empty; give the prompt the concept is steered to (e.g. 'a photo "
                                "of a person'), or leave the flag out for the concept's own anchor")
            for k in concepts:
                k.anchor_prompt = c.anchor_prompt.strip()
        retain = read_prompt_file(c.retain_prompts) if c.retain_prompts else None
        if retain is None and not any(k.retain_prompts for k in concepts):
            retain = load_concept(GENERIC_RETAIN).retain_prompts
        found = concept_set(concepts, retain)
    except UserError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as e:  # a KeyError's text is its message, not its repr
        raise UserError(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)) from None
    if not found.retain_prompts:
        raise UserError(f"no retain prompts are left for --concept {c.concept!r} (give --retain_prompts FILE)")
    return found


def is_local(name: str) -> bool:
    """Whether ``--pretrained_model_name_or_path`` names a folder (else a hub id: ``owner/name``)."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1


def _family(config):
    """The family of a local base folder (checked against ``--model_family``); None for a hub id (read at run time)."""
    from erase.diffusion.families import detect

    m = config.model
    if not str(m.pretrained_model_name_or_path).strip():
        raise UserError("--pretrained_model_name_or_path is empty (give a diffusers Stable Diffusion folder or a hub id)")
    if not is_local(m.pretrained_model_name_or_path):
        return None
    path = Path(m.pretrained_model_name_or_path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--pretrained_model_name_or_path {str(path)!r} is a file, not a folder (give a diffusers Stable "
                        "Diffusion folder or a hub id; load a single-file checkpoint with diffusers' from_single_file and "
                        "save_pretrained it first)")
    if not path.exists():
        raise UserError(f"--pretrained_model_name_or_path {str(path)!r} does not exist (give a diffusers Stable Diffusion folder or a hub id)")
    try:  # the family from the folder's configs: a Flux / SD3 folder, or a forced family the UNet contradicts, is one line
        family = detect(str(path))
    except UserError as e:
        raise UserError(f"--pretrained_model_name_or_path: {e}") from None
    if m.model_family is not None:
        try:
            family = detect(str(path), force=m.model_family)
        except UserError as e:
            raise UserError(f"--model_family: {e}") from None
    if not (path / "model_index.json").is_file():
        raise UserError(f"--pretrained_model_name_or_path {str(path)!r} is not a diffusers Stable Diffusion folder (needs model_index.json and unet/)")
    return family


def _method_defaults(config) -> None:
    """Targets, then the defaults that depend on the method and the concepts: the retain term, the forget term and
    its bound, Scissorhands' diffusion defaults."""
    o, opts, method = config.objective, config.method_options, config.method
    if o.targets is None:
        o.targets = default_targets(config.robustness.robust, config.family)
        config.targets_defaulted = True  # a family found later (a hub id) settles it (apply_family)
    presets = set(TARGET_PRESET_NAMES) | (set(config.family.target_presets) if config.family is not None else set())
    if o.targets not in presets:
        try:
            re.compile(o.targets)
        except re.error as e:
            raise UserError(f"--targets {o.targets!r} is neither a preset ({', '.join(TARGET_PRESET_NAMES)}) nor a valid regex: {e}") from None
    if method == "scissorhands":
        for key, value in SD_DEFAULTS.items():
            opts.setdefault(key, value)
    if o.retain_loss is None:
        o.retain_loss = "data" if method == "ft" else "both" if config.data.retain_images else "distill"
    anchored = all(c.anchor_prompt for c in config.concept_set.concepts)
    if opts.get("forget_loss") is None and method == "scissorhands":
        opts["forget_loss"] = "redirect" if anchored else "ascent"
    forget_loss = opts.get("forget_loss") or ("redirect" if method == "salun" else "esd" if method == "esd" else "ascent")
    if forget_loss == "ascent" and opts.get("forget_bound") is None and "forget_bound" in option_names(method, "diffusion"):
        opts["forget_bound"] = DEFAULT_FORGET_BOUND
        config.bound_defaulted = True  # a flow family's own bound replaces it (apply_family)
    if forget_loss == "redirect" and not anchored:
        missing = next(c.name for c in config.concept_set.concepts if not c.anchor_prompt)
        raise UserError(f"--forget_loss redirect needs an anchor prompt; concept {missing!r} has none (give --anchor_prompt)")
    if not 0.0 <= o.distill_empty_fraction <= 1.0:
        raise UserError(f"--distill_empty_fraction must be in [0, 1], got {o.distill_empty_fraction}")
    if method == "esd" and opts.get("forget_loss") not in (None, "esd"):
        raise UserError(f"--method esd uses the esd forget term; --forget_loss {opts['forget_loss']} does not apply")
    if opts.get("trim_only") is not None:
        try:
            re.compile(opts["trim_only"])
        except re.error as e:
            raise UserError(f"--trim_only {opts['trim_only']!r} is not a valid regex: {e}") from None


def _closed_form(config) -> None:
    """Repair steps default to 100; a closed-form editor (uce, speed) takes none and reads no images: it keeps the concept
    set's retain prompts in its closed form, so the retain term and image options do not apply to it."""
    t, o, d = config.train, config.objective, config.data
    if not get_method_class(config.method, "diffusion").closed_form:
        if t.max_train_steps is None:
            t.max_train_steps = DEFAULT_REPAIR_STEPS
        return
    m = config.method
    if t.max_train_steps:
        raise UserError(f"--method {m} is a closed-form edit with no repair steps: --max_train_steps must be 0 (or unset), "
                        f"got {t.max_train_steps}")
    t.max_train_steps = 0
    for flag in ("forget_images", "retain_images"):
        if getattr(d, flag):
            raise UserError(f"--method {m} edits from prompts alone and reads no images; --{flag} does not apply")
    if o.retain_loss not in (None, "distill"):
        raise UserError(f"--method {m} keeps the concept set's retain prompts in its closed form; --retain_loss {o.retain_loss} "
                        "does not apply (leave it unset)")
    o.retain_loss = "distill"  # the retain prompts are encoded (as the distill term's): the edit's preserved set


def _counts(config) -> None:
    t, d, o = config.train, config.data, config.objective
    for name, value in (("max_train_steps", t.max_train_steps), ("checkpointing_steps", t.checkpointing_steps),
                        ("lr_warmup_steps", t.lr_warmup_steps)):
        if value < 0:
            raise UserError(f"--{name} must be >= 0, got {value}")
    for name, value in (("train_batch_size", t.train_batch_size), ("gradient_accumulation_steps", t.gradient_accumulation_steps),
                        ("num_inference_steps", d.num_inference_steps), ("generation_batch_size", d.generation_batch_size),
                        ("esd_ddim_steps", o.esd_ddim_steps), ("log_every", t.log_every)):
        if value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    for name in ("saliency_batches", "memory_refresh", "num_memories", "checkpoints_total_limit"):
        value = t.checkpoints_total_limit if name == "checkpoints_total_limit" else config.method_options.get(name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if d.resolution is not None and (d.resolution < 8 or d.resolution % 8):
        raise UserError(f"--resolution must be a positive multiple of 8, got {d.resolution}")


def _data(config) -> None:
    d, t = config.data, config.train
    for flag in ("forget_images", "retain_images"):
        folder = getattr(d, flag)
        if folder and not Path(folder).is_dir():
            raise UserError(f"--{flag} {folder!r} is not a folder")
    if d.forget_images and d.retain_images:
        f, r = (Path(x).expanduser().resolve() for x in (d.forget_images, d.retain_images))
        if f == r or f in r.parents or r in f.parents:
            raise UserError(f"--forget_images {d.forget_images!r} and --retain_images {d.retain_images!r} are the same "
                            "images (one folder holds the other); give two separate folders")
    if not d.forget_images and d.num_forget_images < 1:
        raise UserError(f"--num_forget_images must be >= 1 (or give --forget_images DIR), got {d.num_forget_images}")
    if (not d.retain_images and d.num_retain_images < 1 and get_method_class(config.method, "diffusion").uses_retain
            and config.objective.retain_loss != "distill"):
        raise UserError(f"--method {config.method} with --retain_loss {config.objective.retain_loss} needs retain images: "
                        "--num_retain_images must be >= 1 (or give --retain_images DIR, or use --retain_loss distill)")
    if t.resume_from_checkpoint and t.resume_from_checkpoint != "latest":
        ck = Path(t.resume_from_checkpoint)
        if not ck.is_dir() or not re.fullmatch(r"checkpoint-\d+", ck.name):
            raise UserError(f"--resume_from_checkpoint {t.resume_from_checkpoint!r} is not a checkpoint-<step> folder (or use 'latest')")
