"""Safe reading of user image folders: every file checked up front, each bad one named, a pixel limit before decoding.

A file is usable when it is a regular file inside the folder (a symlink may not lead out of it), its header names
an image of at most :data:`MAX_PIXELS` pixels (checked before any pixel is decoded: a 48 KB PNG can claim
20000 x 20000 pixels, 1.2 GB decoded) and, when ``decode`` is asked, it decodes completely (no truncation).
Caption sidecars (``x.txt`` beside ``x.png``) are UTF-8 text of at most :data:`MAX_CAPTION_BYTES`.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from erase.utils.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Files the eval tools write next to images; never treated as inputs.
SIDECAR_NAMES = ("generation.json",)
MAX_PIXELS = 8192 * 8192  # 64 Mpx: far above any training or audit image, far below a decompression bomb
MAX_CAPTION_BYTES = 64 * 1024


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
        real = _resolved(p) if p.is_symlink() else p
        if real is None:
            skipped.append({"file": p.name, "reason": "symlink loop (a link that leads back to itself)"})
            continue
        if p.is_symlink() and root not in real.parents:  # never read outside the folder
            skipped.append({"file": p.name, "reason": "symlink leading out of the folder"})
            continue
        if not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        else:
            skipped.append({"file": p.name, "reason": "not an image file"})
    return images, skipped


def _resolved(path: Path) -> Path | None:
    """Where ``path`` leads, or None for a symlink loop (Python raises RuntimeError or OSError for one)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return None


def _open_header(source):
    """A lazily opened PIL image (header parsed, no pixel decoded)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def header_problem(source, max_pixels: int = MAX_PIXELS, decode: bool = False) -> str | None:
    """Why ``source`` (a path or bytes) is not a usable image, or None. Reads the header first; decodes only
    when ``decode`` and the size is within ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        im = _open_header(source)
    except Image.DecompressionBombError:
        return f"too many pixels for its size on disk (over {max_pixels:,}; a decompression bomb?)"
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except (OSError, ValueError, SyntaxError) as e:
        return f"unreadable image ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    with im:
        w, h = im.size
        if w < 1 or h < 1:
            return f"empty image ({w}x{h} pixels)"
        if w * h > max_pixels:
            return f"{w}x{h} pixels is over the limit of {max_pixels:,}"
        if decode:
            try:
                im.load()
            except (OSError, ValueError, SyntaxError) as e:  # e.g. "image file is truncated"
                return f"unreadable image ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    return None


def scan_images(folder, decode: bool = True, max_pixels: int = MAX_PIXELS) -> tuple[list[Path], list[dict], list[dict]]:
    """(usable images, bad image files [{file, reason}], other skipped entries [{file, reason}]) of ``folder``."""
    candidates, skipped = list_inputs(folder)
    good, bad = [], []
    for path in candidates:
        problem = header_problem(path, max_pixels, decode)
        if problem:
            bad.append({"file": path.name, "reason": problem})
        else:
            good.append(path)
    moved = [s for s in skipped if s["reason"] != "not an image file"]  # e.g. a symlink leading out of the folder
    return good, bad + moved, [s for s in skipped if s["reason"] == "not an image file"]


def require_images(folder, flag: str, max_pixels: int = MAX_PIXELS) -> list[Path]:
    """Every image of a training folder, fully decodable; otherwise one line naming each bad file."""
    good, bad, _ = scan_images(folder, decode=True, max_pixels=max_pixels)
    if bad:
        shown = "; ".join(f"{b['file']}: {b['reason']}" for b in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserError(f"{flag} {folder}: {len(bad)} file(s) cannot be used ({shown}); fix or remove them")
    if not good:
        raise UserError(f"{flag} {folder}: no image files (png, jpg, jpeg, webp, bmp) found")
    return good


def read_caption(path: Path, folder) -> str | None:
    """The prompt in the sidecar ``path`` (None when there is none); a bad sidecar is one line naming it."""
    if not (path.is_file() or path.is_symlink()):
        return None
    root = Path(folder).resolve()
    real = _resolved(path)
    if real is None:
        raise UserError(f"caption {path} is a symlink loop (a link that leads back to itself); replace it with the file")
    if root not in real.parents:
        raise UserError(f"caption {path} is a symlink leading out of {folder}; copy the file into the folder")
    if not real.is_file():
        return None
    size = real.stat().st_size
    if size > MAX_CAPTION_BYTES:
        raise UserError(f"caption {path} is {size:,} bytes, over the limit of {MAX_CAPTION_BYTES:,} for one prompt")
    data = real.read_bytes()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise UserError(f"caption {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start}); "
                        "save it as UTF-8") from None
