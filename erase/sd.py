#!/usr/bin/env python
"""Erase a concept from Stable Diffusion: ``accelerate launch erase/sd.py --concept nudity``.

The command line over the library: its flags are the fields of the run's config (erase/diffusion/config.py) and the
registered methods' options (erase/core/options.py); :func:`parse_args` builds and validates an
:class:`erase.diffusion.config.EraseConfig`, :func:`main` runs it (erase/diffusion/run.py: load, data, conditioning,
adapter, engine, record and export; docs/ARCHITECTURE.md). Also runs as ``python -m erase.sd``.
"""

import sys
from pathlib import Path

if not __package__:  # `accelerate launch erase/sd.py` puts erase/ first on sys.path: use the repository root instead
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

from types import SimpleNamespace  # noqa: E402

from erase.core import available_methods  # noqa: E402
from erase.core.options import add_method_options  # noqa: E402
from erase.diffusion.config import EraseConfig, add_config_arguments  # noqa: E402
from erase.diffusion.families import FAMILIES  # noqa: E402
from erase.diffusion.validate import DEFAULT_FORGET_BOUND, SD_DEFAULTS, is_local  # noqa: E402
from erase.utils.errors import OneLineParser, UserError, cli_errors  # noqa: E402
from prompts import list_concepts, load_concept  # noqa: E402

__all__ = ["DEFAULT_FORGET_BOUND", "build_parser", "main", "parse_args"]


def build_parser() -> OneLineParser:
    """The flags: one per config field (in its section), the commands, then each method's options under its heading."""
    parser = OneLineParser(prog="erase/sd.py", description="Erase a concept from a Stable Diffusion UNet (Scissorhands and baselines).")
    add_config_arguments(parser, tuple(FAMILIES))
    commands = parser.add_argument_group("commands")
    commands.add_argument("--list_concepts", action="store_true", help="Print the concept presets and exit.")
    commands.add_argument("--list_targets", action="store_true",
                          help="Print the UNet parameters that --targets / --exclude select (from the config alone, no weights loaded) and exit.")
    commands.add_argument("--check", action="store_true",
                          help="Check every flag, folder and image, then exit without loading a model (run it before `accelerate launch`).")
    methods = sorted(available_methods("diffusion"), key=lambda m: m != "scissorhands")  # Scissorhands' heading first
    add_method_options(parser, "diffusion", methods, defaults={"scissorhands": {
        **SD_DEFAULTS, "forget_loss": "redirect (ascent without an anchor)", "forget_bound": DEFAULT_FORGET_BOUND}})
    return parser


@cli_errors
def parse_args(input_args=None) -> EraseConfig:
    """Parse the flags into a validated :class:`EraseConfig` (a bad value: one line, exit 2). With ``--list_concepts``
    or ``--list_targets`` the config is returned unvalidated: those commands read only the model and the targets."""
    parser = build_parser()
    ns = parser.parse_args(input_args)
    config = EraseConfig.from_namespace(ns)
    config.cli = SimpleNamespace(list_concepts=ns.list_concepts, list_targets=ns.list_targets, check=ns.check)
    if ns.list_concepts or ns.list_targets:
        return config
    try:
        config.validate()
    except UserError as e:
        parser.error(str(e))
    return config


def print_concepts() -> None:
    for name in list_concepts():
        c = load_concept(name)
        print(f"{name:16s} {c.category:8s} {len(c.forget_prompts):3d} forget / {len(c.retain_prompts):3d} retain prompts  {c.description}")


def print_targets(config: EraseConfig) -> dict:
    from erase.diffusion.load import list_targets

    info = list_targets(config)
    print(f"# model family: {info['model_family']} ({info['family_title']}, {info['pipeline_class']})")
    for name, shape in info["tensors"].items():
        print(f"{name}\t{tuple(shape)}")
    total, o = info["total_parameters"], config.objective
    print(f"# {info['num_tensors']} tensors, {info['num_parameters']:,} of {total:,} parameters "
          f"({100 * info['num_parameters'] / total:.2f}%) selected by --targets {o.targets!r} --exclude {o.exclude!r}")
    return info


@cli_errors
def main(config: EraseConfig):
    """Run the command the config carries: list the presets or the targets, check, or erase (returns the output folder)."""
    from erase.diffusion.run import erase, preflight

    cli = getattr(config, "cli", None) or SimpleNamespace(list_concepts=False, list_targets=False, check=False)
    if cli.list_concepts:
        print_concepts()
        return None
    if cli.list_targets:
        return print_targets(config)
    if cli.check:
        user_images = preflight(config, probe=True)
        if is_local(config.model.pretrained_model_name_or_path):  # what --targets / --exclude select, from the config
            from erase.diffusion.load import list_targets

            list_targets(config)
        print(f"ok: {config.method} on {config.concept_set.name!r} would write to {Path(config.output.output_dir).resolve()}"
              + "".join(f"; {k} images: {len(v.files)}" for k, v in user_images.items()))
        return None
    return erase(config).output_dir


if __name__ == "__main__":
    main(parse_args())
