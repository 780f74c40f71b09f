"""Select the parameters a method may touch, by name pattern (as peft's ``target_modules``).

A target spec is a preset name (``presets`` maps names to regexes), a regex matched with ``re.fullmatch`` against
parameter names, or a list of those. ``exclude`` patterns win over matches. No match is an error naming the spec.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch.nn as nn

GENERIC_PRESETS: dict[str, str] = {
    "all": r".*",
    "weights": r".*\.weight",
    "nobias": r"(?!.*\.bias$).*",
}


class TargetError(ValueError):
    """A target or exclude spec matched nothing or is malformed."""


def _as_list(spec) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [s for s in (x.strip() for x in spec.split(",")) if s] if "," in spec and not _looks_regex(spec) else [spec]
    return [str(s) for s in spec]


def _looks_regex(spec: str) -> bool:
    # A comma inside {m,n} or a character class belongs to a regex, not a list separator.
    return bool(re.search(r"\{\d*,\d*\}|\[[^\]]*,[^\]]*\]", spec))


def resolve_patterns(spec, presets: Mapping[str, str] | None = None) -> list[str]:
    """Turn a spec into regexes: preset names are expanded, anything else is compiled as a regex."""
    table = {**GENERIC_PRESETS, **(presets or {})}
    patterns = []
    for item in _as_list(spec):
        pattern = table.get(item, item)
        try:
            re.compile(pattern)
        except re.error as err:
            raise TargetError(f"target {item!r} is neither a preset ({', '.join(sorted(table))}) nor a valid regex: {err}") from None
        patterns.append(pattern)
    return patterns


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def select_parameters(
    model: nn.Module,
    targets,
    exclude=None,
    presets: Mapping[str, str] | None = None,
) -> dict[str, nn.Parameter]:
    """Named parameters of ``model`` that match ``targets`` and no ``exclude`` pattern, in model order."""
    include = resolve_patterns(targets, presets)
    if not include:
        raise TargetError("no target given: pass a preset name or a regex")
    drop = resolve_patterns(exclude, presets)
    chosen = {n: p for n, p in model.named_parameters() if matches(n, include) and not matches(n, drop)}
    if not chosen:
        shown = targets if isinstance(targets, str) else ",".join(_as_list(targets))
        raise TargetError(
            f"targets {shown!r} (exclude {exclude!r}) match no parameter of {type(model).__name__}; "
            f"presets: {', '.join(sorted({**GENERIC_PRESETS, **(presets or {})}))}"
        )
    return chosen


def describe(params: Mapping[str, nn.Parameter]) -> dict:
    """What matched, as recorded in a run's config: names, shapes and counts."""
    tensors = {n: list(p.shape) for n, p in params.items()}
    return {"num_tensors": len(tensors), "num_parameters": int(sum(p.numel() for p in params.values())), "tensors": tensors}
