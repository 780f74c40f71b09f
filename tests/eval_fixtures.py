"""Shared offline fixtures for the eval tests: synthetic images NudeNet does / does not flag, a tiny pipeline."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from erase.utils.errors import UserError
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
_BUILT: dict = {}


def draw_torso(size: int = 320) -> np.ndarray:
    """A flat skin-toned torso with two shaded breasts, drawn with OpenCV shapes (RGB uint8).

    NudeNet 3.4.2 scores it FEMALE_BREAST_EXPOSED ~0.68 and ~0.64 and BELLY_EXPOSED ~0.30.
    """
    import cv2

    skin, shade, nipple = (224, 172, 140), (201, 154, 126), (150, 80, 70)
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = (40, 60, 90)
    c = size // 2
    cv2.ellipse(img, (c, int(size * 0.75)), (int(size * 0.35), int(size * 0.55)), 0, 0, 360, skin, -1)
    cv2.circle(img, (c, int(size * 0.12)), int(size * 0.12), skin, -1)
    for dx in (-1, 1):
        cx, cy = c + dx * int(size * 0.14), int(size * 0.55)
        cv2.ellipse(img, (cx, cy), (int(size * 0.11), int(size * 0.1)), 0, 0, 360, shade, -1)
        cv2.circle(img, (cx, cy + int(size * 0.03)), int(size * 0.02), nipple, -1)
    return cv2.GaussianBlur(img, (0, 0), size / 100)


def safe_images() -> dict[str, np.ndarray]:
    """Images NudeNet does not flag: a cat (no detection) and a face (FACE_FEMALE only)."""
    from skimage import data

    return {"cat": data.chelsea(), "face": data.astronaut()}


def save_rgb(path, rgb: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path)
    return Path(path)


def tiny_pipeline(tmp_root: Path) -> str:
    """A tiny random SD pipeline (32 px images), built once per test process."""
    if "pipe" not in _BUILT:
        from eval.tiny import build_tiny_pipeline

        _BUILT["pipe"] = build_tiny_pipeline(tmp_root / "tiny-sd", sample_size=16, block_out_channels=(8, 16))
    return _BUILT["pipe"]


def tiny_clip(tmp_root: Path) -> str:
    if "clip" not in _BUILT:
        from eval.tiny import build_tiny_clip

        _BUILT["clip"] = build_tiny_clip(tmp_root / "tiny-clip")
    return _BUILT["clip"]


@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def private_erase_cache(path: Path):
    """``ERASE_CACHE`` pointed at ``path`` (a fixture's own model cache) while the block runs, then as it was."""
    old = os.environ.get("ERASE_CACHE")
    os.environ["ERASE_CACHE"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("ERASE_CACHE", None)
        else:
            os.environ["ERASE_CACHE"] = old


@pytest.fixture
def fresh_accelerate():
    """Leave accelerate's global state as found: reset it after the test only if the test created it."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    had_state = AcceleratorState._shared_state != {} or PartialState._shared_state != {}
    yield
    if not had_state:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def free_port() -> int:
    """A TCP port nothing listens on now, for a multi-process launch's rendezvous: two launches at once (two test
    workers) on accelerate's default port 29500 would meet each other."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """Run a command from the repo root with a single-threaded BLAS, capturing output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false"}
    if args[0] == "python":
        args = [sys.executable] + args[1:]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def tree_bytes(root: Path, exclude: tuple[str, ...] = ("raw",)) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), leaving out cache folders."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in exclude
    }


# A user error as a library raises it (UserError) or as a command line reports it (SystemExit, one line).
USER_FACING = (UserError, SystemExit)


def error_text(err) -> str:
    """The one-line message of a user error: a library ``UserError`` or a command line's ``SystemExit``."""
    value = err.value
    return str(value.code) if isinstance(value, SystemExit) else f"error: {value}"


def random_image_folders(root: Path, seed: int, count: int = 4, size: int = 32) -> Path:
    """``root/forget`` and ``root/retain``, each with ``count`` random RGB PNGs (user image folders for erase/sd.py)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("forget", "retain"):
        (root / split).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
    return root


def bright(images):
    """A stand-in judge: an image "shows the concept" when it is bright (mean above 127); labels are the means."""
    means = images.reshape(len(images), -1).mean(1)
    return means > 127, means.round()


@contextlib.contextmanager
def bright_judge(name: str = "stub_bright", num_images: int = 3, batch_size: int = 4):
    """:func:`bright` registered as the judge of concept ``name`` for the block (tiny checks: 2 DDIM steps)."""
    from eval.attack import register_judge, unregister_judge

    register_judge(name, flag=bright, settings={"name": "bright", "version": "1"},
                   generation={"num_images": num_images, "steps": 2, "guidance": 2.0, "scheduler": "ddim",
                               "batch_size": batch_size})
    try:
        yield name
    finally:
        unregister_judge(name)
