"""Output folders and swaps every command shares (docs/RELIABILITY.md).

* Output folders (:func:`claim_output_dir`): a run writes only into a folder that is new, empty or marked as this
  tool's (``scissorhands-erase.json``; ``--overwrite`` for a foreign one); never into ``/``, ``$HOME`` or a
  folder that is, holds or lies inside the base model; one run at a time per folder (``.scissorhands-erase.lock``:
  an ``flock`` held for the run, with the pid; a lock left by a dead process is taken over); writability is
  probed before any work.
* Temporaries (:func:`temp_name`, :func:`stale_temp`): hidden, per process, removable once their process is gone.
* Swaps (:func:`swap_in`): a new export is built beside its folder and exchanged with it in one rename.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from erase.utils.errors import UserError

logger = logging.getLogger(__name__)

TOOL = "scissorhands-erase"
MARKER_NAME = f"{TOOL}.json"  # visible: a user listing the folder sees who manages it
LOCK_NAME = f".{TOOL}.lock"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def is_ours(folder: Path) -> bool:
    """Whether this tool wrote ``folder``: its marker, an ``erase_config.json`` of ours, or only things of ours."""
    if (folder / MARKER_NAME).is_file():
        return True
    config = folder / "erase_config.json"
    if config.is_file():
        try:
            c = json.loads(config.read_text(encoding="utf-8"))
            if isinstance(c, dict) and "pretrained_model_name_or_path" in c and "method" in c:
                return True
        except (OSError, ValueError):
            pass
    entries = [p for p in folder.iterdir()]
    return bool(entries) and all(p.name == LOCK_NAME or is_our_checkpoint(p) for p in entries)


def is_our_checkpoint(path: Path) -> bool:
    """A ``checkpoint-N`` folder written by the engine (it holds ``erase_state.json``)."""
    return path.is_dir() and re.fullmatch(r"checkpoint-\d+", path.name) is not None and (path / "erase_state.json").is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


class Claim:
    """A folder this process holds for one run: release it (or use ``with``) when the run ends."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _lock_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _take_lock(folder: Path, flag: str) -> int:
    """An exclusive ``flock`` on ``folder/LOCK_NAME`` that holds until release or process death."""
    import fcntl

    path = folder / LOCK_NAME
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{flag} {folder} is not writable ({e.strerror}); choose a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            held = _lock_info(path)
            raise UserError(f"{flag} {folder} is in use by another run (pid {held.get('pid', '?')} on "
                            f"{held.get('host', '?')}, started {held.get('started', '?')}); wait for it or choose "
                            "another folder") from None
        except OSError:  # a file system without flock: fall back to the pid in the file
            held = _lock_info(path)
            pid = held.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and held.get("host") == socket.gethostname() and _pid_alive(pid):
                os.close(fd)
                raise UserError(f"{flag} {folder} is in use by another run (pid {pid}); wait for it or choose another folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (and removed) the file between our open and our lock: retry
            os.close(fd)
            continue
        old = _lock_info(path)
        if old.get("pid") not in (None, os.getpid()):
            logger.warning("taking over the lock of %s left by pid %s, which is no longer running", folder, old.get("pid"))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now().isoformat(timespec="seconds"),
                             "command": " ".join(sys.argv)[:500]}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return fd
    raise UserError(f"{flag} {folder}: could not take its lock file {LOCK_NAME}")


def check_output_dir(path, *, flag: str = "--output_dir", base: str | None = None, overwrite: bool = False) -> Path:
    """The resolved folder if a run may write there (read-only checks, no side effect); else a one-line error.

    Refused: ``/``, ``$HOME`` or a folder above it; a folder that is, holds or lies inside ``base`` (a local base
    model folder); a path that is a file; a non-empty folder this tool did not write, unless ``overwrite``.
    """
    if path is None or str(path).strip() == "":
        raise UserError(f"{flag} is empty; give a folder")
    folder = Path(path).expanduser().resolve()
    home = Path.home().resolve()
    if folder == Path(folder.anchor) or folder == home or folder in home.parents:
        what = "the file system root" if folder == Path(folder.anchor) else "your home folder" if folder == home else "a folder that holds your home folder"
        raise UserError(f"{flag} {path} is {what}; give a dedicated folder (e.g. {flag} ./erased-model)")
    if base is not None and Path(base).expanduser().exists():
        b = Path(base).expanduser().resolve()
        if _inside(folder, b) or _inside(b, folder):
            rel = "is" if folder == b else "lies inside" if _inside(folder, b) else "holds"
            raise UserError(f"{flag} {path} {rel} the base model folder {b}; writing there would overwrite the base model. "
                            "Choose a folder outside it")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder")
    if folder.is_dir() and not overwrite:
        try:
            entries = sorted(p.name for p in folder.iterdir())
        except OSError as e:
            raise UserError(f"{flag} {path} cannot be read ({e.strerror})") from None
        if entries and not is_ours(folder):
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise UserError(f"{flag} {path} holds files this tool did not write ({shown}); choose a new or empty "
                            "folder, or pass --overwrite to write into it (only the entries the run writes are replaced)")
    return folder


