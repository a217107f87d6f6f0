"""Request bodies as JSON the rest of the router can trust.

``parse_json(raw)`` is the one place an HTTP request body becomes a Python value. It
raises ``ApiError(400)`` with a message saying what is wrong, and never anything else,
for a body that:

* is not UTF-8 (JSON's only encoding on the wire, RFC 8259), a byte-order mark included;
* is not JSON, or has a number Python refuses (an integer of more than 4300 digits);
* is nested deeper than ``MAX_DEPTH`` arrays and objects;
* holds a string (a value or a key) with a lone UTF-16 surrogate escape such as
  ``"\\ud800"``: valid JSON grammar, but no Unicode text, so it could be neither
  tokenized, nor sent to a worker, nor echoed back.

Everything else comes back as ``json.loads`` gives it. The checks cost one pass over the
parsed value only when the text shows it may be needed (more opening brackets than
``MAX_DEPTH``, or a surrogate escape), so a large prompt costs one decode and one parse.

``JsonRoute`` makes FastAPI's request-body parsing use it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from fastapi import HTTPException, Request
from fastapi.routing import APIRoute

from kvmesh.router.core import ApiError

MAX_DEPTH = 64  # OpenAI request bodies nest about 5 deep (messages, content parts, tool calls)

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> Any:
    """The JSON value of ``raw``; ``ApiError(400)`` for anything but UTF-8 JSON of Unicode
    strings nested at most ``MAX_DEPTH`` deep (the module's docstring lists the cases)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    if text.startswith("\ufeff"):
        raise ApiError(400, "the request body starts with a byte-order mark; JSON must not")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} "
                            f"column {e.colno}") from None
    except RecursionError:
        raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # e.g. an integer past Python's digit limit
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    deep = text.count("[") + text.count("{") > MAX_DEPTH
    if deep or _SURROGATE_ESCAPE.search(text):
        _check(value)
    return value


def _check(value: Any) -> None:
    """Walk ``value`` (without recursion): ``ApiError(400)`` past ``MAX_DEPTH`` levels or at
    a string that is not Unicode text."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
            continue
        if not isinstance(item, (list, dict)):
            continue
        if depth > MAX_DEPTH:
            raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            for key in item:
                _check_text(key)
            children = item.values()
        else:
            children = item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (str, list, dict)))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"the request body has a string with a lone surrogate "
                            f"(\\u{ord(text[e.start]):04x}): not Unicode text") from None


class JsonRequest(Request):
    """A request whose ``json()`` is ``parse_json`` of its body. Its ``ApiError`` goes out as
    an ``HTTPException`` (the one kind FastAPI lets through its body parsing unchanged),
    which the app answers in its own error shape."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json(await self.body())
            except ApiError as e:
                raise HTTPException(e.status, e.message) from None
        return self._json


class JsonRoute(APIRoute):
    """An ``APIRoute`` whose endpoints read JSON bodies with ``parse_json``."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def with_checked_json(request: Request):
            return await handler(JsonRequest(request.scope, request.receive))

        return with_checked_json
