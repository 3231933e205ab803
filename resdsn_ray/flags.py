"""Command-line flags bound to settings fields, so each default and choice is written once (in
`config`) and a bad value is refused by its flag's name.

    option(parser, "--n-coarse", EngineConfig, "coarse.n", help=...)
    engine = settings(args, EngineConfig())      # the base with every given flag applied

A flag whose parser default is None defers to the base it is applied to (the demo's or a
preset's settings); any other default is the settings class's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from resdsn_ray.config import choices
from resdsn_ray.errors import InputError

T = TypeVar("T")
BINDINGS = "_bindings"  # parser default: the list of this parser's `Binding`s


@dataclass(frozen=True)
class Binding:
    """A flag and the settings fields (dotted paths from `root`) its value sets."""

    flag: str
    dest: str
    root: type
    paths: tuple[str, ...]


def field_default(root: type, path: str) -> Any:
    """The default of the field at dotted `path` of settings class `root` (None where it has none)."""
    value: Any = None
    cls: Any = root
    for name in path.split("."):
        if value is not None:
            value = getattr(value, name)
            continue
        spec = {f.name: f for f in dataclasses.fields(cls)}[name]
        if spec.default is not dataclasses.MISSING:
            value = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            value = spec.default_factory()
        else:
            return None
        cls = typing.get_type_hints(cls)[name]
    return value


def _owner(root: type, path: str) -> tuple[type, str]:
    """The settings class that declares the last field of `path`, and that field's name."""
    *parents, name = path.split(".")
    cls = root
    for parent in parents:
        cls = typing.get_type_hints(cls)[parent]
    return cls, name


def bindings(parser: argparse.ArgumentParser) -> list[Binding]:
    found = parser.get_default(BINDINGS)
    if found is None:
        found = []
        parser.set_defaults(**{BINDINGS: found})
    return found


def option(parser: argparse.ArgumentParser, flag: str, root: type, *paths: str, **kwargs: Any) -> None:
    """Add `flag` setting the fields `paths` of `root`; default, type and choices from `root`."""
    default = field_default(root, paths[0])
    allowed = choices(*_owner(root, paths[0]))
    kwargs.setdefault("default", default)
    if isinstance(default, bool) and "action" not in kwargs:
        kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
    elif allowed:
        kwargs.setdefault("choices", allowed)
    elif default is not None:
        kwargs.setdefault("type", type(default))
    action = parser.add_argument(flag, **kwargs)
    bindings(parser).append(Binding(flag, action.dest, root, paths))


def settings(args: argparse.Namespace, base: T) -> T:
    """`base` with the value of every flag bound to its class (None: not given) put in."""
    for binding in getattr(args, BINDINGS, []):
        value = getattr(args, binding.dest)
        if binding.root is not type(base) or value is None:
            continue
        for path in binding.paths:
            try:
                base = _replaced(base, path.split("."), value)
            except InputError as err:
                raise InputError(binding.flag, err.reason) from None
    return base


def _replaced(obj: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    return dataclasses.replace(obj, **{head: _replaced(getattr(obj, head), rest, value) if rest else value})
