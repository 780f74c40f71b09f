"""What the benchmark scripts check on their command lines before any work (docs/RELIABILITY.md): counts, comma-separated
lists, float flags without a range in ``erase.utils.checks.OPTION_RANGES``, the output folder or ``--json`` file, and
the grid points' ``erase/sd.py`` flags. A bad value is one :class:`erase.utils.errors.UserError` line naming it and
what is allowed (``cli_errors`` makes it exit 1); nothing is created until every check has passed.

A ``--json`` file is never written over a file the script did not write (``ours`` reads the old file's JSON), and is
written atomically (``erase.utils.files.atomic_write_json``); integer lists are
``erase.utils.checks.check_int_list``'s."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Callable, Iterable

from erase.utils.checks import Range, check_finite
from erase.utils.errors import UserError

POSITIVE = Range(0, lo_open=True)


def check_counts(args, **minimum: int) -> None:
    """Each ``args.<name>`` (an int, a list of ints, or None: not given) is an integer >= ``minimum[name]``."""
    for name, lo in minimum.items():
        value = getattr(args, name)
        for x in value if isinstance(value, (list, tuple)) else [value]:
            if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < lo):
                raise UserError(f"--{name} {x!r} is not allowed: give an integer >= {lo}")


def check_number(flag: str, value, allowed: Range = POSITIVE) -> float | None:
    """A float flag (or one item of a comma-separated list of them) that is finite, float32-sized and in ``allowed``
    (None passes): a flag without a range in ``OPTION_RANGES`` gives its own."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{flag} {value!r} is not a number (allowed: {allowed})") from None
    return check_finite(flag, value, allowed)


def name_list(flag: str, text: str, allowed: Iterable[str] | None = None, what: str = "name") -> list[str]:
    """``"a,b"`` -> ["a", "b"]: no empty entry, no repeat and, with ``allowed``, only those names."""
    allowed = list(allowed) if allowed is not None else None
    choose = f"; choose from {', '.join(allowed)}" if allowed is not None else ""
    items = [x.strip() for x in str(text).split(",")]
    if not any(items):
        raise UserError(f"{flag} is empty; give comma-separated {what}s{choose}")
    for x in items:
        if not x:
            raise UserError(f"{flag} {text!r} has an empty entry; give comma-separated {what}s{choose}")
        if allowed is not None and x not in allowed:
            raise UserError(f"{flag} {text!r}: unknown {what} {x!r}{choose}")
        if items.count(x) > 1:
            raise UserError(f"{flag} {text!r} names {x!r} twice; each {what} may appear once")
    return items


def digit_list(flag: str, text: str) -> list[int]:
    """``"seven,1"`` -> [7, 1]: digit words or numerals, none empty, none named twice (``seven,7`` included)."""
    from eval.digits.model import parse_digit

    try:
        digits = [parse_digit(d) for d in name_list(flag, text, what="digit")]
    except ValueError as e:
        raise UserError(f"{flag} {text!r}: {e}") from None
    if len(set(digits)) != len(digits):
        raise UserError(f"{flag} {text!r} names a digit twice; each may appear once")
    return digits


def _writable_place(flag: str, path: Path) -> None:
    """``path`` can be created: its nearest existing parent is a folder this user may write into."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder; give a path inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder {parent} is not writable; give another path")


def check_folder_path(flag: str, path) -> Path:
    """An output folder that is a folder or can be made (not a file, nor under one), for a script that does not claim
    it; a script that claims its folder checks it with ``erase.utils.folders.check_output_dir`` (the claim's rules)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder")
    if not path.exists():
        _writable_place(flag, path)
    return path


def check_json_output(flag: str, path, ours: Callable[[object], bool]) -> Path | None:
    """The file a script writes its JSON to (None: not asked for). It may exist only as a file this script wrote:
    ``ours(old JSON)`` says so; anything else (another file, a folder, a path under a file) is one line."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old is None or not ours(old):
            raise UserError(f"{flag} {path} exists and was not written by this tool; give a new file")
    _writable_place(flag, path)
    return path


def has_keys(*keys: str) -> Callable[[object], bool]:
    """An ``ours`` test: the old file is a JSON object with all of ``keys`` (what this script writes)."""
    return lambda old: isinstance(old, dict) and set(keys) <= old.keys()


def check_erase_flags(what: str, method: str, flags: str, concept: str = "three", model: str | None = None,
                      fixed: Iterable[str] = ()) -> list[str]:
    """A grid point's ``erase/sd.py`` flags, parsed and validated by erase/sd.py's own parser and config in this
    process (nothing is loaded or written): an unknown flag, a bad value or an option of another method is one line
    naming the point. ``model``: the base folder when it exists (its family's checks run too); ``fixed``: the flags the
    benchmark puts before the point's own. Returns the point's flags as words."""
    from erase.diffusion.config import EraseConfig
    from erase.sd import build_parser

    try:
        words = shlex.split(flags or "")
    except ValueError as e:
        raise UserError(f"{what}: cannot split its flags {flags!r} ({e})") from None
    parser = build_parser()

    def error(message):
        raise UserError(f"{what}: erase/sd.py {message}")

    parser.error = error
    base = str(Path(model).absolute()) if model and Path(model).exists() else "benchmark/base-model"  # a hub id: no family yet
    argv = ["--pretrained_model_name_or_path", base, "--concept", concept, "--method", method,
            "--output_dir", os.devnull + "/unused", *fixed, *words]
    ns = parser.parse_args(argv)
    try:
        EraseConfig.from_namespace(ns).validate()
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    return words
