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


#: The most time one spec may take to match every parameter name of a model: far above any sane pattern (a
#: few ms for a UNet), far below a catastrophic one (``(a|a)*b`` backtracks exponentially), which an audited model's
#: ``erase_config.json`` may carry.
MATCH_SECONDS = 2.0


class Matcher:
    """``fullmatch`` of user patterns against parameter names, bounded in time (the ``regex`` module's timeout, as
    Python's ``re`` cannot be interrupted): a pattern that exceeds :data:`MATCH_SECONDS` in total is a
    :class:`TargetError` naming it, never a hang."""

    def __init__(self, patterns: Iterable[str], seconds: float | None = None):
        import regex

        self.patterns = [(p, regex.compile(p)) for p in patterns]
        self.seconds = MATCH_SECONDS if seconds is None else seconds
        self.left = {p: self.seconds for p in set(p for p, _ in self.patterns)}

    def __call__(self, name: str) -> bool:
        import time

        for p, compiled in self.patterns:
            start = time.perf_counter()
            try:
                hit = compiled.fullmatch(name, timeout=max(self.left[p], 1e-3))
            except TimeoutError:
                raise TargetError(f"target pattern {p!r} takes over {self.seconds:g} s to match the parameter names "
                                  "(a pattern that backtracks catastrophically?); give a simpler one") from None
            self.left[p] -= time.perf_counter() - start
            if hit:
                return True
        return False


def matches(name: str, patterns: Iterable[str] | Matcher) -> bool:
    return (patterns if isinstance(patterns, Matcher) else Matcher(patterns))(name)


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
    include, drop = Matcher(include), Matcher(drop)
    chosen = {n: p for n, p in model.named_parameters() if include(n) and not drop(n)}
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
