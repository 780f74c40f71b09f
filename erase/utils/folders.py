"""Output folders and swaps every command shares (docs/RELIABILITY.md).

* Output folders (:func:`claim_output_dir`): a run writes only into a folder that is new, empty or marked as this
  tool's (``scissorhands-erase.json``; ``--overwrite`` for a foreign one), and then only by the same command that
  wrote it (an attack never writes into an audit's folder: :func:`erase.utils.markers.other_command`); never into ``/``, ``$HOME`` or a
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
from erase.utils.markers import (  # noqa: F401  (re-exported: the names callers know from here)
    LOCK_NAME, MARKER_NAME, TOOL, _write_json, is_our_checkpoint, is_ours, mark_ours, other_command, written_by)

logger = logging.getLogger(__name__)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


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

    def __init__(self, path: Path, fd: int | None, created: Path | None = None, marked: bool = False):
        self.path, self._fd = path, fd
        self._created, self._marked = created, marked

    def release(self) -> None:
        """Unlock; a folder the run left holding nothing but the marker it added (bad input found after the claim)
        goes back to how it was: the marker removed, and the folders the claim created too."""
        if self._fd is None:
            return
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            if self._marked and {p.name for p in self.path.iterdir()} == {MARKER_NAME}:
                (self.path / MARKER_NAME).unlink()
                folder = self.path
                while self._created is not None and _inside(folder, self._created):
                    folder.rmdir()  # only ever empty: it holds nothing but what was removed
                    folder = folder.parent
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _lock_info(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _open_lock(path: Path, flag: str, folder: Path, mode: int) -> int:
    """``path`` opened without following a link (a lock that points elsewhere would truncate its target) and
    without blocking (a FIFO); anything but a regular file is one line."""
    what = f"{flag} {folder}: its lock {LOCK_NAME}"
    try:
        fd = os.open(path, mode | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise UserError(f"{what} is a symbolic link; remove it (a run never writes through a link)") from None
        if e.errno in (errno.EISDIR, errno.ENXIO):
            raise UserError(f"{what} is not a regular file; remove it") from None
        raise UserError(f"{flag} {folder} is not writable ({e.strerror}); choose a folder you can write to") from None
    import stat

    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{what} is not a regular file; remove it")
    return fd


def _in_use(fd: int, flag: str, folder: Path) -> UserError:
    held = _lock_info(fd)
    os.close(fd)
    return UserError(f"{flag} {folder} is in use by another run (pid {held.get('pid', '?')} on {held.get('host', '?')}, "
                     f"started {held.get('started', '?')}); wait for it or choose another folder")


def probe_lock(folder: Path, flag: str = "--output_dir") -> None:
    """What taking the lock would say, without taking it (``--check``): a folder in use by a live run, or a lock
    path that is a link or not a file, is one line."""
    import fcntl

    path = folder / LOCK_NAME
    if not (path.exists() or path.is_symlink()):
        return
    fd = _open_lock(path, flag, folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(fd, flag, folder) from None
    except OSError:
        pass
    os.close(fd)


def _take_lock(folder: Path, flag: str) -> int:
    """An exclusive ``flock`` on ``folder/LOCK_NAME`` that holds until release or process death."""
    import fcntl

    path = folder / LOCK_NAME
    for _ in range(5):
        fd = _open_lock(path, flag, folder, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(fd, flag, folder) from None
        except OSError:  # a file system without flock: fall back to the pid in the file
            held = _lock_info(fd)
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
        old = _lock_info(fd)
        if old.get("pid") not in (None, os.getpid()):
            logger.warning("taking over the lock of %s left by pid %s, which is no longer running", folder, old.get("pid"))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now().isoformat(timespec="seconds"),
                             "command": " ".join(sys.argv)[:500]}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return fd
    raise UserError(f"{flag} {folder}: could not take its lock file {LOCK_NAME}")


def hub_cache_folders(base: str | None) -> list[tuple[Path, str]]:
    """The hub cache's folders a run must never write into, with what they are: the cache root, and the cached
    repository of ``base`` when it is a hub id (its snapshots are the base model itself)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return []
    root = Path(constants.HF_HUB_CACHE).expanduser().resolve()
    found = [(root, "the model hub's cache")]
    if base and not Path(base).expanduser().exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(base)):
        found.insert(0, (root / ("models--" + str(base).replace("/", "--")), f"the cached base model {base}"))
    return found


def _writable(folder: Path) -> str | None:
    """Why a run could not write into ``folder`` (or create it), or None; read-only probe."""
    probe = folder
    while not probe.exists():
        if probe.is_symlink() or probe == probe.parent:  # a dangling link, or nothing exists up to the root
            return "it cannot be created"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return "it is read-only" if probe == folder else f"{probe} is read-only"
    return None


