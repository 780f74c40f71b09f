"""One seed of the unlearning protocol, shared by ``classify.run`` (test split) and ``classify.tune`` (validation).

Per seed: a new forget set, new init seeds, an ``original`` model trained on all of D_train, its own Retrain on D_r
and ``retrain2`` (a second retrain from another init: the noise floor). Original and retrain models are trained
once through the engine's ``retrain`` method and cached as safetensors + JSON, keyed by a hash of every setting
that determines them. Each unlearning method starts from the original and runs through ``erase.core.run``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from erase.core import EngineConfig, build_method, run
from erase.core.registry import get_method_class
from erase.utils.files import atomic_write_json, settings_hash

from .adapter import ClassifierAdapter
from .data import Data, ForgetSpec, Split, split_forget
from .metrics import avg_gap, evaluate
from .models import DEFAULT_MODEL, build_model

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when training code changes what given settings produce
ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
REFERENCE_ROWS = ("original", "retrain", "retrain2")


@dataclass
class TrainSettings:
    """How ``original`` and the retrain oracles are trained (from scratch, Adam, cosine schedule)."""

    model: str = field(default="", metadata={"help": "small_cnn or resnet18 (dataset default if empty)."})
    epochs: int = field(default=30, metadata={"help": "Epochs over the training data."})
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate."})
    batch_size: int = field(default=64, metadata={"help": "Batch size."})
    weight_decay: float = 0.0

    def resolved(self, dataset: str) -> "TrainSettings":
        return dataclasses.replace(self, model=self.model or DEFAULT_MODEL[dataset])


@dataclass
class SeedPlan:
    """The seeds one protocol seed derives: forget set, three inits, and the unlearning runs' engine seed."""

    seed: int

    @property
    def init_original(self) -> int:
        return 10_000 + 3 * self.seed

    @property
    def init_retrain(self) -> int:
        return 10_000 + 3 * self.seed + 1

    @property
    def init_retrain2(self) -> int:
        return 10_000 + 3 * self.seed + 2


def _index_hash(idx: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]


def new_model(data: Data, train: TrainSettings) -> torch.nn.Module:
    x = data.train.x
    return build_model(train.model, data.num_classes, x.shape[1], x.shape[-1])


