"""The packed extent table of a Locate reply (``kv_store.extent_table``)."""

from __future__ import annotations

import pytest

from kvmesh.kv_store import extent_table


def test_the_keys_held_come_back_with_their_extents():
    """Keys held among those asked (a duplicate, a miss, checksums over 2**63) come back
    each with its own offset, size and checksum; the misses do not come back."""
    keys = [b"a" * 32, b"b" * 32, b"c" * 32, b"a" * 32, b"d" * 32]
    where = {b"a" * 32: (4096, 100, 2**64 - 1), b"c" * 32: (0, 7, 12345), b"d" * 32: (2**40, 1, 2**63)}
    table = extent_table.pack(keys, where)
    assert len(table) == 32 * len(where)
    assert extent_table.unpack(keys, table) == where
    assert extent_table.pack(keys, {}) == b"" and extent_table.unpack(keys, b"") == {}


def test_a_malformed_table_is_refused():
    keys = [b"a" * 32]
    table = extent_table.pack(keys, {b"a" * 32: (1, 2, 3)})
    with pytest.raises(ValueError, match="whole rows"):
        extent_table.unpack(keys, table[:-1])
    with pytest.raises(ValueError, match="beyond"):
        extent_table.unpack([], table)
