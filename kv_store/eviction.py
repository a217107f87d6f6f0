"""Eviction policies: which block a full tier gives up next.

One small interface, many interchangeable policies. A policy only orders keys; the tier
decides what may go: ``pop_victim`` is given a ``can_evict`` predicate and skips keys it
rejects (blocks pinned by an in-flight request, parents whose children are cached).

Contract of every policy:

* ``insert`` starts tracking a key (a key already tracked counts as an access), with a
  ``BlockHint`` (its position in its prefix chain and its session's priority) that
  cost-aware policies weigh and the others ignore; ``access`` records a hit; ``remove`` stops tracking a key for any reason (a no-op for
  unknown keys).
* ``pop_victim`` returns the next key to evict, among those ``can_evict`` accepts, and
  stops tracking it; ``None`` when no tracked key may be evicted. Keys it skipped stay
  tracked. Asking for a victim is always safe: it never returns an untracked key.
* Policies are not thread-safe; the tier holding one serialises calls.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, NamedTuple

CanEvict = Callable[[bytes], bool]


class BlockHint(NamedTuple):
    """What a policy may weigh besides the order of accesses: ``position``, the block's
    index in its prefix chain (0: the first block of a prompt), ``priority``, its
    session's priority (0: none; higher keeps it longer), and ``parent``, the key of the
    block before it in its chain (None: the first, or not known)."""
    position: int = 0
    priority: float = 0.0
    parent: bytes | None = None


NO_HINT = BlockHint()


class EvictionPolicy(ABC):
    @abstractmethod
    def insert(self, key: bytes, hint: BlockHint = NO_HINT) -> None: ...

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

    def insert(self, key: bytes, hint: BlockHint = NO_HINT) -> None:
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

    def insert(self, key: bytes, hint: BlockHint = NO_HINT) -> None:
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


def _first_evictable(queue: OrderedDict, can_evict: CanEvict) -> bytes | None:
    """The oldest key of ``queue`` that ``can_evict`` accepts, or None."""
    return next((key for key in queue if can_evict(key)), None)


class ARCPolicy(EvictionPolicy):
    """ARC (Megiddo and Modha, FAST '03): a recency list ``T1`` (keys seen once) and a
    frequency list ``T2`` (keys hit again), each with a ghost list of keys it evicted
    (``B1``, ``B2``). A ghost hit says which list was cut too short and moves the target
    size ``p`` of ``T1`` towards it, so the split between recency and frequency adapts
    to the workload.

    The tier's capacity is in bytes, not keys: ``c`` (the cache size ARC adapts within)
    is the number of keys tracked now, and each ghost list keeps at most ``c`` keys.
    A victim comes from ``T1`` while it is longer than ``p`` (else from ``T2``); where
    ``can_evict`` rejects every key of that list, from the other.
    """

    def __init__(self) -> None:
        self._t1: OrderedDict[bytes, None] = OrderedDict()
        self._t2: OrderedDict[bytes, None] = OrderedDict()
        self._b1: OrderedDict[bytes, None] = OrderedDict()
        self._b2: OrderedDict[bytes, None] = OrderedDict()
        self.p = 0.0  # target length of T1

    def insert(self, key: bytes, hint: BlockHint = NO_HINT) -> None:
        if key in self._t1 or key in self._t2:
            self.access(key)
            return
        c = len(self) + 1
        if key in self._b1:  # evicted from T1 too early: give recency more room
            self.p = min(c, self.p + max(len(self._b2) / len(self._b1), 1.0))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:  # evicted from T2 too early: give frequency more room
            self.p = max(0.0, self.p - max(len(self._b1) / len(self._b2), 1.0))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None

    def access(self, key: bytes) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._t1.pop(key, None)
        self._t2.pop(key, None)

    def pop_victim(self, can_evict: CanEvict) -> bytes | None:
        lists = [(self._t1, self._b1), (self._t2, self._b2)]
        if not (self._t1 and len(self._t1) > self.p):
            lists.reverse()
        for queue, ghosts in lists:
            key = _first_evictable(queue, can_evict)
            if key is not None:
                del queue[key]
                ghosts[key] = None
                self._trim_ghosts()
                return key
        return None

    def _trim_ghosts(self) -> None:
        c = max(1, len(self))
        for ghosts in (self._b1, self._b2):
            while len(ghosts) > c:
                ghosts.popitem(last=False)

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)


class CostAwarePolicy(EvictionPolicy):
    """Keeps the blocks whose loss would cost the most: value = expected reuse × cost to
    recompute, as in GreedyDual-Size-Frequency (Cherkasova, 1998).

    * Expected reuse: the key's hits since it was inserted, plus one; a key that comes
      back soon after it was evicted starts from the count it left with (remembered for
      as many evicted keys as are tracked).
    * Cost to recompute: prefilling a block at chain ``position`` reads every token
      before it, so it costs ``1 + position_weight * position`` (``position_weight``: the
      attention work of one block of context relative to a block's own, per-token work);
      a session's ``priority`` multiplies it by ``1 + priority``.
    * Ageing: a key's value is ``clock + reuse × cost``, and the clock rises to the value
      of each victim, so blocks not hit for a while fall below newly inserted ones.
    * Chains: a block is worth no more than its parent (where the parent is tracked
      here): its value is capped at the parent's when set. The store never evicts a
      parent before its children, so a parent valued below its children would be
      offered, and refused, on every eviction (measured: a scan of long one-off prompts
      made each eviction walk every prompt's first blocks). With the cap a chain goes
      from its tail; among equal values the deepest block goes first, then the oldest.

    The lowest value goes first. Cost of an eviction: O(log n), plus the keys refused
    (pinned, or parents whose children live in another tier).
    """

    def __init__(self, position_weight: float = 0.125) -> None:
        self.position_weight = position_weight
        self._clock = 0.0
        self._keys: dict[bytes, tuple[BlockHint, int, float, int]] = {}  # hint, reuse, value, seq
        self._heap: list[tuple[float, int, int, bytes]] = []  # (value, -position, seq, key); stale rows skipped
        self._ghost: OrderedDict[bytes, int] = OrderedDict()  # evicted key -> its reuse count
        self._seq = itertools.count()

    def cost(self, hint: BlockHint) -> float:
        return (1.0 + self.position_weight * hint.position) * (1.0 + max(hint.priority, 0.0))

    def _set(self, key: bytes, hint: BlockHint, reuse: int) -> None:
        value = self._clock + reuse * self.cost(hint)
        parent = self._keys.get(hint.parent) if hint.parent is not None else None
        if parent is not None:
            value = min(value, parent[2])
        seq = next(self._seq)
        self._keys[key] = (hint, reuse, value, seq)
        heapq.heappush(self._heap, (value, -hint.position, seq, key))
        if len(self._heap) > 4 * len(self._keys) + 64:  # drop the stale rows now and then
            self._heap = [(v, -h.position, s, k) for k, (h, _, v, s) in self._keys.items()]
            heapq.heapify(self._heap)

    def insert(self, key: bytes, hint: BlockHint = NO_HINT) -> None:
        if key in self._keys:
            self.access(key)
            return
        self._set(key, hint, self._ghost.pop(key, 0) + 1)

    def access(self, key: bytes) -> None:
        row = self._keys.get(key)
        if row is not None:
            self._set(key, row[0], row[1] + 1)

    def remove(self, key: bytes) -> None:
        self._keys.pop(key, None)  # its heap rows are stale from now on

    def pop_victim(self, can_evict: CanEvict) -> bytes | None:
        skipped: list[tuple[float, int, int, bytes]] = []
        victim = None
        while self._heap:
            row = heapq.heappop(self._heap)
            value, _, seq, key = row
            current = self._keys.get(key)
            if current is None or current[3] != seq:
                continue  # stale
            if can_evict(key):
                self._clock = max(self._clock, value)
                del self._keys[key]
                self._ghost[key] = current[1]
                while len(self._ghost) > max(1, len(self._keys)):
                    self._ghost.popitem(last=False)
                victim = key
                break
            skipped.append(row)
        for row in skipped:
            heapq.heappush(self._heap, row)
        return victim

    def __len__(self) -> int:
        return len(self._keys)


POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy, "s3fifo": S3FIFOPolicy, "arc": ARCPolicy, "cost": CostAwarePolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None
