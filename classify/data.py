"""Image-classification data as in-memory tensors, forget-set specs and the fixed splits of the protocol.

``digits`` (scikit-learn's 1,797 8×8 handwritten digits, offline) is the default; ``cifar10``, ``cifar100`` and
``svhn`` come from the Hugging Face hub through ``datasets.load_dataset`` for users who are online.
Images are float32 ``(N, C, H, W)``, standardised with training-set statistics; labels are int64.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: name -> (hub id or None, hub config, image column, label column, number of classes)
DATASETS: dict[str, tuple[str | None, str | None, str, str, int]] = {
    "digits": (None, None, "", "", 10),
    "cifar10": ("uoft-cs/cifar10", None, "img", "label", 10),
    "cifar100": ("uoft-cs/cifar100", None, "img", "fine_label", 100),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "image", "label", 10),
}
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # the fixed test split: never changes with the evaluation seed


class DataError(ValueError):
    """Bad data settings (unknown dataset, bad forget spec, empty forget set): one line for the user."""


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx) -> "Split":
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return Split(self.x[idx], self.y[idx])


@dataclass
class Data:
    name: str
    train: Split
    test: Split
    num_classes: int
    info: dict


@dataclass(frozen=True)
class ForgetSpec:
    kind: str  # "random" or "class"
    value: float | int

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def num_classes_of(name: str) -> int:
    check_dataset(name)
    return DATASETS[name][4]


def check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")


def parse_forget(spec: str, num_classes: int) -> ForgetSpec:
    """``random:F`` with F in (0, 1), or ``class:K`` with K in [0, num_classes)."""
    kind, _, value = str(spec).partition(":")
    if kind == "random":
        try:
            frac = float(value)
        except ValueError:
            raise DataError(f"forget fraction {value!r} in {spec!r} is not a number; use random:F with F in (0, 1)") from None
        if not 0.0 < frac < 1.0:
            raise DataError(f"forget fraction {frac} in {spec!r} is outside (0, 1); use e.g. random:0.1")
        return ForgetSpec("random", frac)
    if kind == "class":
        try:
            k = int(value)
        except ValueError:
            raise DataError(f"forget class {value!r} in {spec!r} is not an integer; allowed: 0..{num_classes - 1}") from None
        if not 0 <= k < num_classes:
            raise DataError(f"forget class {k} in {spec!r} is out of range; allowed: 0..{num_classes - 1}")
        return ForgetSpec("class", k)
    raise DataError(f"forget spec {spec!r} is not random:F or class:K (e.g. random:0.1, class:3)")


def forget_indices(y: torch.Tensor, spec: ForgetSpec, seed: int) -> np.ndarray:
    """Indices of D_f in ``y``: a seeded random fraction, or every example of the class. Empty is an error."""
    n = len(y)
    if spec.kind == "random":
        count = int(round(spec.value * n))
        idx = np.sort(np.random.default_rng(seed).permutation(n)[:count])
    else:
        idx = np.flatnonzero(y.numpy() == spec.value)
    if idx.size == 0:
        raise DataError(f"forget set {spec} is empty on {n} training examples; use a larger fraction or a class present in the data")
    if idx.size == n:
        raise DataError(f"forget set {spec} takes all {n} training examples; nothing would be retained")
    return idx


def split_forget(train: Split, spec: ForgetSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    f = forget_indices(train.y, spec, seed)
    keep = np.ones(len(train), dtype=bool)
    keep[f] = False
    return f, np.flatnonzero(keep)


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held-out) indices with ``fraction`` of every class held out, seeded."""
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.extend(idx[: int(round(fraction * idx.size))].tolist())
    held = np.sort(np.asarray(held, dtype=np.int64))
    mask = np.ones(len(labels), dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def load_data(name: str) -> Data:
    check_dataset(name)
    if name == "digits":
        return _load_digits()
    return _load_hub(name)


def _standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    dims = (0, 2, 3)
    mean, std = train_x.mean(dims, keepdim=True), train_x.std(dims, keepdim=True).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std, {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}


def _load_digits() -> Data:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    train_idx, test_idx = stratified_split(y, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    tr, te, norm = _standardise(x[train_idx], x[test_idx])
    info = {"source": "sklearn.datasets.load_digits", "test_fraction": DIGITS_TEST_FRACTION,
            "split_seed": DIGITS_SPLIT_SEED, "train_size": len(train_idx), "test_size": len(test_idx), "normalisation": norm}
    return Data("digits", Split(tr, y[train_idx]), Split(te, y[test_idx]), 10, info)


def _load_hub(name: str) -> Data:
    hub_id, config, image_col, label_col, num_classes = DATASETS[name]
    try:
        from datasets import load_dataset

        ds = load_dataset(hub_id, config)
    except Exception as err:  # offline, missing package, hub errors: one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load dataset {name!r} ({hub_id}) from the Hugging Face hub: {first}") from None

    def tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in split[image_col]])
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.tensor(split[label_col], dtype=torch.long)

    trx, try_ = tensors(ds["train"])
    tex, tey = tensors(ds["test"])
    trx, tex, norm = _standardise(trx, tex)
    info = {"source": f"datasets.load_dataset({hub_id!r})", "train_size": len(try_), "test_size": len(tey), "normalisation": norm}
    return Data(name, Split(trx, try_), Split(tex, tey), num_classes, info)
