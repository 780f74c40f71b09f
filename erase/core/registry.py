"""Methods register themselves by name at import; one file each in ``erase/core/methods/``."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re

_METHODS: dict[str, type] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_method(cls):
    """Class decorator: ``cls.name`` (lower snake case) and ``cls.config_cls`` (a dataclass) are required."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"method class {cls.__name__} needs a lower-case name, got {name!r}")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is registered twice ({_METHODS[name].__module__} and {cls.__module__})")
    if not dataclasses.is_dataclass(getattr(cls, "config_cls", None)):
        raise ValueError(f"method {name!r} needs a dataclass config_cls")
    _METHODS[name] = cls
    return cls


def _load_all() -> None:
    from . import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{info.name}")


def available_methods(task: str | None = None) -> list[str]:
    _load_all()
    return sorted(n for n, c in _METHODS.items() if task is None or task in c.tasks)


def get_method_class(name: str, task: str | None = None) -> type:
    names = available_methods(task)
    if name not in names:
        where = f" for {task}" if task else ""
        raise KeyError(f"unknown method {name!r}{where}; available: {', '.join(names)}")
    return _METHODS[name]


def build_method(name: str, task: str | None = None, **overrides):
    """Instantiate a method with its config. A key its config does not have is a ``TypeError`` naming it and the
    method's options (never silently ignored); ``None`` values mean "the config default"."""
    cls = get_method_class(name, task)
    fields = [f.name for f in dataclasses.fields(cls.config_cls)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"method {name} has no option {', '.join(map(repr, unknown))}; its options: "
                        f"{', '.join(fields) or 'none'}")
    config = cls.config_cls(**{k: v for k, v in overrides.items() if v is not None})
    return cls(config)
