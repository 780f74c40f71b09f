"""Command-line options generated from the methods' config dataclasses: the only place a method option is declared.

Each field of a method's ``config_cls`` becomes ``--<field>`` (its ``metadata["help"]``, its type, and
``metadata["choices"]`` when given); a ``bool`` field becomes ``--<field>`` / ``--no_<field>`` (plus any
``metadata["negative_aliases"]``). Every generated flag defaults to ``None``, meaning "the method's default", so a
command line can tell what the user set. The options of every method are parsed (a name that two methods share is
one flag), and :func:`method_options` then keeps those of the chosen method and rejects any other that was set::

    add_method_options(parser, "diffusion")              # one help heading per method
    args = parser.parse_args(argv)
    overrides = method_options(args, args.method)          # ValueError: "--topk is not an option of salun ..."
    method = build_method(args.method, "diffusion", **overrides)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .registry import available_methods, get_method_class

_SCALARS = (bool, int, float, str)


def _scalar_type(annotation) -> type:
    """``float | None`` -> float; the one scalar type a flag of this field parses to."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation not in _SCALARS:
        raise TypeError(f"option type {annotation!r} has no command-line form (use bool, int, float or str)")
    return annotation


def option_fields(method: str, task: str | None = None) -> list[tuple[dataclasses.Field, type]]:
    """(field, scalar type) of every option of ``method``'s config, in declaration order."""
    cls = get_method_class(method, task).config_cls
    hints = typing.get_type_hints(cls)
    return [(f, _scalar_type(hints[f.name])) for f in dataclasses.fields(cls)]


def all_option_types(task: str | None = None) -> dict[str, type]:
    """Every option name of every method of ``task`` (one flag per name) with its scalar type."""
    out: dict[str, type] = {}
    for m in available_methods(task):
        for f, kind in option_fields(m, task):
            out.setdefault(f.name, kind)
    return out


def option_names(method: str, task: str | None = None) -> list[str]:
    return [f.name for f, _ in option_fields(method, task)]


def _help(f: dataclasses.Field, kind: type, default) -> str:
    text = f.metadata.get("help", "")
    shown = default if default is not dataclasses.MISSING else f.default
    text = f"{text} (default: {('on' if shown else 'off') if kind is bool else shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_method_options(parser: argparse.ArgumentParser, task: str | None = None, methods: list[str] | None = None,
                       defaults: dict[str, dict] | None = None, exclude=()) -> dict[str, list[str]]:
    """Add every option of ``methods`` (default: all registered for ``task``) to ``parser``, one argument group per
    method. ``defaults`` maps a method to option values that replace its config defaults in the help (what a command
    line applies when the option is not set). A field whose flag the parser already has (an option of the command
    line itself, such as an adapter setting) is not added again; ``exclude`` names fields the command line sets
    itself. Returns method -> its option names."""
    defaults = defaults or {}
    added: dict[str, tuple[type, str]] = {}  # option -> (type, first method)
    owned: dict[str, list[str]] = {}
    for method in methods or available_methods(task):
        fields = [(f, kind) for f, kind in option_fields(method, task) if f.name not in exclude]
        owned[method] = [f.name for f, _ in fields]
        for f, kind in fields:  # the command line's own flag (an adapter setting): not added again
            if f"--{f.name}" in parser._option_string_actions and f.name not in added:
                added[f.name] = (kind, "the command line")
        shared = [f.name for f, _ in fields if f.name in added]
        desc = f"also: {', '.join('--' + n for n in shared)} (above)" if shared else None
        group = parser.add_argument_group(f"{method} options (--method {method})", desc)
        for f, kind in fields:
            if f.name in added:
                if added[f.name][0] is not kind and added[f.name][1] != "the command line":
                    raise TypeError(f"option {f.name!r} is a {kind.__name__} in {method} but a "
                                    f"{added[f.name][0].__name__} in {added[f.name][1]}")
                continue
            added[f.name] = (kind, method)
            text = _help(f, kind, defaults.get(method, {}).get(f.name, dataclasses.MISSING))
            if kind is bool:
                group.add_argument(f"--{f.name}", dest=f.name, action="store_const", const=True, default=None, help=text)
                negatives = [f"--no_{f.name}", *f.metadata.get("negative_aliases", ())]
                group.add_argument(*negatives, dest=f.name, action="store_const", const=False, default=None,
                                   help=f"Turn --{f.name} off.")
            else:
                group.add_argument(f"--{f.name}", dest=f.name, type=kind, default=None, help=text,
                                   choices=f.metadata.get("choices"))
    return owned


def method_options(args: argparse.Namespace, method: str, task: str | None = None,
                   owned: dict[str, list[str]] | None = None, shared: set[str] = frozenset()) -> dict:
    """The options of ``method`` that were set on the command line; a set option of another method only is a
    ``ValueError`` naming it, its method(s) and the options ``method`` has. ``shared`` names options the command
    line itself uses whatever the method (they are passed on only to a method that has them)."""
    mine = option_names(method, task)
    owned = owned or {m: option_names(m, task) for m in available_methods(task)}
    for other, names in owned.items():
        for name in names:
            if name not in mine and name not in shared and getattr(args, name, None) is not None:
                owners = sorted(m for m, ns in owned.items() if name in ns)
                allowed = ", ".join("--" + n for n in mine) or "none"
                raise ValueError(f"--{name} is not an option of method {method} (it belongs to {', '.join(owners)}); "
                                 f"{method}'s options: {allowed}")
    return {name: getattr(args, name) for name in mine if getattr(args, name, None) is not None}
