"""What every component's settings type is made of.

Each component (store, prefill and decode worker, router) has one frozen settings type,
a ``Settings`` subclass: each field's name, type, default, bounds and help live there
once. The ``kvmesh`` command line, the cluster YAML, the local launcher and the Ray
actors are all derived from those types (``kvmesh.cluster.settings_cli`` turns them into
flags and back), so a field added here appears everywhere without further edits.

The value types below carry their own parsing, so a setting reads the same from a flag
(``"2GiB"``), a YAML value (``2GiB`` or an integer) or Python: ``Bytes``/``BytesOrZero``
(sizes), ``Seconds`` (finite durations above 0), ``Port``/``PortOrZero``, ``Address``
(``HOST:PORT``), ``Names`` (a comma-separated list or a list). Field metadata that only
the command line needs goes in ``json_schema_extra``: ``flag`` (a name other than the
field's), ``cli`` (False: not a flag, e.g. what a launcher sets).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from kvmesh_proto.options import split_host_port

DEFAULT_HOST = "127.0.0.1"
SECRET_ENV = "KVMESH_CLUSTER_SECRET"  # kvmesh.kv_store.auth reads it

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class Settings(BaseModel):
    """Base of every settings type: frozen, unknown names refused, values validated on
    construction (a bad value raises ``pydantic.ValidationError`` naming the field)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def changed(self) -> dict[str, Any]:
        """The fields whose value differs from their default, by name."""
        return {name: value for name, value in self if value != type(self).model_fields[name].default}


def parse_bytes(text: str | int, zero_ok: bool = False) -> int:
    """``"512MiB"``, ``"2G"``, ``"1048576"`` or an int -> bytes; ``ValueError`` otherwise
    (and for 0 unless ``zero_ok``, and for anything negative)."""
    if isinstance(text, bool):
        raise ValueError("expected a size such as 512MiB or 2GiB")
    if isinstance(text, int):
        value = text
    elif isinstance(text, str):
        m = _SIZE.match(text)
        if not m:
            raise ValueError(f"not a size: {text!r} (try 512MiB or 2GiB)")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()[:1]])
    else:
        raise ValueError("expected a size such as 512MiB or 2GiB")
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError("size must not be negative" if zero_ok else "size must be positive")
    return value


def _seconds(value: float) -> float:
    if not 0.0 < value < math.inf:
        raise ValueError(f"must be a finite number of seconds above 0: {value}")
    return value


def _address(value: str) -> str:
    split_host_port(value)  # ValueError with the reason
    return value


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise ValueError("must be a power of two, e.g. 4MiB")
    return value


class Kind(str):
    """A marker in a type's ``Annotated`` metadata telling the command line how to read
    and write the value: ``"bytes"`` (a size), ``"names"`` (comma-separated)."""


Bytes = Annotated[int, BeforeValidator(lambda v: parse_bytes(v)), Kind("bytes")]
BytesOrZero = Annotated[int, BeforeValidator(lambda v: parse_bytes(v, zero_ok=True)), Kind("bytes")]
PowerOfTwoBytes = Annotated[Bytes, AfterValidator(_power_of_two)]
Seconds = Annotated[float, AfterValidator(_seconds)]
Port = Annotated[int, Field(ge=1, le=65535)]
PortOrZero = Annotated[int, Field(ge=0, le=65535)]
Address = Annotated[str, AfterValidator(_address)]
Names = Annotated[tuple[str, ...], BeforeValidator(_names), Kind("names")]
Addresses = Annotated[tuple[Address, ...], BeforeValidator(_names), Kind("names")]


def one_of(choices: tuple[str, ...], what: str):
    """A validator for names that must all be among ``choices`` (a registry's keys)."""
    def check(values: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(choices)}")
        return values
    return AfterValidator(check)


def cluster_secret_file_field():
    """The ``cluster_secret_file`` setting every component has (``kvmesh.kv_store.auth``):
    a path, never the secret itself, so the secret stays out of flags and settings."""
    return Field(None, description=(
        "file holding the cluster secret that every internal call must carry (default: "
        f"the {SECRET_ENV} environment variable; neither: internal calls are not authenticated)"),
        json_schema_extra={"metavar": "PATH"})
