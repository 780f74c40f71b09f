"""Checks every entry point shares (docs/RELIABILITY.md): numbers, weights and free space.

* Numbers: a float option is a finite number that fits a float32 and lies in its range (:func:`check_finite`,
  :data:`OPTION_RANGES`); an integer that seeds a generator fits it (:func:`check_int`).
* Weights (:func:`check_weights`): missing (meta) or non-finite tensors are an error, never an export.
* Free space (:func:`check_free_space`): a one-line error before work that could not be written.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from erase.utils.errors import UserError

FLOAT32_MAX = 3.4028234663852886e38
SEED_MAX = 2**32 - 1  # numpy's global seed (accelerate.set_seed) takes [0, 2**32)
GENERATOR_SEED_MAX = 2**63 - 1  # a torch.Generator seed that fits a signed 64-bit integer


class Range:
    """An interval of allowed values: ``Range(0, 100, lo_open=True)`` is (0, 100]; ``None`` is unbounded."""

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def __contains__(self, x: float) -> bool:
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "any finite number"


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
PERCENT = Range(0, 100, lo_open=True)
UNIT = Range(0, 1)


def number_error(name: str, value, allowed: Range) -> str | None:
    """Why ``value`` is not an allowed value of option ``name`` (one line), or None when it is."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return f"{name} {value!r} is not a number"
    if not math.isfinite(x):
        return f"{name} {value} is not a finite number (allowed: {allowed})"
    if abs(x) > FLOAT32_MAX:
        return f"{name} {value:g} does not fit a float32 (|x| <= 3.4e38; allowed: {allowed})"
    if x not in allowed:
        return f"{name} {value:g} is outside the allowed range {allowed}"
    return None


def check_finite(name: str, value, allowed: Range = Range(), *, optional: bool = True):
    """``value`` if it is a finite float32-sized number in ``allowed`` (``None`` passes when optional);
    otherwise a :class:`UserError` naming the option, the value and the allowed range."""
    if value is None and optional:
        return None
    message = number_error(name, value, allowed)
    if message:
        raise UserError(message)
    return value


#: The allowed range of every float option of every CLI (and of hyperparameter files), by name; a test checks that
#: each float flag of each parser is here, so a new one cannot skip the check.
OPTION_RANGES: dict[str, Range] = {
    # optimisation
    "lr": POSITIVE, "vae_lr": POSITIVE, "weight_decay": NON_NEGATIVE, "momentum": Range(0, 1, hi_open=True),
    "max_grad_norm": POSITIVE,
    # methods (a negative weight or margin inverts a term; a zero-size selection disables the method)
    "topk": PERCENT, "mask_ratio": PERCENT, "lam": NON_NEGATIVE, "margin": NON_NEGATIVE, "forget_bound": POSITIVE,
    "alpha": NON_NEGATIVE, "negative_guidance": NON_NEGATIVE, "distill_empty_fraction": UNIT, "relearn_lr": POSITIVE, "inversion_lr": POSITIVE, "robust_lr": POSITIVE,
    "lamb": POSITIVE, "erase_scale": NON_NEGATIVE, "preserve_scale": NON_NEGATIVE, "null_threshold": POSITIVE, "retain_scale": POSITIVE,
    "invariance_lamb": NON_NEGATIVE, "null_space_threshold": Range(0, 1, lo_open=True, hi_open=True),
    "relearn_radius": Range(0, 1, hi_open=True), "forget_target": Range(0, 1, lo_open=True, hi_open=True),
    "forget_gain": Range(0, 1, lo_open=True),
    # sampling and audits
    "guidance": NON_NEGATIVE, "guidance_scale": NON_NEGATIVE, "esd_start_guidance": NON_NEGATIVE, "threshold": UNIT,
    # data and models
    "validation_fraction": Range(0, 1, lo_open=True, hi_open=True), "vae_kl_weight": NON_NEGATIVE,
    "cond_dropout": Range(0, 1, hi_open=True), "ema_decay": Range(0, 1, hi_open=True),
    # exports
    "lora_energy": Range(0, 1, lo_open=True),
}


def check_numbers(args, ranges: dict[str, Range] = OPTION_RANGES, prefix: str = "--") -> None:
    """:func:`check_finite` on every numeric ``args.<name>`` (a namespace or a dict) whose name is in ``ranges``."""
    items = args.items() if isinstance(args, dict) else vars(args).items()
    for name, value in items:
        if name in ranges and isinstance(value, (int, float)) and not isinstance(value, bool):
            check_finite(f"{prefix}{name}", value, ranges[name])


def check_int(name: str, value, lo: int = 0, hi: int = SEED_MAX) -> int:
    """An integer option (a seed, a count) inside [lo, hi], or a one-line :class:`UserError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{name} {value!r} is outside [{lo}, {hi}]")
    return value


def check_int_list(name: str, value, lo: int = 0, hi: int = SEED_MAX) -> list[int]:
    """``"0,1,2"`` (or a list) as distinct integers inside [lo, hi], or a one-line :class:`UserError` naming the bad
    item: an empty entry (``"0,,1"``), a repeated one (one run counted twice) or one outside the range."""
    items = str(value).split(",") if isinstance(value, str) else list(value)
    if not "".join(str(v).strip() for v in items):
        raise UserError(f"{name} is empty; give comma-separated integers in [{lo}, {hi}]")
    out = []
    for v in items:
        text = str(v).strip()
        if not text:
            raise UserError(f"{name} {value!r} has an empty entry; give comma-separated integers in [{lo}, {hi}]")
        try:
            out.append(int(text))
        except ValueError:
            raise UserError(f"{name} {text!r} is not an integer; give comma-separated integers in [{lo}, {hi}]") from None
        check_int(name, out[-1], lo, hi)
        if out.count(out[-1]) > 1:
            raise UserError(f"{name} {value!r} repeats {out[-1]}; each value may appear once")
    return out


def check_weights(tensors, what: str, hint: str = "") -> None:
    """A one-line error when any tensor of ``tensors`` (name -> tensor) is missing (meta) or not finite."""
    import torch

    missing, bad = [], []
    for name, t in tensors:
        if t.is_meta:
            missing.append(name)
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    if missing:
        raise UserError(f"{what} is missing {len(missing)} tensor(s) (first: {missing[0]}); the weights file is incomplete")
    if bad:
        raise UserError(f"{what} has non-finite (NaN/inf) values in {len(bad)} tensor(s) (first: {bad[0]}){hint}")


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """A one-line error when the file system of ``folder`` has less than ``need_bytes`` free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need_bytes:
        raise UserError(f"{folder} has {free / 2**20:,.0f} MiB free; {what} needs about {need_bytes / 2**20:,.0f} MiB. "
                        "Free some space or choose another folder")
