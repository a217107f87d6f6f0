"""The interface every block store implements.

Contract:

* ``put`` stores a block or rejects it (no room that can be made); it may evict or move
  other blocks to make room. Re-putting a key replaces its bytes. ``parent`` names the
  previous block of the same chain, which then outlives this one.
* ``get_many`` returns, for the keys it holds, exactly the bytes put under them with
  their checksum; it never returns other bytes. A key it does not return is a miss.
* ``lookup`` counts the leading key groups whose every key is present. It is a hint: a
  block may go between a lookup and a get, and the reader must treat that as a miss.
* All methods are thread-safe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, NamedTuple, Sequence


class StoredBlock(NamedTuple):
    data: bytes
    checksum: int


class BlockStore(ABC):
    @abstractmethod
    def put(self, key: bytes, data: bytes, checksum: int, parent: bytes | None = None,
            session: str | None = None) -> bool:
        """Store a block (of ``session``, the id of the session it belongs to, where the
        store keeps sessions; ignored where it does not); False if it was rejected."""

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, StoredBlock]:
        """The blocks held among ``keys``; the others are misses."""

    @abstractmethod
    def lookup(self, groups: Sequence[Sequence[bytes]], session: str | None = None) -> int:
        """Number of leading groups whose keys are all present (for ``session``, as ``put``
        says)."""

    @abstractmethod
    def drop(self, keys: Iterable[bytes] | None = None) -> int:
        """Remove the given keys (all blocks when None); returns how many were removed."""

    @abstractmethod
    def replace(self, key: bytes, block: StoredBlock) -> bool:
        """Overwrite a held block's bytes and checksum (fault injection); False if absent."""

    @abstractmethod
    def keys(self) -> list[bytes]:
        """The keys held now."""

    def get(self, key: bytes) -> StoredBlock | None:
        return self.get_many([key]).get(key)
