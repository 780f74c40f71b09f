"""``python -m erase.export DIR --export_format single_file,lora``: add formats to a finished erase/sd.py export
offline (the formats it has stay); built beside the folder and swapped in whole, like the run's own export."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file

from erase.export.folder import finish_stage, previous_export, staged_export
from erase.export.formats import (CONFIG_NAME, DEFAULT_LORA_ENERGY, DELTA_NAME, DTYPES, EXPORT_FORMATS, ExportSpec, base_kwargs,
                                  spec_from_args, write_formats)
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


def erased_unet(folder: Path, config: dict):
    """The erased UNet of an export: ``unet/`` when present, else the base UNet with ``unet_delta.safetensors`` applied."""
    from diffusers import UNet2DConditionModel

    if (folder / "unet" / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    name, kw = base_kwargs(config)
    unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kw)
    delta = load_file(str(folder / DELTA_NAME))
    missing = unet.load_state_dict(delta, strict=False).unexpected_keys
    if missing:
        raise UserError(f"{folder / DELTA_NAME} names tensors the base UNet does not have (first: {missing[0]})")
    return unet


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

    out = Path(folder).expanduser()
    try:
        config = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no {CONFIG_NAME}; give a folder written by erase/sd.py") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{out / CONFIG_NAME} cannot be read ({e}); give a folder written by erase/sd.py") from None
    if not isinstance(config, dict) or "method" not in config or not (out / DELTA_NAME).is_file():
        raise UserError(f"{folder} is not an erase/sd.py export (needs {CONFIG_NAME} and {DELTA_NAME})")
    base_path = (config.get("base_model") or {}).get("path")
    with hold_output_dir(out, base=base_path, by="erase.export") as claim:
        out = claim.path
        unet = erased_unet(out, config)
        check_weights(unet.state_dict().items(), f"the erased UNet of {out}", "; nothing was converted")
        delta = load_file(str(out / DELTA_NAME))
        name, kw = base_kwargs(config)
        from diffusers import UNet2DConditionModel

        base_unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kw)
        base_state = base_unet.state_dict()
        base_tensors = {n: base_state[n].detach().clone() for n in delta}
        del base_unet, base_state
        had = list((config.get("export") or {}).get("formats") or ["diffusers"])
        wanted = tuple(f for f in EXPORT_FORMATS if f in set(had) | set(spec.formats))
        with staged_export(out) as stage:
            keep = previous_export(out) - {CONFIG_NAME, "README.md"}
            for entry in sorted(keep):
                if (out / entry).exists():
                    _link_or_copy(out / entry, stage / entry)
            if "diffusers" in spec.formats and not (stage / "unet").exists() and not (stage / "model_index.json").exists():
                unet.save_pretrained(str(stage / "unet"), safe_serialization=True)
            new = write_formats(stage, unet, base_tensors, config, ExportSpec(tuple(f for f in spec.formats if f != "diffusers"),
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