def check_output_dir(path, *, flag: str = "--output_dir", base: str | None = None, overwrite: bool = False,
                     probe: bool = False, by: str | None = None, base_what: str = "the base model") -> Path:
    """The resolved folder if a run may write there (read-only checks, no side effect); else a one-line error.

    Refused: ``/``, ``$HOME`` or a folder above it; a folder that is, holds or lies inside ``base`` (a local base
    model folder, or a hub id's cached repository; an audit's ``base`` is the audited model, ``base_what`` names it)
    or the hub cache; a path that is a file; a folder that cannot be
    written; a non-empty folder this tool did not write, or (``by`` given) that another command of it wrote (an
    audit's folder for an attack), unless ``overwrite``. ``probe`` (``--check``) also says
    what taking the lock would (a folder in use, a lock that is a link).
    """
    if path is None or str(path).strip() == "":
        raise UserError(f"{flag} is empty; give a folder")
    folder = Path(path).expanduser().resolve()
    home = Path.home().resolve()
    if folder == Path(folder.anchor) or folder == home or folder in home.parents:
        what = "the file system root" if folder == Path(folder.anchor) else "your home folder" if folder == home else "a folder that holds your home folder"
        raise UserError(f"{flag} {path} is {what}; give a dedicated folder (e.g. {flag} ./erased-model)")
    protected = hub_cache_folders(base)
    if base is not None and Path(base).expanduser().exists():
        protected.insert(0, (Path(base).expanduser().resolve(), f"{base_what} folder"))
    for b, what in protected:
        if _inside(folder, b) or _inside(b, folder):
            rel = "is" if folder == b else "lies inside" if _inside(folder, b) else "holds"
            raise UserError(f"{flag} {path} {rel} {what} {b}; writing there would overwrite {base_what}. "
                            "Choose a folder outside it")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder")
    problem = _writable(folder)
    if problem:
        raise UserError(f"{flag} {path} is not writable ({problem}); choose a folder you can write to")
    if folder.is_dir() and not overwrite:
        try:
            entries = sorted(p.name for p in folder.iterdir())
        except OSError as e:
            raise UserError(f"{flag} {path} cannot be read ({e.strerror})") from None
        if entries and not is_ours(folder):
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise UserError(f"{flag} {path} holds files this tool did not write ({shown}); choose a new or empty "
                            "folder, or pass --overwrite to write into it (only the entries the run writes are replaced)")
        owner = other_command(folder, by) if entries else None
        if owner is not None:
            raise UserError(f"{flag} {path} holds the output of {owner}, not of {by}; {by} would replace its results. "
                            "Choose a new or empty folder, or pass --overwrite to write into it anyway")
    if probe and folder.is_dir():
        probe_lock(folder, flag)
    return folder


def claim_output_dir(path, *, flag: str = "--output_dir", base: str | None = None, overwrite: bool = False,
                     by: str = TOOL, base_what: str = "the base model") -> Claim:
    """:func:`check_output_dir`, then create the folder, lock it for this run, finish or undo what a killed run's
    export swap left (:func:`recover_swaps`) and mark it as this tool's.

    Every failure (a path that cannot be created: ``/proc/x``, a read-only mount; a folder in use) is one line.
    """
    folder = check_output_dir(path, flag=flag, base=base, overwrite=overwrite, by=by, base_what=base_what)
    created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)  # the topmost new one
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be created ({e.strerror}); choose a folder you can write to") from None
    fd = _take_lock(folder, flag)
    recover_swaps(folder)
    marker = folder / MARKER_NAME
    marked = not marker.exists()
    if marked:
        try:
            mark_ours(folder, by)  # no timestamp: identical runs leave identical folders
        except OSError as e:
            os.close(fd)
            raise UserError(f"{flag} {path} is not writable ({e.strerror})") from None
    return Claim(folder, fd, created=created, marked=marked)


@contextlib.contextmanager
def hold_output_dir(path, **kwargs):
    """:func:`claim_output_dir` on the main process (rank 0 of any launcher; None elsewhere) for a ``with`` block."""
    claim = claim_output_dir(path, **kwargs) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        yield claim
    finally:
        if claim is not None:
            claim.release()


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


MANIFEST = ".swap.json"  # in a stage or an in-folder trash while a swap runs: what the new export is


