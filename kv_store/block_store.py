"""Block storage behind one small interface, and the host-RAM LRU store (v0).

Contract of every ``BlockStore``:

* ``put`` stores a block or rejects it (too large for the store); it may evict other
  blocks to make room. Re-putting a key replaces its bytes.
* ``get`` returns the stored ``StoredBlock`` or ``None``; it never returns bytes other than
  those put under that key (the checksum travels with them for the reader to verify).
* ``lookup`` counts the leading key groups whose every key is present; it is a hint:
  a block may be evicted between a lookup and a get, and the reader must treat that as
  a miss.
* All methods are thread-safe.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence


class StoredBlock(NamedTuple):
    data: bytes
    checksum: int


@dataclass
class StoreStats:
    capacity_bytes: int = 0
    used_bytes: int = 0
    blocks: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    puts: int = 0
    rejected: int = 0


class BlockStore(ABC):
    @abstractmethod
    def put(self, key: bytes, data: bytes, checksum: int) -> bool:
        """Store a block; False if it can never fit."""

    @abstractmethod
    def get(self, key: bytes) -> StoredBlock | None:
        """The block under ``key``, or None (counted as a miss)."""

    @abstractmethod
    def lookup(self, groups: Sequence[Sequence[bytes]]) -> int:
        """Number of leading groups whose keys are all present."""

    @abstractmethod
    def drop(self, keys: Iterable[bytes] | None = None) -> int:
        """Remove the given keys (all blocks when None); returns how many were removed."""

    @abstractmethod
    def stats(self) -> StoreStats:
        """A snapshot of the counters."""


@dataclass
class HostLRUStore(BlockStore):
    """Blocks in host RAM up to ``capacity_bytes``, least recently used evicted first."""

    capacity_bytes: int
    _blocks: OrderedDict[bytes, StoredBlock] = field(default_factory=OrderedDict)
    _stats: StoreStats = field(default_factory=StoreStats)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self._stats.capacity_bytes = self.capacity_bytes

    def put(self, key: bytes, data: bytes, checksum: int) -> bool:
        size = len(data)
        with self._lock:
            if size > self.capacity_bytes:
                self._stats.rejected += 1
                return False
            old = self._blocks.pop(key, None)
            if old is not None:
                self._stats.used_bytes -= len(old.data)
            while self._stats.used_bytes + size > self.capacity_bytes:
                _, evicted = self._blocks.popitem(last=False)
                self._stats.used_bytes -= len(evicted.data)
                self._stats.evictions += 1
            self._blocks[key] = StoredBlock(data, checksum)
            self._stats.used_bytes += size
            self._stats.puts += 1
            return True

    def get(self, key: bytes) -> StoredBlock | None:
        with self._lock:
            block = self._blocks.get(key)
            if block is None:
                self._stats.misses += 1
                return None
            self._blocks.move_to_end(key)
            self._stats.hits += 1
            return block

    def lookup(self, groups: Sequence[Sequence[bytes]]) -> int:
        with self._lock:
            for n, group in enumerate(groups):
                if not all(k in self._blocks for k in group):
                    return n
            return len(groups)

    def drop(self, keys: Iterable[bytes] | None = None) -> int:
        with self._lock:
            if keys is None:
                n = len(self._blocks)
                self._blocks.clear()
                self._stats.used_bytes = 0
                return n
            n = 0
            for key in keys:
                block = self._blocks.pop(key, None)
                if block is not None:
                    self._stats.used_bytes -= len(block.data)
                    n += 1
            return n

    def replace(self, key: bytes, block: StoredBlock) -> bool:
        """Overwrite an existing block in place (fault injection); False if absent."""
        with self._lock:
            old = self._blocks.get(key)
            if old is None or len(old.data) != len(block.data):
                return False
            self._blocks[key] = block
            return True

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._blocks)

    def stats(self) -> StoreStats:
        with self._lock:
            self._stats.blocks = len(self._blocks)
            return StoreStats(**vars(self._stats))
