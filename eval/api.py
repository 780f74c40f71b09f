"""``audit``: the I2P nudity audit (``python -m eval.i2p``) as one Python call, for notebooks.

    from eval import audit

    summary = audit("nudity-erased", protocol="i2p-mace", output_dir="audits/nudity-erased")
    summary = audit(pipe, protocol="i2p-sexual", output_dir="audits/my-pipe", limit=20)   # a loaded pipeline

One code path: the options become the flags of ``eval.i2p`` and go through its ``parse_args`` (same checks, same
protocol pinning), then its ``run``. Same folder, same settings: a second call resumes instead of redoing work.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile

logger = logging.getLogger(__name__)

#: Arguments ``audit`` sets itself.
_RESERVED = {"model", "output_dir", "protocol", "help"}


def allowed_options() -> list[str]:
    """The options ``audit`` takes: every flag of ``python -m eval.i2p`` except the ones it sets itself."""
    from eval.i2p import parse_args

    parser_args = vars(parse_args.__wrapped__(["--model", "m", "--output_dir", "o"]))
    return sorted(k for k in parser_args if k not in _RESERVED and k not in ("generation", "protocol_spec"))


def _flags(options: dict, allowed: list[str]) -> list[str]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"audit() got an unknown option {unknown[0]!r}; allowed: {', '.join(allowed)}")
    out = []
    for name, value in options.items():
        if value is None:
            continue
        if name in ("no_report", "overwrite"):
            if not isinstance(value, bool):
                raise ValueError(f"option {name!r} is a switch: give True or False, got {value!r}")
            out += [f"--{name}"] if value else []
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out += [f"--{name}", str(value)]
    return out


def pipeline_label(pipe) -> str:
    """The name a loaded pipeline is recorded under. Its identity is the fingerprint of all its weights, which
    generation puts in every image's resume key (``erase.diffusion.generate.weights_fingerprint``): a folder audited
    with other weights, a swapped VAE included, is never reused."""
    return f"in-memory:{type(pipe).__name__}"


def audit(pipe_or_path, protocol: str | None = None, output_dir: str | None = None, **options) -> dict:
    """Audit a model with NudeNet over I2P-style prompts and return ``summary.json`` as a dict.

    ``pipe_or_path``: a hub id, a pipeline folder, an ``erase/sd.py`` output, or a loaded pipeline.
    ``protocol``: a pinned protocol (``i2p-mace``, ``i2p-sexual``, ...; ``eval/protocols.py``) or None.
    ``options``: the flags of ``python -m eval.i2p`` (``prompts_csv``, ``limit``, ``threshold``, ``classes``, ``steps``,
    ``batch_size``, ...); an unknown one is a ``TypeError``, a bad value or one contradicting the protocol a
    ``ValueError`` with the command line's one-line message.
    """
    from eval.i2p import parse_args, run

    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="audit-")
        logger.info("audit folder: %s", output_dir)
    pipe = None if isinstance(pipe_or_path, (str, bytes)) or hasattr(pipe_or_path, "__fspath__") else pipe_or_path
    if pipe is not None and not all(hasattr(pipe, part) for part in ("unet", "vae", "scheduler")):
        raise ValueError(f"{type(pipe).__name__} is not a text-to-image diffusers pipeline (needs unet, vae, scheduler)")
    model = pipeline_label(pipe) if pipe is not None else str(pipe_or_path)
    flags = ["--model", model, "--output_dir", str(output_dir), *(["--protocol", protocol] if protocol else []),
             *_flags(options, allowed_options())]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse_args.__wrapped__(flags)  # the library parse: argparse's own errors still exit
    except SystemExit as e:
        if e.code in (0, None):
            raise
        message = (err.getvalue().strip().splitlines() or [str(e.code)])[-1]
        raise ValueError(message.split("error: ", 1)[-1]) from None
    if pipe is not None:
        pipe = _with_scheduler(pipe, args.generation.scheduler)
    return run(args, pipe=pipe)


def _with_scheduler(pipe, scheduler: str):
    """A pipeline sharing ``pipe``'s modules with the audit's sampler (the caller's pipeline is left as it was)."""
    import diffusers

    from erase.diffusion.generate import SCHEDULERS

    copy = type(pipe)(**pipe.components)
    copy.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    copy.set_progress_bar_config(disable=True)
    return copy
