"""Small helpers shared by the eval modules: atomic writes, settings hashing, image listing, user errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger("eval")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Files the eval tools write next to images; never treated as inputs.
SIDECAR_NAMES = ("generation.json",)


class UserError(SystemExit):
    """A bad value from the user: one clear line, non-zero exit, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


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
