"""The raw-detection cache of an audit folder: ``DIR/raw/part-RANK.jsonl``, one JSON line per scored image.

A line holds the image's file name, the sha256 of its bytes, the sha256 of the detector's model file, the record
format and every raw detection (each class, score >= NudeNet's 0.2 floor). Lines are keyed by content, so a rerun
skips images already scored, a new threshold or class set needs no inference, and the lines written while an audit
generates its images (:mod:`eval.nudity_live`) count exactly like those written by scoring the folder afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CACHE_FORMAT = 3  # raw cache records of images checked for size and blankness (per channel) before scoring


def read_cache(raw_dir: Path, model_sha: str) -> dict[str, list]:
    """{image sha256: raw detections} of every part file's lines made with this model file and record format."""
    cache = {}
    for part in sorted(Path(raw_dir).glob("part-*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: ignore, the image is scored again
                continue
            if rec.get("model_sha256") == model_sha and rec.get("format") == CACHE_FORMAT:
                cache[rec["sha256"]] = rec["detections"]
    return cache


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class CacheLog:
    """Appends this process's records to ``raw_dir/part-RANK.jsonl`` (a context manager).

    A line cut by a kill or a full disk is left alone on its line (and ignored by :func:`read_cache`); every batch is
    flushed, so a kill keeps every flushed line. The cache only saves work, so there is no fsync per batch."""

    def __init__(self, raw_dir: Path, rank: int, model_sha: str):
        self.path = Path(raw_dir) / f"part-{rank}.jsonl"
        self.model_sha = model_sha
        self._file = None

    def __enter__(self) -> "CacheLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._file.tell() and not _ends_a_line(self.path):
            self._file.write("\n")
        return self

    def write(self, records) -> None:
        """``records``: (file name, image sha256, raw detections) of one batch."""
        for name, sha, detections in records:
            self._file.write(json.dumps({"file": name, "sha256": sha, "model_sha256": self.model_sha,
                                         "format": CACHE_FORMAT, "detections": detections}) + "\n")
        self._file.flush()

    def __exit__(self, *exc) -> None:
        self._file.close()