def trained_reference(data: Data, train_split: Split, idx: np.ndarray, init_seed: int, train: TrainSettings,
                      cache_dir: str | Path | None, accelerator=None) -> tuple[torch.nn.Module, dict]:
    """A model trained from init ``init_seed`` on ``train_split[idx]``, from the cache when its settings match."""
    settings = {"format": CACHE_FORMAT, "dataset": data.name, "data_info": {k: v for k, v in data.info.items() if k != "normalisation"},
                "train": asdict(train), "init_seed": init_seed, "examples": _index_hash(idx), "num_examples": int(len(idx)),
                "split_hash": _index_hash(train_split.y.numpy())}
    key = settings_hash(settings)
    model = new_model(data, train)
    if cache_dir is not None:
        weights, card = Path(cache_dir) / f"{key}.safetensors", Path(cache_dir) / f"{key}.json"
        if weights.exists() and card.exists():
            model.load_state_dict(load_file(str(weights)))
            return model, json.loads(card.read_text())
    part = train_split.subset(idx)
    adapter = ClassifierAdapter(model, (part.x[:0], part.y[:0]), (part.x, part.y), data.num_classes, train.batch_size)
    steps = train.epochs * -(-len(part) // train.batch_size)
    config = EngineConfig(output_dir=str(cache_dir or "."), max_train_steps=steps, train_batch_size=train.batch_size, lr=train.lr,
                          weight_decay=train.weight_decay, lr_schedule="cosine", seed=init_seed, progress=False, log_every=steps)
    result = run(adapter, build_method("retrain", task="classify", init_seed=init_seed), config, accelerator=accelerator)
    model = result.model.eval()
    info = {"settings": settings, "key": key, "wall_seconds": result.wall_seconds, "steps": steps,
            "final_loss": result.history[-1]["loss"] if result.history else None}
    if cache_dir is not None:
        _save_atomic(model, info, Path(cache_dir), key)
    return model, info


def _save_atomic(model: torch.nn.Module, info: dict, cache_dir: Path, key: str) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.safetensors.tmp"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"settings": json.dumps(info["settings"], sort_keys=True)})
    tmp.replace(cache_dir / f"{key}.safetensors")
    atomic_write_json(cache_dir / f"{key}.json", info)


def split_hparams(hparams: dict) -> tuple[dict, dict]:
    """(EngineConfig fields, method config fields) of one method's hyperparameters."""
    engine = {k: v for k, v in hparams.items() if k in ENGINE_FIELDS}
    method = {k: v for k, v in hparams.items() if k not in ENGINE_FIELDS}
    return engine, method


def unlearn(data: Data, original: torch.nn.Module, forget: Split, retain: Split, method: str, hparams: dict, seed: int,
            batch_size: int, accelerator=None) -> tuple[torch.nn.Module, dict]:
    """Run one registered method from a copy of ``original``; returns the model and {wall_seconds, prepare_info}."""
    model = copy.deepcopy(original)
    engine_hp, method_hp = split_hparams(hparams)
    fields = {f.name for f in dataclasses.fields(get_method_class(method, "classify").config_cls)}
    unknown = sorted(set(method_hp) - fields)
    if unknown:
        raise ValueError(f"hyperparameters {unknown} are not options of {method!r}; allowed: {sorted(fields | ENGINE_FIELDS)}")
    adapter = ClassifierAdapter(model, (forget.x, forget.y), (retain.x, retain.y), data.num_classes,
                                engine_hp.get("train_batch_size", batch_size))
    config = EngineConfig(**{"output_dir": ".", "train_batch_size": batch_size, "seed": seed, "progress": False,
                             "log_every": 10**9, **engine_hp})
    result = run(adapter, build_method(method, task="classify", **method_hp), config, accelerator=accelerator)
    return result.model.eval(), {"wall_seconds": result.wall_seconds, "prepare": _slim(result.prepare_info)}


def _slim(info: dict) -> dict:
    """What is worth keeping per run: the trim summary, not per-tensor tables."""
    out = {}
    if "trim" in info:
        out["trim"] = info["trim"].get("summary", info["trim"])
    if "mask" in info:
        out["mask"] = info["mask"]
    return out


def run_seed(data: Data, train_split: Split, eval_split: Split, spec: ForgetSpec, seed: int, rows: dict[str, tuple[str, dict]],
             train: TrainSettings, cache_dir, accelerator=None, batch_size: int = 64, retrain2: bool = True) -> list[dict]:
    """Reference rows plus ``rows`` (row name -> (registered method, hyperparameters)) of one seed on ``eval_split``.

    With ``class:K`` the evaluation split keeps only the other classes (TA on the remaining classes) and the forget
    class' test examples are left out of the MIA's non-members.
    """
    plan = SeedPlan(seed)
    f_idx, r_idx = split_forget(train_split, spec, seed)
    forget, retain = train_split.subset(f_idx), train_split.subset(r_idx)
    if spec.kind == "class":
        eval_split = eval_split.subset(np.flatnonzero(eval_split.y.numpy() != spec.value))
    everything = np.arange(len(train_split))
    original, info_o = trained_reference(data, train_split, everything, plan.init_original, train, cache_dir, accelerator)
    retrain, info_r = trained_reference(data, train_split, r_idx, plan.init_retrain, train, cache_dir, accelerator)
    retrain_s = info_r["wall_seconds"]
    out = []

    def add(name: str, model, wall: float, extra: dict | None = None):
        metrics = evaluate(model, forget, retain, eval_split, seed)
        out.append({"method": name, "seed": seed, **metrics, "RTE": wall, "RTE_ratio": wall / retrain_s, **(extra or {})})

    add("original", original, 0.0, {"init_seed": plan.init_original})
    add("retrain", retrain, retrain_s, {"init_seed": plan.init_retrain})
    if retrain2:
        retrain2, info_2 = trained_reference(data, train_split, r_idx, plan.init_retrain2, train, cache_dir, accelerator)
        add("retrain2", retrain2, info_2["wall_seconds"], {"init_seed": plan.init_retrain2})
    for name, (method, hp) in rows.items():
        model, info = unlearn(data, original, forget, retain, method, hp, seed, batch_size, accelerator)
        add(name, model, info["wall_seconds"], info["prepare"])
    ref = next(r for r in out if r["method"] == "retrain")
    for r in out:
        r["AvgGap"] = avg_gap(r, ref)
        r["forget_size"], r["retain_size"], r["eval_size"] = len(forget), len(retain), len(eval_split)
    return out

