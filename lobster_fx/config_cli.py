"""Command-line options generated from a dataclass: every :class:`TrainConfig` field is one.

A field ``batch_size`` becomes ``--batch-size``; its type picks the parser (int, float, str, a
JSON object for dicts, ``--x`` / ``--no-x`` for bools, ``auto``/``on``/``off`` for an optional
bool, ``none`` for an optional number); its ``#:`` comment in the class source becomes the help;
``choices`` and ``aliases`` add what the type cannot say. So a new field needs no CLI code.

Example::

    >>> import argparse
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Options:
    ...     batch_size: int = 100
    ...     fused: bool | None = None
    ...     kwargs: dict | None = None
    >>> parser = argparse.ArgumentParser()
    >>> add_dataclass_options(parser, Options)
    >>> args = parser.parse_args(["--batch-size", "32", "--fused", "on", "--kwargs", '{"a": 1}'])
    >>> dataclass_kwargs(args, Options)
    {'batch_size': 32, 'fused': True, 'kwargs': {'a': 1}}
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any

__all__ = ["add_dataclass_options", "dataclass_kwargs", "field_help"]

_TRISTATE = {"auto": None, "on": True, "off": False}


def field_help(cls: type) -> dict[str, str]:
    """The ``#:`` comments of ``cls``'s fields (above a field or at the end of its line), by field name.

    Empty where the source cannot be read (e.g. a zipped install): the options then have no help.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    helps: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = lines[node.lineno - 1]
        parts = []
        above = node.lineno - 2
        while above >= 0 and lines[above].strip().startswith("#:"):
            parts.insert(0, lines[above].strip()[2:].strip())
            above -= 1
        if "#:" in line:
            parts.append(line.split("#:", 1)[1].strip())
        if parts:
            helps[node.target.id] = " ".join(parts).replace("%", "%%")  # argparse formats help with %
    return helps


def _optional_base(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(tp, False)``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"num_classes\": 10}}', got {text!r}")
    return value


def _maybe_none(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if text.lower() == "none":
            return None
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} value: {text!r}") from None

    convert.__name__ = what
    return convert


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    required: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> None:
    """Add one option per field of dataclass ``cls`` to ``parser``; defaults are the field defaults.

    ``aliases[name]`` replaces the option strings of field ``name`` (e.g. ``["--out", "--out-dir"]``),
    ``choices[name]`` restricts its values, ``required`` fields must be given, ``skip`` ones are left out.

    Raises:
        TypeError: a field's type has no command-line form (say which field).
    """
    aliases, choices = aliases or {}, choices or {}
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    group = parser.add_argument_group(f"{cls.__name__} options (every field of lobster_fx.train.{cls.__name__})")
    for f in fields(cls):
        if f.name in skip:
            continue
        flags = list(aliases.get(f.name, [f"--{f.name.replace('_', '-')}"]))
        default = f.default if f.default is not MISSING else None
        kwargs: dict[str, Any] = {"dest": f.name, "help": helps.get(f.name), "metavar": f.name.upper()}
        if f.name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        base, optional = _optional_base(hints[f.name])
        if base is bool and not optional:
            kwargs["action"] = argparse.BooleanOptionalAction
            del kwargs["metavar"]
        elif base is bool:
            kwargs.update(type=str.lower, choices=list(_TRISTATE), default={v: k for k, v in _TRISTATE.items()}
                          [default], metavar=None)
        elif base in (int, float):
            kwargs["type"] = _maybe_none(base, base.__name__) if optional else base
            kwargs["metavar"] = "N" if base is int else "X"
        elif base is str:
            kwargs["type"] = str
            if f.name in choices:
                kwargs.update(choices=list(choices[f.name]), metavar=None)
        elif typing.get_origin(base) is dict or base is dict:
            kwargs.update(type=_json_object, metavar="JSON")
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: type {hints[f.name]} has no command-line form")
        group.add_argument(*flags, **kwargs)


def dataclass_kwargs(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The field values ``args`` holds for ``cls`` (tri-state bools mapped back to None/True/False)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        base, optional = _optional_base(hints[f.name])
        if base is bool and optional and isinstance(value, str):
            value = _TRISTATE[value]
        out[f.name] = value
    return out
