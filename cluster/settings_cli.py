"""Command-line flags derived from settings types, and back.

``add_flags(parser, SettingsType)`` adds one flag per field: ``--field-name`` (or the
field's ``flag``), its help and default from the field, choices from a ``Literal``,
``--x/--no-x`` for a bool. Values stay strings until ``from_args`` builds the settings, so
a flag, a YAML value and Python are validated by the same type; a bad value is an argparse
error naming the flag. ``to_argv(settings)`` writes a settings object back as the flags
that recreate it (only fields that differ from their default), which is how the local
launcher starts components: a field added to a settings type needs no edit here.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Iterable

from pydantic import TypeAdapter, ValidationError

from kvmesh.kv_store.settings_base import Kind, Settings


def flag_name(cls: type[Settings], name: str) -> str:
    extra = cls.model_fields[name].json_schema_extra or {}
    return "--" + extra.get("flag", name).replace("_", "-")


def cli_fields(cls: type[Settings], skip: Iterable[str] = ()) -> list[str]:
    """The fields of ``cls`` that are flags (not skipped, not marked ``cli: False``)."""
    skip = set(skip)
    return [name for name, f in cls.model_fields.items()
            if name not in skip and (f.json_schema_extra or {}).get("cli", True)]


def _base(annotation: Any) -> Any:
    """``Optional[X]`` -> ``X``; ``Annotated[X, ...]`` keeps its metadata."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _kind(field) -> str | None:
    kinds = [m for m in field.metadata if isinstance(m, Kind)]
    base = _base(field.annotation)
    if typing.get_origin(base) is typing.Annotated:
        kinds += [m for m in typing.get_args(base)[1:] if isinstance(m, Kind)]
    return str(kinds[0]) if kinds else None


def _show(value: Any, kind: str | None) -> str:
    if value is None:
        return "none"
    if kind == "bytes" and isinstance(value, int) and value:
        for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{value // size}{unit}"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _checked(field) -> Any:
    """An argparse ``type`` that validates one flag's value as its field would, so a bad
    value is refused while parsing, naming the flag (``argument --heartbeat: ...``)."""
    adapter = TypeAdapter(typing.Annotated[field.annotation, *field.metadata]) \
        if field.metadata else TypeAdapter(field.annotation)

    def check(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as e:
            raise argparse.ArgumentTypeError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
    return check


def _metavar(field, kind: str | None) -> str | None:
    base = _base(field.annotation)
    if kind == "bytes":
        return "SIZE"
    if kind == "names":
        return "A,B,..."
    if typing.get_origin(base) is typing.Annotated:
        base = typing.get_args(base)[0]
    return {int: "N", float: "X", str: None}.get(base)


def add_flags(parser: argparse.ArgumentParser, cls: type[Settings], skip: Iterable[str] = ()) -> None:
    """One flag per field of ``cls``. Flags left out are absent from the parsed namespace,
    so the settings type's own defaults apply."""
    for name in cli_fields(cls, skip):
        field = cls.model_fields[name]
        kind = _kind(field)
        help_text = field.description or ""
        if "default:" not in help_text:
            help_text += f" (default: {_show(field.default, kind)})"
        extra = field.json_schema_extra or {}
        options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        base = _base(field.annotation)
        if base is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _checked(field)
            if typing.get_origin(base) is typing.Literal:
                options["choices"] = list(typing.get_args(base))
                options["type"] = str
            metavar = extra.get("metavar", _metavar(field, kind))
            if metavar:
                options["metavar"] = metavar
        parser.add_argument(flag_name(cls, name), **options)


def from_args(cls: type[Settings], args: argparse.Namespace, parser: argparse.ArgumentParser,
              **fixed: Any) -> Settings:
    """``cls`` from the flags given (plus ``fixed`` values); a bad value exits through
    ``parser.error`` with the flag's name and the reason."""
    given = {name: getattr(args, name) for name in cls.model_fields if hasattr(args, name)}
    try:
        return cls(**{**given, **fixed})
    except ValidationError as e:
        parser.error("; ".join(describe(cls, err) for err in e.errors()))


def describe(cls: type[Settings], err: dict) -> str:
    """One validation error, named as the flag it came from."""
    message = err["msg"].removeprefix("Value error, ")
    if err["loc"] and err["loc"][0] in cls.model_fields:
        return f"{flag_name(cls, err['loc'][0])}: {message}"
    return message


def to_argv(settings: Settings, skip: Iterable[str] = ()) -> list[str]:
    """The flags that recreate ``settings`` through ``add_flags`` / ``from_args``: one per
    field that differs from its default (skipped and non-flag fields left out)."""
    cls = type(settings)
    out: list[str] = []
    changed = settings.changed()
    for name in cli_fields(cls, skip):
        if name not in changed:
            continue
        value, flag = changed[name], flag_name(cls, name)
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            raise ValueError(f"{flag} cannot be set back to none on the command line")
        elif isinstance(value, tuple):
            out.append(f"{flag}={','.join(map(str, value))}")
        else:
            out.append(f"{flag}={value}")
    return out
