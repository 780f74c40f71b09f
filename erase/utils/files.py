"""Files: atomic writes (a temporary name in the same folder, then one rename), settings hashes, checksums and JSON
that a user gave."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from erase.utils.errors import UserError

# the process's umask, read once: a file written atomically gets the mode a plain open() would give it (mkstemp makes
# 0600, which would hide a shared export or results file from the other users of a machine)
_UMASK = os.umask(0o022)
os.umask(_UMASK)
logger = logging.getLogger(__name__)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # per-process name (the pid before .tmp): a cleanup removes only temporaries of processes that are gone
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
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


def read_json(path: str | os.PathLike, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON: {path} ({e.msg}, line {e.lineno})") from None


@contextmanager
def build_lock(path: str | os.PathLike):
    """Held while one process builds the cache entry ``path`` (a model trained into the user's cache): an exclusive
    ``flock`` on the hidden file ``.<name>.lock`` beside it. A second process that wants the same entry waits here,
    then finds it built, instead of training it again and replacing the folder under the first one's readers. The
    kernel drops the lock when its process dies, so a killed build never blocks the next one. Without ``flock`` (not
    POSIX) nothing is locked."""
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another process is building %s; waiting for it", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build_once(path: str | os.PathLike, is_built: Callable[[], bool], build: Callable[[], Path], what: str) -> Path:
    """The cache entry ``path``: under its ``build_lock``, returned as it is when ``is_built()``, else ``build()``'s."""
    with build_lock(path):
        if is_built():
            logger.info("%s found in %s", what, path)
            return Path(path)
        return build()
