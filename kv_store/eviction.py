"""Eviction policies: which block a full tier gives up next.

One small interface, many interchangeable policies. A policy only orders keys; the tier
decides what may go: ``pop_victim`` is given a ``can_evict`` predicate and skips keys it
rejects (blocks pinned by an in-flight request, parents whose children are cached).

Contract of every policy:

* ``insert`` starts tracking a key (a key already tracked counts as an access);
  ``access`` records a hit; ``remove`` stops tracking a key for any reason (a no-op for
  unknown keys).
* ``pop_victim`` returns the next key to evict, among those ``can_evict`` accepts, and
  stops tracking it; ``None`` when no tracked key may be evicted. Keys it skipped stay
  tracked. Asking for a victim is always safe: it never returns an untracked key.
* Policies are not thread-safe; the tier holding one serialises calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable

CanEvict = Callable[[bytes], bool]


class EvictionPolicy(ABC):
    @abstractmethod
    def insert(self, key: bytes) -> None: ...

    @abstractmethod
    def access(self, key: bytes) -> None: ...

    @abstractmethod
    def remove(self, key: bytes) -> None: ...

    @abstractmethod
    def pop_victim(self, can_evict: CanEvict) -> bytes | None: ...

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def pop_victim(self, can_evict: CanEvict) -> bytes | None:
        for key in self._order:
            if can_evict(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP '23): frequency-aware, scan-resistant, FIFO-cheap.

    New keys enter a small FIFO (``small_ratio`` of the tracked keys). A key leaving the
    small queue moves to the main FIFO if it was hit since insertion, else it is evicted
    and remembered in a ghost list; a ghost that comes back goes straight to main. Keys
    leaving main are reinserted while their (capped) hit count is positive, decremented
    each time. One-hit wonders (a long scan) so never push out the reused working set.
    """

    MAX_FREQ = 3

    def __init__(self, small_ratio: float = 0.1) -> None:
        self.small_ratio = small_ratio
        self._small: OrderedDict[bytes, None] = OrderedDict()
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._freq: dict[bytes, int] = {}

    def insert(self, key: bytes) -> None:
        if key in self._freq:
            self.access(key)
            return
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def access(self, key: bytes) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, self.MAX_FREQ)

    def remove(self, key: bytes) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def _remember_ghost(self, key: bytes) -> None:
        self._ghost[key] = None
        while len(self._ghost) > max(1, len(self._freq)):
            self._ghost.popitem(last=False)

    def pop_victim(self, can_evict: CanEvict) -> bytes | None:
        # Each key is looked at a bounded number of times, so this ends even when
        # nothing may be evicted.
        budget = (len(self._freq) + 1) * (self.MAX_FREQ + 2)
        skipped: list[tuple[OrderedDict, bytes]] = []
        victim = None
        while budget > 0 and (self._small or self._main):
            budget -= 1
            use_small = self._small and (len(self._small) >= self.small_ratio * len(self._freq)
                                         or not self._main)
            queue = self._small if use_small else self._main
            key, _ = queue.popitem(last=False)
            if use_small and self._freq[key] > 0:
                self._freq[key] = 0
                self._main[key] = None
            elif not use_small and self._freq[key] > 0:
                self._freq[key] -= 1
                self._main[key] = None
            elif can_evict(key):
                del self._freq[key]
                if use_small:
                    self._remember_ghost(key)
                victim = key
                break
            else:
                skipped.append((queue, key))
        for queue, key in reversed(skipped):  # skipped keys keep their place at the front
            queue[key] = None
            queue.move_to_end(key, last=False)
        return victim

    def __len__(self) -> int:
        return len(self._freq)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "s3fifo": S3FIFOPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None
