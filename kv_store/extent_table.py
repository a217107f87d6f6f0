"""The packed extent table of a ``Locate`` reply: where each leased block lies in the arena.

One row per key held, in request order: four little-endian uint64s (the key's index among
the request's keys, its offset and size in the host arena, its checksum), 32 bytes a key.
A lease of a 2,000-token prompt names about 500 keys; as one message per key the reply
cost more to build and read than the lease itself.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

_ROW = np.dtype("<u8")
_COLUMNS = 4


def pack(keys: Sequence[bytes], where: Mapping[bytes, tuple[int, int, int]]) -> bytes:
    """The table of ``where`` (key -> offset, size, checksum; its keys among ``keys``, in
    their order), each row naming an index of ``keys`` that holds its key."""
    index = dict(zip(keys, range(len(keys))))
    rows = [(index[k], offset, size, crc) for k, (offset, size, crc) in where.items()]
    return np.array(rows, dtype=_ROW).tobytes() if rows else b""


def unpack(keys: Sequence[bytes], table: bytes) -> dict[bytes, tuple[int, int, int]]:
    """Key -> (offset, size, checksum) from a table ``pack`` made for these ``keys``.
    ``ValueError`` when it is not one (a length not a multiple of a row, an index out of
    range)."""
    if len(table) % (_ROW.itemsize * _COLUMNS):
        raise ValueError(f"an extent table of {len(table)} bytes is not whole rows")
    rows = np.frombuffer(table, dtype=_ROW).reshape(-1, _COLUMNS).tolist()
    try:
        return {keys[i]: (offset, size, crc) for i, offset, size, crc in rows}
    except IndexError:
        raise ValueError(f"an extent table names a key beyond the {len(keys)} asked for") from None
