"""Python API: ``erase_concept`` builds a run's config from keyword options and runs it; ``load_erased`` loads any of
its exports.

    from erase import erase_concept, load_erased

    unet = erase_concept("CompVis/stable-diffusion-v1-4", "nudity", output_dir="nudity-erased", max_train_steps=100)
    pipe = load_erased("nudity-erased")

``erase_concept`` and ``erase/sd.py`` are two front ends of one library call: each builds an
:class:`erase.diffusion.config.EraseConfig` (here with :meth:`~erase.diffusion.config.EraseConfig.from_options`, there
from its flags), both validate it the same way (an option that is none of the flags is a ``TypeError`` naming it and
listing the allowed ones; a bad value a ``ValueError`` with the command line's one-line message) and both run
:func:`erase.diffusion.run.erase`. The stages can be called alone too (``erase.diffusion.run.prepare_data``,
docs/ARCHITECTURE.md). It runs in the current process under the current accelerate state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from erase.utils.errors import UserError

logger = logging.getLogger(__name__)

#: load_erased's default order of formats
ORDER = ("diffusers", "single_file", "lora", "delta")
#: Options of erase_concept that name a prompt file (one prompt per line), as the command line's flags do.
PROMPT_FILE_OPTIONS = ("forget_prompts", "retain_prompts")


def allowed_options() -> list[str]:
    """The options ``erase_concept`` takes: every option of a run's config (its sections' fields and the methods'
    options) except the ones it sets from its own arguments."""
    from erase.diffusion.config import RESERVED, option_types

    return sorted(set(option_types()) - RESERVED)


def erase_concept(pipe_or_path, concept: str | list[str], method: str = "scissorhands", output_dir: str | None = None,
                  **options):
    """Erase ``concept`` (a preset name, a list of presets, a concept file ``NAME.json``, or a free-form name with
    ``forget_prompts=FILE``: the path of a prompt file, one prompt per line, as the command line takes it) from a
    Stable Diffusion pipeline with ``method``; returns the erased ``UNet2DConditionModel``. A value of the wrong kind
    (a concept that is not a string, a list of prompts for a prompt file) is a ``UserError`` (a ``ValueError``).

    ``pipe_or_path``: a diffusers folder, a hub id, or a loaded pipeline (its components are used in-process and left
    unchanged; it must still be what its ``name_or_path`` holds, which the export records as the base). With
    ``output_dir`` the export is written there (every format of ``export_format``), else the run works in a temporary
    folder that is removed. ``options``: every option of ``erase/sd.py`` (``allowed_options()``), e.g. ``lr=1e-3``,
    ``max_train_steps=50``, ``topk=2``, ``forget_images="dir"``, ``export_format=["diffusers", "lora"]``.
    """
    from erase.diffusion.config import EraseConfig
    from erase.diffusion.load import components_from_pipeline
    from erase.diffusion.run import erase

    _check_arguments(pipe_or_path, concept, options)
    concept = [os.fspath(c) for c in concept] if isinstance(concept, (list, tuple)) else os.fspath(concept)
    components = None
    if isinstance(pipe_or_path, (str, os.PathLike)):
        base = os.fspath(pipe_or_path)
    else:
        pipe = pipe_or_path
        base = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
        if not base:
            raise ValueError("the pipeline has no name_or_path (it was built in memory): save it with save_pretrained and pass the folder")
        missing = [p for p in ("vae", "unet", "scheduler") if getattr(pipe, p, None) is None]
        if missing:
            raise ValueError(f"the pipeline has no {missing[0]}; erase_concept needs a text-to-image Stable Diffusion pipeline")

        def components(family):  # the UNet trains: a copy, so the caller's pipeline keeps its weights
            return components_from_pipeline(pipe, family)
    with (contextlib.nullcontext(output_dir) if output_dir is not None else tempfile.TemporaryDirectory(prefix="erase-")) as out:
        config = EraseConfig.from_options(base, concept, method, str(out), **options).validate()
        return erase(config, components=components).unet


def _kind(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_arguments(pipe_or_path, concept, options: dict) -> None:
    """One ``UserError`` line naming a value of the wrong kind and what is allowed, before any work."""
    if not isinstance(pipe_or_path, (str, os.PathLike)) and not hasattr(pipe_or_path, "components"):
        raise UserError(f"pipe_or_path {_kind(pipe_or_path)} is not allowed; allowed: a hub id, a diffusers folder path, "
                        "or a loaded diffusers pipeline")
    concepts = list(concept) if isinstance(concept, (list, tuple)) else [concept]
    bad = [c for c in concepts if not isinstance(c, (str, os.PathLike))]
    if bad or not concepts:
        raise UserError(f"concept {_kind(bad[0] if bad else concept)} is not allowed; allowed: a preset name, a free-form "
                        "name with forget_prompts=FILE, a concept file NAME.json, or a non-empty list of these")
    for name in PROMPT_FILE_OPTIONS:
        value = options.get(name)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            what = f"a {type(value).__name__} of {len(value)} prompt(s)" if isinstance(value, (list, tuple)) else _kind(value)
            raise UserError(f"{name} takes the path of a prompt file (one prompt per line), not {what}; write the prompts to "
                            f"a UTF-8 text file, one per line, and pass {name}='that_file.txt'")


def _config(path) -> tuple[Path, dict]:
    from erase.export.local import check_export_folder, read_record

    folder = check_export_folder(path)  # empty, missing, a file, no record: one line each
    config = read_record(folder)  # with this machine's local paths (erase_local.json) put back
    if not isinstance(config, dict) or "method" not in config:
        raise ValueError(f"{folder / 'erase_config.json'} is not an erase/sd.py export record")
    return folder, config


def load_erased(path, format: str | None = None, base: str | None = None, **kwargs):
    """A ready pipeline from an export folder: the base named in ``erase_config.json`` with the erased denoiser (the
    UNet of SD 1.x / 2.x / XL, the transformer of SD3 / Flux).

    ``format``: ``diffusers`` (``unet/`` / ``transformer/`` or a full pipeline), ``single_file`` (``from_single_file``
    with the base's configs), ``lora`` (``load_lora_weights`` on the base) or ``delta`` (the base with
    ``unet_delta.safetensors`` / ``transformer_delta.safetensors``); default: the first the folder has in that order (a
    format its ``erase_config.json`` lists but whose files are missing, as in a shared copy of the LoRA alone, is named
    in a warning with the format loaded instead; an explicit ``format`` loads that format or fails).
    ``base``: the base model's folder or hub id, where the export's record does not lead to it (a shared copy of an
    export made on a local base: its path stays in the maker's ``erase_local.json``, :mod:`erase.export.local`).
    ``kwargs`` go to ``from_pretrained`` / ``from_single_file`` (e.g. ``torch_dtype``, ``local_files_only``). A weight
    that is not finite, in any component, is a ``ValueError`` naming the export.
    """
    import diffusers

    from erase.export.formats import DENOISERS, LORA_NAME, SINGLE_FILE_NAME, delta_name

    folder, config = _config(path)
    recorded = config.get("base_model") if isinstance(config.get("base_model"), dict) else {}
    if base is not None:  # the digests stay: the base given must hold the weights the export was made from
        config["base_model"] = {"path": str(base), "weights_sha256": recorded.get("weights_sha256")}
        config["pretrained_model_name_or_path"] = str(base)
    elif recorded.get("path") and not Path(recorded["path"]).expanduser().is_dir():
        raise ValueError(f"the base model of {folder} was the local folder {recorded['path']!r} on the machine that made the "
                         "export (its full path stays in that machine's erase_local.json); pass base=\"path/to/that/model\"")
    export = config.get("export") or {}
    denoiser = export.get("denoiser", "unet")  # exports before transformer families held a UNet
    if denoiser not in DENOISERS:
        raise ValueError(f"{folder / 'erase_config.json'} names denoiser {denoiser!r}; allowed: {', '.join(DENOISERS)}")
    denoiser_cls = getattr(diffusers, export.get("denoiser_class") or ("UNet2DConditionModel" if denoiser == "unet" else ""), None)
    delta = delta_name(denoiser)
    has = {"diffusers": (folder / denoiser / "config.json").is_file() or (folder / "model_index.json").is_file(),
           "single_file": (folder / SINGLE_FILE_NAME).is_file(), "lora": (folder / LORA_NAME).is_file(),
           "delta": (folder / delta).is_file()}
    parts = {"diffusers": f"{denoiser}/", "single_file": SINGLE_FILE_NAME, "lora": LORA_NAME, "delta": delta}
    present = ", ".join(f for f, ok in has.items() if ok) or "none"
    listed = [f for f in export.get("formats") or [] if f in has]
    if format is None:
        format = next((f for f in ORDER if has[f]), None)
        if format is None:
            raise ValueError(f"{folder} holds no export ({denoiser}/, {SINGLE_FILE_NAME}, {LORA_NAME} or {delta})")
        lost = [f for f in listed if not has[f] and ORDER.index(f) < ORDER.index(format)]
        if lost:  # a shared subset (the LoRA and the record) is fine, but never a quiet change of format
            logger.warning("%s: its erase_config.json lists the %s export but %s is missing (a copy of part of the "
                           "folder?); loading its %s export instead (format= chooses; python -m erase.export %s "
                           "--export_format %s rebuilds it)", folder, lost[0], parts[lost[0]], format, folder, lost[0])
    elif format not in has:
        raise ValueError(f"format {format!r} is not one of diffusers, single_file, lora, delta")
    elif not has[format]:
        why = f" (its erase_config.json lists it: {parts[format]} is missing)" if format in listed else ""
        raise ValueError(f"{folder} has no {format} export{why}; it has {present}")
    if format != "single_file" and not (format == "diffusers" and (folder / "model_index.json").is_file()):
        from erase.export.folder import check_base_weights

        check_base_weights(config.get("base_model") or {}, skip=(denoiser,) if format == "diffusers" else ())
    file = {"single_file": SINGLE_FILE_NAME, "lora": LORA_NAME, "delta": delta}.get(format)
    if file is not None:  # the file itself: a NaN a loader would drop or fold into a scale (a LoRA's alpha) is still a broken file
        from safetensors import safe_open

        from erase.export.formats import check_readable
        from erase.utils.checks import check_weights

        check_readable(folder / file)  # a file cut short: one line, not the reader's traceback
        with safe_open(str(folder / file), "pt") as f:
            check_weights(((k, f.get_tensor(k)) for k in f.keys()), f"{folder / file}", "; re-export the model")
    return _finite(_load(folder, format, config, export, denoiser, denoiser_cls, kwargs), folder, format)


def _finite(pipe, folder: Path, format: str):
    """``pipe`` when every weight of every component is finite; else one line naming the export and the component (a
    NaN weight draws black images that an audit would call clean)."""
    import torch

    from erase.utils.checks import check_weights

    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module):
            check_weights(part.state_dict().items(), f"the {name} of the {format} export {folder}",
                          "; re-export the model (or check its base model's files)")
    return pipe


def _load(folder: Path, format: str, config: dict, export: dict, denoiser: str, denoiser_cls, kwargs: dict):
    import diffusers
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from erase.export.formats import LORA_NAME, SINGLE_FILE_NAME, base_kwargs, delta_name

    delta = delta_name(denoiser)
    base, base_kw = base_kwargs(config)
    if format == "diffusers" and (folder / "model_index.json").is_file():
        return DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    if format == "single_file":
        cls_name = ((export.get("details") or {}).get("single_file") or {}).get("pipeline_class", "StableDiffusionPipeline")
        return getattr(diffusers, cls_name).from_single_file(str(folder / SINGLE_FILE_NAME), config=base, **kwargs)
    if format == "diffusers":
        if denoiser_cls is None:
            raise ValueError(f"{folder / 'erase_config.json'} names no loadable denoiser class ({export.get('denoiser_class')!r})")
        model = denoiser_cls.from_pretrained(str(folder), subfolder=denoiser, torch_dtype=kwargs.get("torch_dtype"))
        return DiffusionPipeline.from_pretrained(base, **{denoiser: model}, **base_kw, **kwargs)
    pipe = DiffusionPipeline.from_pretrained(base, **base_kw, **kwargs)
    if format == "lora":
        pipe.load_lora_weights(str(folder), weight_name=LORA_NAME)
        return pipe
    module = getattr(pipe, denoiser)
    state = module.state_dict()
    module.load_state_dict({k: v.to(state[k].dtype) for k, v in load_file(str(folder / delta)).items()}, strict=False)
    return pipe