def swap_in(target: Path, staged: Path, replaces: set[str], keep_last: tuple[str, ...] = ()) -> None:
    """Make ``staged`` (a complete new export) the content of ``target`` in one step.

    Entries of ``target`` named in ``replaces`` (the previous export) or in ``staged`` are dropped; every other
    entry (checkpoints, data, the lock, the user's files) is carried over. Beside the target, the two folders are
    exchanged by one ``renameat2`` (a crash leaves the old or the new folder in place, whole); inside it (a parent
    we cannot write, a mount point) the entries are moved, the ``keep_last`` files a loader looks for removed
    first and moved last, so the folder never looks complete while it is not. A manifest written before the first
    move lets :func:`recover_swaps` finish or undo a swap whose process was killed.
    """
    new_names = {p.name for p in staged.iterdir()}
    drop = set(replaces) | new_names
    record = {"export": sorted(new_names), "drop": sorted(drop), "keep_last": list(keep_last)}
    if staged.parent == target.parent:
        _write_json(staged / MANIFEST, record)
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
            (staged / MANIFEST).unlink(missing_ok=True)
            raise
        (target / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(staged)  # now the previous export, alone
        return
    trash = target / temp_name("old")
    trash.mkdir()
    _write_json(trash / MANIFEST, record)
    _move_inside(target, staged, trash, record)


def _move_inside(target: Path, staged: Path, trash: Path, record: dict) -> None:
    """The in-folder swap (or the rest of a killed one): the old export's entries into ``trash`` unless a new entry
    has already moved, then the new ones from ``staged``, ``keep_last`` first out and last in."""
    keep_last, new_names, drop = record["keep_last"], set(record["export"]), set(record["drop"])
    left = {p.name for p in staged.iterdir()}
    if left >= new_names:  # no new entry moved yet: (finish) moving the old export out
        present = [n for n in keep_last if n in drop and ((target / n).exists() or (target / n).is_symlink())]
        for name in present + sorted(drop - set(present)):
            p = target / name
            if name not in (trash.name, staged.name) and (p.exists() or p.is_symlink()):
                p.rename(trash / name)
    last = [n for n in keep_last if n in left]
    for name in sorted(left - set(last) - {MANIFEST}) + last:
        (staged / name).rename(target / name)
    staged.rmdir()
    shutil.rmtree(trash)


def _dead_stage(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and stale_temp(path)


def recover_swaps(folder: Path) -> list[str]:
    """Finish or undo what a process killed during an export swap left, before anything reads ``folder`` (run under
    its lock, before checkpoints are resolved). Returns what was done (also logged).

    Beside ``folder`` (``.NAME.new.PID.tmp``): what the stage had carried (checkpoints, data, files) goes back, all of
    it where the folder was left with nothing (two-rename platforms); a stage with no carried entry (half built, or
    the old export after an exchange) is removed. Inside (``.export.PID.tmp`` / ``.old.PID.tmp``): a swap that had
    started is finished, a half-built stage is removed."""
    done = []
    name = re.escape(folder.name)
    try:  # not glob: a folder name may hold [ or *
        beside = sorted(p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.") and p.name.endswith(".tmp"))
    except OSError:
        beside = []
    for stage in beside:
        m = re.fullmatch(rf"\.{name}\.(new|old)\.\d+\.tmp", stage.name)
        if not m or not _dead_stage(stage):
            continue
        manifest = _read_manifest(stage / MANIFEST)
        if manifest is not None:  # a folder left with no entry of its own (killed between two renames) takes all
            empty = not folder.exists() or {p.name for p in folder.iterdir()} <= {LOCK_NAME, MARKER_NAME}
            export = {MANIFEST} | (set() if empty else set(manifest["export"]))
            folder.mkdir(exist_ok=True)
            for entry in sorted(stage.iterdir(), key=lambda e: (e.name in manifest["keep_last"], e.name)):
                if entry.name in export:
                    continue
                if not (folder / entry.name).exists() and not (folder / entry.name).is_symlink():
                    entry.rename(folder / entry.name)
                    done.append(f"moved {entry.name} back from {stage.name}")
                elif entry.name in (LOCK_NAME, MARKER_NAME):
                    entry.unlink()
            rest = {e.name for e in stage.iterdir()} - export
            if rest:
                logger.warning("%s was left by an interrupted export and holds %s, which %s also has; move back "
                               "what you need, then delete it", stage, ", ".join(sorted(rest)), folder)
                continue
        elif any(e.name == LOCK_NAME or re.fullmatch(r"checkpoint-\d+", e.name) for e in stage.iterdir()):
            continue  # an older version's stage with carried entries: erase.export.folder names it
        shutil.rmtree(stage, ignore_errors=True)
        done.append(f"removed {stage.name}")
    if folder.is_dir():
        stages = {m.group(1): p for p in folder.glob(".*.tmp")
                  if (m := re.fullmatch(r"\.(export|old)\.\d+\.tmp", p.name)) and _dead_stage(p)}
        trash, staged = stages.get("old"), stages.get("export")
        manifest = _read_manifest(trash / MANIFEST) if trash else None
        if trash and staged and manifest:
            _move_inside(folder, staged, trash, manifest)
            done.append("finished an interrupted export swap inside the folder")
        else:
            for p in filter(None, (trash, staged)):
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name}")
        (folder / MANIFEST).unlink(missing_ok=True)
    for line in done:
        logger.warning("%s: %s (an interrupted export)", folder, line)
    return done


def _read_manifest(path: Path) -> dict | None:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and all(isinstance(m.get(k), list) for k in ("export", "drop", "keep_last"))
    return m if ok and all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..") for k in ("export", "drop", "keep_last")
                           for n in m[k]) else None
