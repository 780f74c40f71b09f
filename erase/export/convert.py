"""``python -m erase.export DIR --export_format single_file,lora``: add formats to a finished erase/sd.py export
offline (the formats it has stay); built beside the folder and swapped in whole, like the run's own export."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from erase.export.folder import finish_stage, previous_export, staged_export
from erase.export.local import check_export_folder, read_record
from erase.export.formats import (CONFIG_NAME, DEFAULT_LORA_ENERGY, DTYPES, EXPORT_FORMATS, ExportSpec, base_kwargs, check_readable,
                                  delta_name, load_tensors, spec_from_args, write_formats)
from erase.utils.errors import OneLineParser, UserError, cli_errors


@cli_errors
def parse_args(input_args=None):
    p = OneLineParser(prog="python -m erase.export", description="Add export formats (single file, LoRA) to a finished erase/sd.py "
                                                           "output folder; the formats it has stay.")
    p.add_argument("output_dir", help="A folder written by erase/sd.py (it holds erase_config.json).")
    p.add_argument("--export_format", default="single_file,lora",
                   help=f"Comma list of {', '.join(EXPORT_FORMATS)} to add (default: single_file,lora).")
    p.add_argument("--export_dtype", default=None, choices=tuple(DTYPES), help="dtype of the single file and the LoRA (default fp16).")
    p.add_argument("--lora_rank", type=int, default=None, help="Rank of every LoRA tensor (capped at its full rank).")
    p.add_argument("--lora_energy", type=float, default=None,
                   help=f"Share of each change's energy (squared Frobenius norm) the LoRA keeps, in (0, 1] (default {DEFAULT_LORA_ENERGY}).")
    args = p.parse_args(input_args)
    try:
        args.spec = spec_from_args(args)
    except UserError as e:
        p.error(str(e))
    return args


def denoiser_of(config: dict) -> tuple[str, type]:
    """(subfolder, diffusers class) of an export's denoiser: ``export.denoiser`` / ``denoiser_class`` in its
    ``erase_config.json``; exports from before transformer families are a UNet."""
    import diffusers

    export = config.get("export") or {}
    part = export.get("denoiser") or "unet"
    cls = export.get("denoiser_class") or ("UNet2DConditionModel" if part == "unet" else None)
    if cls is None:
        from diffusers import DiffusionPipeline

        name, kw = base_kwargs(config)
        cls = DiffusionPipeline.load_config(name, revision=kw.get("revision"))[part][1]
    return part, getattr(diffusers, cls)


def erased_denoiser(folder: Path, config: dict):
    """The erased denoiser of an export: ``unet/`` (``transformer/``) when present, else the base's with
    ``unet_delta.safetensors`` (``transformer_delta.safetensors``) applied."""
    part, cls = denoiser_of(config)
    if (folder / part / "config.json").is_file():
        return cls.from_pretrained(str(folder), subfolder=part)
    name, kw = base_kwargs(config)
    model = cls.from_pretrained(name, subfolder=part, **kw)
    delta = load_tensors(folder / delta_name(part))
    missing = model.load_state_dict(delta, strict=False).unexpected_keys
    if missing:
        raise UserError(f"{folder / delta_name(part)} names tensors the base {part} does not have (first: {missing[0]})")
    return model


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def convert(folder: str | os.PathLike, spec: ExportSpec) -> dict:
    """Add ``spec.formats`` to the export in ``folder`` (the formats it has stay); built beside and swapped in whole."""
    from erase.utils.checks import check_weights
    from erase.utils.folders import hold_output_dir

    out = check_export_folder(folder)
    config = read_record(out)  # with this machine's local paths (erase_local.json) put back
    part = ((config.get("export") or {}).get("denoiser") or "unet") if isinstance(config, dict) else "unet"
    if not isinstance(config, dict) or "method" not in config or not (out / delta_name(part)).is_file():
        raise UserError(f"{folder} is not an erase/sd.py export (needs {CONFIG_NAME} and {delta_name(part)})")
    for file in [out / delta_name(part), *sorted((out / part).glob("*.safetensors"))]:  # a file cut short: before any work
        check_readable(file)
    base_path = (config.get("base_model") or {}).get("path") or (config.get("base_model") or {}).get("hub_id")
    with hold_output_dir(out, base=base_path, by="erase.export") as claim:
        out = claim.path
        model = erased_denoiser(out, config)
        check_weights(model.state_dict().items(), f"the erased {part} of {out}", "; nothing was converted")
        delta = load_tensors(out / delta_name(part))
        name, kw = base_kwargs(config)
        base_model = denoiser_of(config)[1].from_pretrained(name, subfolder=part, **kw)
        base_state = base_model.state_dict()
        base_tensors = {n: base_state[n].detach().clone() for n in delta}
        del base_model, base_state
        had = list((config.get("export") or {}).get("formats") or ["diffusers"])
        wanted = tuple(f for f in EXPORT_FORMATS if f in set(had) | set(spec.formats))
        with staged_export(out) as stage:
            keep = previous_export(out) - {CONFIG_NAME, "README.md"}
            for entry in sorted(keep):
                if (out / entry).exists():
                    _link_or_copy(out / entry, stage / entry)
            if "diffusers" in spec.formats and not (stage / part).exists() and not (stage / "model_index.json").exists():
                model.save_pretrained(str(stage / part), safe_serialization=True)
            new = write_formats(stage, model, base_tensors, config, ExportSpec(tuple(f for f in spec.formats if f != "diffusers"),
                                                                             spec.dtype, spec.lora_rank, spec.lora_energy))
            details = {**(config.get("export") or {}).get("details", {}), **new}
            config["export"] = {**(config.get("export") or {}), "formats": list(wanted), "details": details,
                                "spec": spec.to_dict(), "converted_by": "python -m erase.export"}
            finish_stage(stage, config)
    return config["export"]


@cli_errors
def main(input_args=None) -> int:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    args = parse_args(input_args)
    record = convert(args.output_dir, args.spec)
    print(f"{args.output_dir}: formats {', '.join(record['formats'])}; files {', '.join(record['files'])}")
    return 0


if __name__ == "__main__":  # python -m erase.export.convert (python -m erase.export runs it too)
    raise SystemExit(main())
