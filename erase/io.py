"""Small helpers shared by erase/ and everything above it: atomic writes, settings hashing, image listing,
user errors, and the one place a command line turns a user error into a one-line exit."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Files the eval tools write next to images; never treated as inputs.
SIDECAR_NAMES = ("generation.json",)


class UserError(ValueError):
    """A bad value or input from the user, with a one-line message saying what was wrong and what is allowed.

    An ordinary exception: library code raises it and callers may catch it. Only the command lines turn it into
    ``error: <message>`` on stderr and exit status 1 (:func:`cli_errors`), so a notebook never sees ``SystemExit``.
    """


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def cli_errors(main):
    """Decorate a command line's ``main``: a :class:`UserError` (or another ``ValueError`` subclass listed by the
    library as a user-facing error, see ``USER_ERRORS``) becomes ``SystemExit("error: ...")``, one line, status 1."""
    import functools

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            message = str(e).removeprefix("error: ")
            raise SystemExit(f"error: {message}") from None

    return wrapper


# Exceptions whose message is meant for the user as it stands. Library modules append their own error classes
# (e.g. target, top-k and checkpoint errors) with ``register_user_error``.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)


def register_user_error(cls: type[BaseException]) -> type[BaseException]:
    """Class decorator: :func:`cli_errors` reports ``cls`` as a one-line error instead of a traceback."""
    global USER_ERRORS
    if cls not in USER_ERRORS:
        USER_ERRORS = USER_ERRORS + (cls,)
    return cls


def setup_logging(main_process: bool = True) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if main_process else logging.WARNING,
    )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # per-process name (the pid before .tmp): a cleanup removes only temporaries of processes that are gone
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def settings_hash(settings: dict) -> str:
    """A short stable hash of a JSON-able settings dict (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_inputs(folder: str | os.PathLike) -> tuple[list[Path], list[dict]]:
    """Files of `folder` (not recursive) split into image candidates and skipped entries with a reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    images, skipped = [], []
    root = folder.resolve()
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name in SIDECAR_NAMES:
            continue
        if p.is_symlink() and root not in p.resolve().parents:  # never read outside the folder
            skipped.append({"file": p.name, "reason": "symlink leading out of the folder"})
            continue
        if not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        else:
            skipped.append({"file": p.name, "reason": "not an image file"})
    return images, skipped


def read_json(path: str | os.PathLike, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON: {path} ({e.msg}, line {e.lineno})") from None


def make_accelerator():
    """An Accelerator that also works for multi-process CPU runs (torchrun env without CUDA -> gloo)."""
    import torch
    from accelerate import Accelerator

    multi_cpu = "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=multi_cpu)
    if multi_cpu and accelerator.num_processes > 1:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    return accelerator
