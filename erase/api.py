"""Python API: ``erase_concept`` runs ``erase/sd.py`` in-process, ``load_erased`` loads any of its exports.

    from erase import erase_concept, load_erased

    unet = erase_concept("CompVis/stable-diffusion-v1-4", "nudity", output_dir="nudity-erased", max_train_steps=100)
    pipe = load_erased("nudity-erased")

There is one code path: ``erase_concept`` turns its options into the flags of ``erase/sd.py`` and calls
``parse_args(flags)`` and ``main(args)``, so every option is checked exactly as on the command line (an option the
command line does not have is a ``TypeError`` naming it and listing the allowed ones; a bad value a ``ValueError``
with the command line's one-line message). It runs in the current process under the current accelerate state.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

#: Arguments of erase_concept itself, or flags that do not run an erasure.
_RESERVED = {"pretrained_model_name_or_path", "concept", "method", "output_dir", "list_concepts", "list_targets", "check", "help"}


def allowed_options() -> list[str]:
    """The options ``erase_concept`` takes: every flag of ``erase/sd.py`` (method config fields and run options)
    except the ones it sets itself."""
    return sorted(_defaults().keys() - _RESERVED)


def _defaults() -> dict:
    """Every flag of erase/sd.py with its default (``--list_concepts`` returns the parsed flags before any check)."""
    from erase.sd import parse_args

    return vars(parse_args(["--list_concepts"]))


def _flags(options: dict, defaults: dict) -> list[str]:
    """``{"lr": 1e-3, "project": False, "export_format": ["single_file", "lora"]}`` -> CLI flags."""
    allowed = sorted(defaults.keys() - _RESERVED)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"erase_concept() got an unknown option {unknown[0]!r}; allowed: {', '.join(allowed)}")
    from erase.core import available_methods
    from erase.core.options import option_fields

    booleans = {f.name for m in available_methods("diffusion") for f, kind in option_fields(m, "diffusion") if kind is bool}
    out = []
    for name, value in options.items():
        if value is None:
            continue
        if name in booleans:  # a method's on/off option: --name / --no_name
            if not isinstance(value, bool):
                raise ValueError(f"option {name!r} is on/off: give True or False, got {value!r}")
            out.append(f"--{name}" if value else f"--no_{name}")
            continue
        if defaults[name] is False:  # a switch (store_true)
            if not isinstance(value, bool):
                raise ValueError(f"option {name!r} is a switch: give True or False, got {value!r}")
            if value:
                out.append(f"--{name}")
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out += [f"--{name}", str(value)]
    return out


def _run(flags: list[str], components=None):
    """parse_args + main of erase/sd.py; their one-line errors become ValueError. Returns (args, out_dir)."""
    from erase.sd import main, parse_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse_args(flags)
    except SystemExit as e:
        message = (err.getvalue().strip().splitlines() or [str(e.code)])[-1]
        raise ValueError(message.removeprefix("erase/sd.py: error: ")) from None
    if components is not None:
        args.components = components
    out = main.__wrapped__(args)  # the library call: a bad input is a UserError (a ValueError), never SystemExit
    return args, out


def erase_concept(pipe_or_path, concept: str | list[str], method: str = "scissorhands", output_dir: str | None = None,
                  **options):
    """Erase ``concept`` (a preset name, a list of presets, or a free-form name with ``forget_prompts=FILE``) from a
    Stable Diffusion pipeline with ``method``; returns the erased ``UNet2DConditionModel``.

    ``pipe_or_path``: a diffusers folder, a hub id, or a loaded pipeline (its components are used in-process and left
    unchanged; it must still be what its ``name_or_path`` holds, which the export records as the base). With
    ``output_dir`` the export is written there (every format of ``export_format``), else the run works in a temporary
    folder that is removed. ``options``: every flag of ``erase/sd.py`` (``allowed_options()``), e.g. ``lr=1e-3``,
    ``max_train_steps=50``, ``topk=2``, ``forget_images="dir"``, ``export_format=["diffusers", "lora"]``.
    """
    import copy

    flags = _flags(options, _defaults())
    components = None
    if isinstance(pipe_or_path, (str, Path)):
        base = str(pipe_or_path)
    else:
        pipe = pipe_or_path
        base = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
        if not base:
            raise ValueError("the pipeline has no name_or_path (it was built in memory): save it with save_pretrained and pass the folder")
        missing = [p for p in ("vae", "unet", "scheduler") if getattr(pipe, p, None) is None]
        if missing:
            raise ValueError(f"the pipeline has no {missing[0]}; erase_concept needs a text-to-image Stable Diffusion pipeline")

        def components(family):  # called by erase/sd.py once the family is known
            # the UNet trains: a copy, so the caller's pipeline keeps its weights; the frozen parts are shared
            from diffusers import DDPMScheduler

            from erase.diffusion.families import text_from_pipeline

            return (text_from_pipeline(family, pipe), pipe.vae, copy.deepcopy(pipe.unet),
                    DDPMScheduler.from_config(pipe.scheduler.config))  # the training scheduler, as erase/sd.py builds it
    concept = ",".join(concept) if isinstance(concept, (list, tuple)) else str(concept)
    with (contextlib.nullcontext(output_dir) if output_dir is not None else tempfile.TemporaryDirectory(prefix="erase-")) as out:
        head = ["--pretrained_model_name_or_path", base, "--concept", concept, "--method", method, "--output_dir", str(out)]
        args, _ = _run(head + flags, components)
        unet = getattr(args, "erased_unet", None)
        if unet is None:
            raise RuntimeError("erase/sd.py finished without an erased UNet")
    return unet


def _config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "erase_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{folder} has no erase_config.json; give a folder written by erase/sd.py or erase_concept") from None
    if not isinstance(config, dict) or "method" not in config:
        raise ValueError(f"{folder / 'erase_config.json'} is not an erase/sd.py export record")
    return config


def load_erased(path, format: str | None = None, **kwargs):
    """A ready pipeline from an export folder: the base named in ``erase_config.json`` with the erased UNet.

    ``format``: ``diffusers`` (``unet/`` or a full pipeline), ``single_file`` (``from_single_file`` with the base's
    configs), ``lora`` (``load_lora_weights`` on the base) or ``delta`` (the base UNet with ``unet_delta.safetensors``);
    default: the first the folder has in that order. ``kwargs`` go to ``from_pretrained`` / ``from_single_file``
    (e.g. ``torch_dtype``, ``local_files_only``).
    """
    import diffusers
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from erase.export.formats import base_kwargs as _base_kwargs, LORA_NAME, SINGLE_FILE_NAME

    folder = Path(path).expanduser()
    config = _config(folder)
    export = config.get("export") or {}
    has = {"diffusers": (folder / "unet" / "config.json").is_file() or (folder / "model_index.json").is_file(),
           "single_file": (folder / SINGLE_FILE_NAME).is_file(), "lora": (folder / LORA_NAME).is_file(),
           "delta": (folder / "unet_delta.safetensors").is_file()}
    if format is None:
        format = next((f for f in ("diffusers", "single_file", "lora", "delta") if has[f]), None)
        if format is None:
            raise ValueError(f"{folder} holds no export (unet/, {SINGLE_FILE_NAME}, {LORA_NAME} or unet_delta.safetensors)")
    elif format not in has:
        raise ValueError(f"format {format!r} is not one of diffusers, single_file, lora, delta")
    elif not has[format]:
        raise ValueError(f"{folder} has no {format} export; it has {', '.join(f for f, ok in has.items() if ok) or 'none'}")
    base, base_kw = _base_kwargs(config)
    if format == "diffusers" and (folder / "model_index.json").is_file():
        return DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    if format == "single_file":
        cls_name = ((export.get("details") or {}).get("single_file") or {}).get("pipeline_class", "StableDiffusionPipeline")
        return getattr(diffusers, cls_name).from_single_file(str(folder / SINGLE_FILE_NAME), config=base, **kwargs)
    if format == "diffusers":
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=kwargs.get("torch_dtype"))
        return DiffusionPipeline.from_pretrained(base, unet=unet, **base_kw, **kwargs)
    pipe = DiffusionPipeline.from_pretrained(base, **base_kw, **kwargs)
    if format == "lora":
        pipe.load_lora_weights(str(folder), weight_name=LORA_NAME)
        return pipe
    delta = load_file(str(folder / "unet_delta.safetensors"))
    state = pipe.unet.state_dict()
    pipe.unet.load_state_dict({k: v.to(state[k].dtype) for k, v in delta.items()}, strict=False)
    return pipe