def claim_output_dir(path, *, flag: str = "--output_dir", base: str | None = None, overwrite: bool = False,
                     by: str = TOOL) -> Claim:
    """:func:`check_output_dir`, then create the folder, lock it for this run and mark it as this tool's.

    Every failure (a path that cannot be created: ``/proc/x``, a read-only mount; a folder in use) is one line.
    """
    folder = check_output_dir(path, flag=flag, base=base, overwrite=overwrite)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be created ({e.strerror}); choose a folder you can write to") from None
    fd = _take_lock(folder, flag)
    marker = folder / MARKER_NAME
    if not marker.exists():
        try:
            mark_ours(folder, by)  # no timestamp: identical runs leave identical folders
        except OSError as e:
            os.close(fd)
            raise UserError(f"{flag} {path} is not writable ({e.strerror})") from None
    return Claim(folder, fd)


@contextlib.contextmanager
def hold_output_dir(path, **kwargs):
    """:func:`claim_output_dir` on the main process (rank 0 of any launcher; None elsewhere) for a ``with`` block."""
    claim = claim_output_dir(path, **kwargs) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        yield claim
    finally:
        if claim is not None:
            claim.release()


def mark_ours(folder: Path, by: str = TOOL) -> None:
    """Write this tool's marker into ``folder`` (which it created or may write into)."""
    if not (folder / MARKER_NAME).exists():
        _write_json(folder / MARKER_NAME, {"tool": TOOL, "written_by": by, "note": "this folder was written by "
                                           "scissorhands-erase; its runs replace only what they wrote here"})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_name(name: str) -> str:
    """A per-process hidden temporary name for ``name`` (two processes never share one)."""
    return f".{name}.{os.getpid()}.tmp"


def stale_temp(path: Path) -> bool:
    """Whether the hidden temporary ``path`` (in a folder of ours) may be removed: its process (the pid before
    ``.tmp``) is no longer running, or it carries no pid (left by an older version)."""
    m = re.fullmatch(r"\..*\.(\d+)\.tmp", path.name)
    return m is None or not _pid_alive(int(m.group(1)))


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.EBUSY, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def staging_dir(target: Path) -> Path:
    """Where a new version of ``target`` is built: a hidden per-process sibling, or (when the parent is not
    writable, or is another file system) a hidden per-process folder inside ``target``."""
    beside = target.parent / temp_name(f"{target.name}.new")
    if os.access(target.parent, os.W_OK) and target.parent.stat().st_dev == target.stat().st_dev:
        return beside
    return target / temp_name("export")


def swap_in(target: Path, staged: Path, replaces: set[str], keep_last: tuple[str, ...] = ()) -> None:
    """Make ``staged`` (a complete new export) the content of ``target`` in one step.

    Entries of ``target`` named in ``replaces`` (the previous export) or in ``staged`` are dropped; every other
    entry (checkpoints, data, the lock, the user's files) is carried over. Beside the target, the two folders are
    exchanged by one ``renameat2`` (a crash leaves the old or the new folder in place, whole); inside it (a parent
    we cannot write, a mount point) the entries are moved, the ``keep_last`` files a loader looks for removed
    first and moved last, so the folder never looks complete while it is not.
    """
    new_names = {p.name for p in staged.iterdir()}
    drop = set(replaces) | new_names
    if staged.parent == target.parent:
        carried = []
        try:
            for entry in sorted(target.iterdir()):
                if entry.name not in drop:
                    entry.rename(staged / entry.name)
                    carried.append(entry.name)
            if not _exchange(staged, target):
                old = target.parent / temp_name(f"{target.name}.old")
                target.rename(old)
                try:
                    staged.rename(target)
                except BaseException:
                    old.rename(target)
                    raise
                staged = old
        except BaseException:
            for name in carried:  # put back what was carried before the failure
                if (staged / name).exists() and not (target / name).exists():
                    (staged / name).rename(target / name)
            raise
        shutil.rmtree(staged)  # now the previous export, alone
        return
    trash = target / temp_name("old")
    trash.mkdir()
    present = [n for n in keep_last if n in drop and ((target / n).exists() or (target / n).is_symlink())]
    for name in present + sorted(drop - set(present)):
        p = target / name
        if name not in (trash.name, staged.name) and (p.exists() or p.is_symlink()):
            p.rename(trash / name)
    last = [n for n in keep_last if n in new_names]
    for name in sorted(new_names - set(last)) + last:
        (staged / name).rename(target / name)
    staged.rmdir()
    shutil.rmtree(trash)
