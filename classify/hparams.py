"""Method hyperparameters: built-in fallbacks, the tuning grids, and the shipped tuned values.

A method's hyperparameters are one flat dict: ``EngineConfig`` fields (``lr``, ``max_train_steps``, ...) and its
own config fields (``topk``, ``lam``, ...). ``classify/tuned_<dataset>.json`` (written by ``python -m classify.tune``)
holds the values chosen on a validation split, per forget kind (``random`` / ``class``); without it the
fallbacks below are used and the results say so.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

TUNED_DIR = Path(__file__).resolve().parent

#: Adam, batch 64; sane for the ~38k-parameter digits CNN (trim ≤ 0.3% of entries: ≥ 1% collapses it).
FALLBACK: dict[str, dict] = {
    "ft": {"lr": 1e-3, "max_train_steps": 150},
    "ga": {"lr": 1e-4, "max_train_steps": 10},
    "salun": {"lr": 1e-4, "max_train_steps": 100, "mask_ratio": 50.0},
    "l1sparse": {"lr": 1e-3, "max_train_steps": 150, "alpha": 5e-4},
    "scissorhands": {"lr": 1e-3, "max_train_steps": 150, "topk": 0.1, "lam": 0.1, "forget_steps": "first_per_epoch"},
}

#: Grids searched by classify.tune (cartesian product per method), per forget kind.
RANDOM_GRIDS: dict[str, dict[str, list]] = {
    "ft": {"lr": [3e-4, 1e-3, 3e-3], "max_train_steps": [60, 200]},
    "ga": {"lr": [3e-5, 1e-4, 3e-4], "max_train_steps": [10, 30]},
    "salun": {"lr": [3e-5, 1e-4, 3e-4], "max_train_steps": [30, 100], "mask_ratio": [50.0]},
    "l1sparse": {"lr": [3e-4, 1e-3], "max_train_steps": [60, 200], "alpha": [1e-4, 5e-4]},
    "scissorhands": {"lr": [1e-3], "max_train_steps": [100, 200], "topk": [0.1, 0.3], "lam": [0.1, 0.3],
                     "forget_steps": ["first_per_epoch"]},
}
#: Class-wise forgetting needs a stronger, bounded forget push (UA 100), so Scissorhands also tries every-step forgetting.
CLASS_GRIDS: dict[str, dict[str, list]] = {
    **RANDOM_GRIDS,
    "scissorhands": {"lr": [1e-3], "max_train_steps": [100], "topk": [0.1, 0.3], "lam": [0.3, 1.0],
                     "forget_steps": ["every", "first_per_epoch"], "forget_bound": [5.0]},
}
GRIDS: dict[str, dict[str, dict[str, list]]] = {"random": RANDOM_GRIDS, "class": CLASS_GRIDS}


def grid_points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def tuned_path(dataset: str) -> Path:
    return TUNED_DIR / f"tuned_{dataset}.json"


def load_hparams(dataset: str, kind: str, path: str | Path | None = None) -> tuple[dict[str, dict], str]:
    """(method -> hyperparameters, where they came from) for a forget kind; fallbacks fill any gap."""
    file = Path(path) if path else tuned_path(dataset)
    chosen = {m: dict(hp) for m, hp in FALLBACK.items()}
    if not file.exists():
        return chosen, "built-in fallback (no tuned file)"
    tuned = json.loads(file.read_text()).get(kind, {}).get("methods", {})
    for m, hp in tuned.items():
        chosen[m] = dict(hp)
    source = f"{file.name}[{kind}]" if tuned else f"built-in fallback ({file.name} has no {kind!r} entry)"
    return chosen, source
