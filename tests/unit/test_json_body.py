"""Request bodies into JSON values (``router.json_body.parse_json``): what is refused, as a
400 with a reason, and what passes unchanged."""

from __future__ import annotations

import json

import pytest

from kvmesh.router.core import ApiError
from kvmesh.router.json_body import MAX_DEPTH, parse_json


def refused(raw: bytes) -> str:
    with pytest.raises(ApiError) as e:
        parse_json(raw)
    assert e.value.status == 400
    return e.value.message


def test_json_as_clients_send_it_passes_unchanged():
    body = {"prompt": "héllo 😀 \\ud800 is just text here", "stop": ["\n"], "max_tokens": 3,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 100}]}]}
    for raw in (json.dumps(body).encode(), json.dumps(body, ensure_ascii=False).encode()):
        assert parse_json(raw) == body  # ensure_ascii writes the emoji as a surrogate pair
    deepest = b'{"junk": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"  # MAX_DEPTH levels
    assert parse_json(deepest)["junk"]
    brackets = {"prompt": "[{" * 1000}  # brackets inside strings are no nesting
    assert parse_json(json.dumps(brackets).encode()) == brackets


def test_bodies_that_are_not_utf8_json_are_refused():
    assert "not valid UTF-8" in refused(b'{"prompt": "\xff\xfe"}')
    assert "not valid UTF-8" in refused('{"prompt": "é"}'.encode("latin-1"))
    assert "not valid UTF-8" in refused(b'{"prompt": "\xed\xa0\x80"}')  # a UTF-8-coded surrogate
    assert "not valid UTF-8" in refused('{"prompt": "x"}'.encode("utf-16"))
    assert "byte-order mark" in refused(b'\xef\xbb\xbf{"prompt": "x"}')
    assert "not valid JSON" in refused(b'{"prompt": ')
    assert "not valid JSON" in refused(b"")
    assert "not valid JSON" in refused(b'{"max_tokens": 1' + b"0" * 5000 + b"}")


def test_deep_nesting_is_refused_however_deep():
    for depth in (MAX_DEPTH, 900, 100_000):  # with the object around them: one more level
        for open_, close in ((b"[", b"]"), (b'{"a":', b"}")):
            raw = b'{"prompt": "x", "junk": ' + open_ * depth + b"1" + close * depth + b"}"
            assert "nested deeper than" in refused(raw), depth


def test_lone_surrogates_are_refused_in_values_and_keys():
    for raw in (b'{"prompt": "\\ud800"}', b'{"stop": ["ok", "a\\udfffb"]}',
                b'{"messages": [{"role": "user", "content": "\\uDBFF"}]}',
                b'{"\\ud800": 1}', b'{"x": "\\ude00\\ud83d"}'):
        assert "lone surrogate" in refused(raw), raw
    assert parse_json(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "😀"}
    assert parse_json(b'{"prompt": "\\\\ud800"}') == {"prompt": "\\ud800"}
