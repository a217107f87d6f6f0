"""The tiered block store: GPU ▸ host RAM ▸ disk, fastest first.

Placement: a put lands in the fastest tier. When a tier has no room, its policy's
victims move one tier down (write-back); the slowest tier evicts them from the store. A
hit in a slower tier promotes the block back to the fastest tier.

Guarantees:

* ``get`` returns exactly the bytes put under the key, or nothing: bytes read back from
  a tier that is not host RAM (to serve them, or to move them to another tier) are
  checked against the block's checksum, and a mismatch or a failed read is dropped and
  counted (``corrupt``), never returned or moved.
* A block pinned by an in-flight read is never evicted, moved or freed; ``drop`` or a
  re-put of a pinned block takes effect when the last pin goes (the reader still gets
  the old bytes). ``with store.pinned(keys)`` pins for the duration of a block.
* A parent block (the block before it in its chain) is never evicted while a child that
  names it is stored; it may still move to a slower tier.
* Every slot is freed exactly once: after everything is dropped and unpinned, every
  tier's used bytes are back to zero.

Thread-safe: metadata changes happen under one lock; reads copy bytes outside it,
protected by pins.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from kv_store.block_store import BlockStore, StoredBlock
from kv_store.eviction import EvictionPolicy, make_policy
from kv_store.integrity import verify
from kv_store.slab import Slot
from kv_store.tiers import HostTier, Tier

log = logging.getLogger("kvmesh.store")

@dataclass(eq=False)
class _Entry:
    key: bytes
    size: int
    checksum: int
    parent: bytes | None
    tier: int
    slot: Slot
    pins: int = 0
    dead: bool = False  # dropped or replaced while pinned: free when unpinned


@dataclass
class TierStats:
    name: str
    capacity_bytes: int = 0
    used_bytes: int = 0
    held_bytes: int = 0
    blocks: int = 0
    fragmentation: float = 0.0
    hits: int = 0
    evictions: int = 0
    demotions: int = 0   # blocks moved out of this tier to a slower one
    promotions: int = 0  # blocks moved into this tier from a slower one
    read_bytes: int = 0
    read_seconds: float = 0.0
    write_bytes: int = 0
    write_seconds: float = 0.0


@dataclass
class TieredStoreStats:
    tiers: list[TierStats] = field(default_factory=list)
    misses: int = 0
    corrupt: int = 0
    rejected: int = 0
    puts: int = 0

    @property
    def used_bytes(self) -> int:
        return sum(t.used_bytes for t in self.tiers)

    @property
    def capacity_bytes(self) -> int:
        return sum(t.capacity_bytes for t in self.tiers)

    @property
    def blocks(self) -> int:
        return sum(t.blocks for t in self.tiers)

    @property
    def hits(self) -> int:
        return sum(t.hits for t in self.tiers)

    @property
    def evictions(self) -> int:
        return sum(t.evictions for t in self.tiers)


class TieredStore(BlockStore):
    def __init__(self, tiers: Sequence[Tier], policy: str = "lru",
                 listener: Callable[[str, bytes, str | None], None] | None = None):
        """``listener(kind, key, tier)`` hears every change of what is held: ``"stored"``
        (with the tier now holding the key) and ``"removed"``. It is called under the
        store's lock, so it must only record the event (e.g. put it on a queue)."""
        if not tiers:
            raise ValueError("a store needs at least one tier")
        self.listener = listener
        self.tiers = list(tiers)
        self._policies: list[EvictionPolicy] = [make_policy(policy) for _ in self.tiers]
        self._stats = [TierStats(t.name) for t in self.tiers]
        self._entries: dict[bytes, _Entry] = {}
        self._children: dict[bytes, int] = {}  # parent key -> stored children naming it
        self._lock = threading.RLock()
        self._misses = self._corrupt = self._rejected = self._puts = 0
        self._leases: dict[int, tuple[float, list[_Entry]]] = {}
        self._lease_seq = 0

    # ------------------------------------------------------------------ placement

    def _can_evict(self, key: bytes) -> bool:
        entry = self._entries[key]
        return entry.pins == 0 and self._children.get(key, 0) == 0

    def _can_move(self, key: bytes) -> bool:
        return self._entries[key].pins == 0

    def _make_room(self, tier: int, nbytes: int) -> Slot | None:
        """A slot in ``tier``, moving its victims down (or out, from the last tier)."""
        allocator = self.tiers[tier].allocator
        size_class = allocator.slot_size_for(nbytes)
        if size_class is None:
            return None
        while True:
            slot = allocator.alloc(nbytes)
            if slot is not None:
                return slot
            last = tier == len(self.tiers) - 1
            allowed = self._can_evict if last else self._can_move
            policy = self._policies[tier]
            victim = policy.pop_victim(
                lambda k: allowed(k) and self._entries[k].slot.size == size_class)
            if victim is None:  # a page may still free up from another size class
                victim = policy.pop_victim(allowed)
            if victim is None:
                return None
            if last or not self._move(self._entries[victim], tier + 1):
                if not self._can_evict(victim):  # could neither move nor evict it
                    policy.insert(victim)
                    return None
                self._evict(self._entries[victim])

    def _move(self, entry: _Entry, tier: int, data: bytes | None = None) -> bool:
        """Move an unpinned block to ``tier`` (making room there); False if no room.

        ``data``: the block's bytes, already read and verified by the caller (saves
        reading them again). A block whose bytes fail their checksum on the way is dropped
        and counted as corrupt instead; that returns True too (its old slot is free), so
        callers that go on using the entry check ``entry.dead``."""
        entry.pins += 1  # making room below must not pick this very block
        try:
            slot = self._make_room(tier, entry.size)
        finally:
            entry.pins -= 1
        if slot is None:
            return False
        if not self._copy(entry, tier, slot, data):
            self.tiers[tier].allocator.free(slot, entry.size)
            self._corrupt += 1
            self._forget(entry)
            return True
        old_tier = entry.tier
        self.tiers[old_tier].allocator.free(entry.slot, entry.size)
        self._policies[old_tier].remove(entry.key)
        if tier > old_tier:
            self._stats[old_tier].demotions += 1
        else:
            self._stats[tier].promotions += 1
        entry.tier, entry.slot = tier, slot
        self._policies[tier].insert(entry.key)
        self._tell("stored", entry.key, self.tiers[tier].name)
        return True

    def _copy(self, entry: _Entry, tier: int, slot: Slot, data: bytes | None) -> bool:
        """Copy the block into ``slot`` of ``tier``, straight out of or into the host
        arena where one side is host RAM. Bytes read from a tier that is not host RAM
        are verified; False if they fail (or cannot be read), and nothing is written."""
        src, dst, size = self.tiers[entry.tier], self.tiers[tier], entry.size
        if data is None and isinstance(src, HostTier):
            with src.view(entry.slot, size) as view:
                dst.write(slot, view)
            return True
        try:
            if data is None and isinstance(dst, HostTier):
                with dst.view(slot, size) as view:
                    src.read_into(entry.slot, size, view)
                    return verify(view, entry.checksum)
            if data is None:
                data = src.read(entry.slot, size)
                if not verify(data, entry.checksum):
                    return False
        except OSError as e:
            log.warning("%s tier: cannot read a block back: %s", src.name, e)
            return False
        dst.write(slot, data)
        return True

    def _evict(self, entry: _Entry) -> None:
        self._stats[entry.tier].evictions += 1
        self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        """Remove an entry from the index and free its slot, or defer the free while pinned."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self._tell("removed", entry.key, None)
            self._policies[entry.tier].remove(entry.key)
            if entry.parent is not None:
                left = self._children.get(entry.parent, 0) - 1
                if left > 0:
                    self._children[entry.parent] = left
                else:
                    self._children.pop(entry.parent, None)
        entry.dead = True
        if entry.pins == 0:
            self._free_slot(entry)

    def _tell(self, kind: str, key: bytes, tier: str | None) -> None:
        if self.listener is not None:
            self.listener(kind, key, tier)

    def _free_slot(self, entry: _Entry) -> None:
        if entry.slot is not None:
            self.tiers[entry.tier].allocator.free(entry.slot, entry.size)
            entry.slot = None

    # ------------------------------------------------------------------ BlockStore

    def put(self, key: bytes, data: bytes, checksum: int, parent: bytes | None = None) -> bool:
        with self._lock:
            slot = self._make_room(0, len(data))
            if slot is None:
                self._rejected += 1
                return False
            self.tiers[0].write(slot, data)
            old = self._entries.get(key)
            if old is not None:
                self._forget(old)
            entry = _Entry(key, len(data), checksum, parent, 0, slot)
            self._entries[key] = entry
            if parent is not None:
                self._children[parent] = self._children.get(parent, 0) + 1
            self._policies[0].insert(key)
            self._puts += 1
            self._tell("stored", key, self.tiers[0].name)
            return True

    @contextmanager
    def pinned(self, keys: Iterable[bytes]) -> Iterator[dict[bytes, _Entry]]:
        """Pin the present ``keys`` for the duration; yields key -> entry of those found."""
        with self._lock:
            entries = {k: self._entries[k] for k in keys if k in self._entries}
            for entry in entries.values():
                entry.pins += 1
        try:
            yield entries
        finally:
            with self._lock:
                self._unpin(entries.values())

    def lease(self, keys: Sequence[bytes], seconds: float) -> tuple[int, dict[bytes, tuple[int, int, int]]]:
        """Pin the held ``keys`` in the host tier for up to ``seconds`` so that another process
        can copy them out of the arena (``kv_store.transfer``); blocks in slower tiers are
        promoted first. Returns the lease id and, per key leased, ``(offset, size, checksum)``
        in the host tier's region. The caller ``release``s the lease when done; a lease not
        released in time expires (``expire_leases``), so a reader that dies leaks nothing."""
        host = next((i for i, t in enumerate(self.tiers) if t.name == "host"), None)
        with self._lock:
            self.expire_leases()
            leased: list[_Entry] = []
            where: dict[bytes, tuple[int, int, int]] = {}
            if host is not None:
                for key in keys:
                    entry = self._entries.get(key)
                    if entry is None:
                        self._misses += 1
                        continue
                    if key in where:
                        continue
                    served_from = entry.tier
                    if entry.tier != host:  # promoted (and verified) first
                        if entry.pins or not self._move(entry, host):
                            continue
                        if entry.dead:  # its bytes were corrupt
                            self._misses += 1
                            continue
                    self._stats[served_from].hits += 1
                    self._policies[entry.tier].access(key)
                    entry.pins += 1
                    leased.append(entry)
                    where[key] = (entry.slot.offset, entry.size, entry.checksum)
            self._lease_seq += 1
            self._leases[self._lease_seq] = (time.monotonic() + seconds, leased)
            return self._lease_seq, where

    def release(self, lease_id: int) -> bool:
        """End a lease: its blocks may move and go again. False if unknown or expired."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                return False
            self._unpin(lease[1])
            return True

    def expire_leases(self) -> int:
        """Release the leases past their deadline; returns how many."""
        now = time.monotonic()
        with self._lock:
            expired = [i for i, (deadline, _) in self._leases.items() if deadline < now]
            for i in expired:
                self._unpin(self._leases.pop(i)[1])
            return len(expired)

    def _unpin(self, entries: Iterable[_Entry]) -> None:
        for entry in entries:
            entry.pins -= 1
            if entry.pins == 0 and entry.dead:
                self._free_slot(entry)

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, StoredBlock]:
        """The verified blocks among ``keys``; misses and corrupt blocks are left out."""
        found: dict[bytes, StoredBlock] = {}
        slower: list[_Entry] = []  # hits outside the fastest tier, to promote
        with self.pinned(keys) as entries:
            for key, entry in entries.items():
                tier = entry.tier
                try:
                    data = self.tiers[tier].read(entry.slot, entry.size)
                except OSError as e:
                    log.warning("%s tier: cannot read a block back: %s", self.tiers[tier].name, e)
                    data = None
                if data is None or (self.tiers[tier].name != "host" and not verify(data, entry.checksum)):
                    with self._lock:
                        self._corrupt += 1
                        self._forget(entry)
                    continue
                found[key] = StoredBlock(data, entry.checksum)
                if tier > 0:
                    slower.append(entry)
                with self._lock:
                    self._stats[tier].hits += 1
                    self._policies[tier].access(key)
        with self._lock:
            self._misses += len(keys) - len(found)
            for entry in slower:  # promote with the bytes just read, now that it is unpinned
                block = found[entry.key]
                if (self._entries.get(entry.key) is entry and entry.tier > 0 and entry.pins == 0
                        and entry.checksum == block.checksum):
                    self._move(entry, 0, block.data)
        return found

    def lookup(self, groups: Sequence[Sequence[bytes]]) -> int:
        with self._lock:
            for n, group in enumerate(groups):
                if not all(k in self._entries for k in group):
                    return n
            return len(groups)

    def drop(self, keys: Iterable[bytes] | None = None) -> int:
        with self._lock:
            targets = list(self._entries.values()) if keys is None else [
                self._entries[k] for k in keys if k in self._entries]
            for entry in targets:
                self._forget(entry)
            return len(targets)

    def replace(self, key: bytes, block: StoredBlock) -> bool:
        """Overwrite a block's bytes and checksum in place (fault injection)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or len(block.data) != entry.size:
                return False
            self.tiers[entry.tier].write(entry.slot, block.data)
            entry.checksum = block.checksum
            return True

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._entries)

    @property
    def leases(self) -> int:
        """Leases held now (for tests and metrics)."""
        with self._lock:
            return len(self._leases)

    def tier_of(self, key: bytes) -> str | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else self.tiers[entry.tier].name

    def stats(self) -> TieredStoreStats:
        with self._lock:
            out = TieredStoreStats(misses=self._misses, corrupt=self._corrupt,
                                   rejected=self._rejected, puts=self._puts)
            counts = [0] * len(self.tiers)
            for entry in self._entries.values():
                counts[entry.tier] += 1
            for i, (tier, s) in enumerate(zip(self.tiers, self._stats)):
                a = tier.allocator
                out.tiers.append(TierStats(
                    name=s.name, capacity_bytes=a.capacity_bytes, used_bytes=a.payload_bytes,
                    held_bytes=a.held_bytes, blocks=counts[i], fragmentation=a.fragmentation,
                    hits=s.hits, evictions=s.evictions, demotions=s.demotions,
                    promotions=s.promotions, read_bytes=tier.io.read_bytes,
                    read_seconds=tier.io.read_seconds, write_bytes=tier.io.write_bytes,
                    write_seconds=tier.io.write_seconds))
            return out

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()


def build_store(host_bytes: int, disk_bytes: int = 0, disk_dir: str | None = None,
                gpu_bytes: int = 0, policy: str = "lru", direct_io: bool = False,
                page_bytes: int = 4 << 20, listener=None, shm_name: str | None = None) -> TieredStore:
    """A store with the tiers whose capacity is positive, fastest first.

    The disk tier's slab file is created in ``disk_dir`` (a new temporary directory when
    None) and removed by ``close``. With ``shm_name`` the host tier lives in named shared
    memory, readable by other processes on this host. Raises ``ValueError`` for a store with no tier and
    ``RuntimeError`` for a GPU tier where no GPU is usable.
    """
    import os
    import tempfile

    from kv_store.tiers import DiskTier, GpuTier

    tiers: list[Tier] = []
    if gpu_bytes > 0:
        tiers.append(GpuTier(gpu_bytes, page_bytes))
    if host_bytes > 0:
        tiers.append(HostTier(host_bytes, page_bytes, shm_name=shm_name))
    if disk_bytes > 0:
        directory = disk_dir or tempfile.mkdtemp(prefix="kvmesh-disk-")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"kvmesh-slab-{os.getpid()}.bin")
        tiers.append(DiskTier(path, disk_bytes, page_bytes, direct_io=direct_io))
    if not tiers:
        raise ValueError("give at least one tier a capacity (host, disk or gpu bytes)")
    return TieredStore(tiers, policy, listener)
