"""NudeNet detection of an audit's images while generation writes them, with no decoding.

    with LiveDetection(output_dir, accelerator) as live:
        generate(rows, images_dir, cfg, accelerator, pipe, on_saved=live)
    detect_folder(images_dir, output_dir, ...)  # finds every image scored: reads and hashes the files, decodes none

Generation's writer thread hands over each written batch: the PNG's bytes as written (their sha256 is the file's, the
raw cache's key) and the image it encoded. PNG is lossless, so the image's RGB pixels are exactly those ``cv2.imdecode``
gives for the file (as BGR), letterboxed without the channel swaps (:func:`eval.nudity.preprocess_rgb`), and the
detections are the ones scoring the file would give (tested). The records go to the audit's raw cache
(:mod:`eval.nudity_cache`), batched to the detector's batch size. What costs an audit a decode per image (a third to
a half of a forward pass on a CPU: benchmarks/RESULTS.md) is never done, and on a GPU machine the detection runs
beside the denoising. Images the hand-over cannot vouch for (not RGB, over the pixel limit, blank) are left to the
folder's scoring, which lists why it skips them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from erase.utils.images import MAX_PIXELS
from eval.nudity import default_model_path, is_blank, model_sha256, NudityDetector, preprocess_rgb
from eval.nudity_cache import CacheLog


class LiveDetection:
    """The ``on_saved`` callback of :func:`erase.diffusion.generate.generate` that scores what it is handed (a context
    manager: leaving it scores the last short batch and closes the cache file)."""

    def __init__(self, output_dir, accelerator=None, batch_size: int = 16, detector: NudityDetector | None = None):
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.local = accelerator.local_process_index if accelerator is not None else 0
        self.raw_dir = Path(output_dir) / "raw"
        self.batch_size = batch_size
        self.detector = detector  # built on the first full batch when not given (on the writer thread, beside the denoising)
        self.pending: list[tuple] = []  # (file name, sha256, preprocessed input) waiting for a full batch
        self.scored = 0
        self._log = None

    def __enter__(self) -> "LiveDetection":
        model = self.detector.model_path if self.detector is not None else default_model_path()
        self._log = CacheLog(self.raw_dir, self.rank, model_sha256(model)).__enter__()
        return self

    def __call__(self, saved) -> None:
        """``saved``: [(file name, PNG bytes as written, PIL image)] of one generated batch (the writer thread)."""
        for name, data, image in saved:
            if image.mode != "RGB" or image.width * image.height > MAX_PIXELS:
                continue  # the folder's scoring decodes it (or says why it cannot)
            rgb = np.asarray(image)
            if is_blank(rgb):
                continue  # skipped and listed by the folder's scoring, never counted as clean
            self.pending.append((name, hashlib.sha256(data).hexdigest(), preprocess_rgb(rgb)))
        while len(self.pending) >= self.batch_size:
            self._score(self.batch_size)

    def _score(self, n: int) -> None:
        batch, self.pending = self.pending[:n], self.pending[n:]
        if self.detector is None:
            threads = max(1, (os.cpu_count() or 1) // self.world) if self.world > 1 else None
            self.detector = NudityDetector(device_id=self.local, threads=threads)
        detections = self.detector.run([item for _, _, item in batch])
        self._log.write([(name, sha, dets) for (name, sha, _), dets in zip(batch, detections)])
        self.scored += len(batch)

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None and self.pending:
                self._score(len(self.pending))
        finally:
            self._log.__exit__(exc_type, *exc)
