"""The tiered block store: GPU ▸ host RAM ▸ disk, fastest first.

Placement: a put lands in the fastest tier. When a tier has no room, its policy's
victims move one tier down (write-back); the slowest tier evicts them from the store. A
hit in a slower tier promotes the block back to the fastest tier. With ``demote_ahead``
a background thread (the demoter) moves victims down before a put needs their room,
keeping that share of each faster tier free; it never drops a block it cannot move
(the room it makes below is made as for a put: the slowest tier evicts).

Guarantees:

* ``get`` returns exactly the bytes put under the key, or nothing: bytes read back from
  a tier that is not host RAM (to serve them, or to move them to another tier) are
  checked against the block's checksum, and a mismatch or a failed read is dropped and
  counted (``corrupt``), never returned or moved.
* A block pinned by an in-flight read is never evicted or freed, nor moved down to make
  room, and the slot the reader found it in stays whole until the last pin goes (another
  request may move it meanwhile -- a hit promoting it, a lease bringing it to host RAM --
  and the slot it leaves is freed with that last pin). ``drop`` or a re-put of a pinned
  block takes effect when the last pin goes (the reader still gets the old bytes).
  ``with store.pinned(keys)`` pins for the duration of a block.
* A parent block (the block before it in its chain) is never evicted while a child that
  names it is stored, nor to make room for such a child; it may still move to a slower
  tier.
* A lease past its deadline holds nothing once room is wanted: a put that finds no room
  releases expired leases before it gives up. Lease ids are 128 random bits: one reader
  cannot guess another's to release it or to read through it (``lease_covers``).
* Every slot is freed exactly once: after everything is dropped and unpinned, every
  tier's used bytes are back to zero. That includes the decoded copies a lease of an
  encoded host tier's blocks holds in the host region: they go when it is released or
  expires.

Thread-safe: only bookkeeping happens under the store's one lock; every copy of bytes
(a put's write, a get's read, a move between tiers) runs outside it, on slots that pins
or reservations keep from being freed or reused meanwhile, so a hit in the fastest
tier never waits behind another request's disk I/O (a hit lower down waits for its own
promotion, which may have to make room). Several blocks read or moved at once (a
multi-key get, the promotions of a lease) go through a pool of ``io_threads`` threads
when a disk or GPU tier is involved, so a disk sees several requests at a time, and
blocks in adjacent slots are read in one request (up to ``MAX_RUN_BYTES``), into the
host arena directly where they are being promoted.
"""

from __future__ import annotations

import bisect
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from kvmesh.kv_store.block_store import BlockStore, StoredBlock
from kvmesh.kv_store.eviction import NO_HINT, BlockHint, EvictionPolicy, make_policy
from kvmesh.kv_store.encoding import heads_of
from kvmesh.kv_store.integrity import checksum as checksum_of, verify
from kvmesh.kv_store.sessions import ACTIVE, IDLE, Occupancy, Sessions
from kvmesh.kv_store.slab import Slot, adjacent_runs
from kvmesh.kv_store.tiers import HostTier, Tier

log = logging.getLogger("kvmesh.store")

MAX_RUN_BYTES = 4 << 20  # blocks in adjacent slots are read in requests of up to this
MAX_ROOM_ATTEMPTS = 256  # victims one call tries to move or evict before it gives up
SLAB_PREFIX = "kvmesh-slab-"  # a disk tier's file: kvmesh-slab-<pid>-<random>.bin
DEMOTER_PAUSE_S = (1.0, 30.0)  # the demoter's first and longest rest after a pass that moved nothing

# What became of a block asked to move (``TieredStore._move_many``).
_MOVED, _NO_ROOM, _STAYED, _CORRUPT = "moved", "no room", "stayed", "corrupt"

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
    hint: BlockHint = NO_HINT  # what the eviction policy weighs (chain position, priority)
    retired: list[tuple[int, Slot, int]] = field(default_factory=list)  # moved out of while
    # pinned: (tier, slot, bytes at rest) still being read, freed with the last pin
    # The bytes at rest in ``slot`` and their checksum: the block's own, unless its tier
    # encodes blocks (then the encoded bytes, header included), and the code of the
    # encoding they were written in (``Encoding.code``; 0: none). A read back checks it
    # against both its tier's encoding and the header of the bytes it finds.
    rest_size: int = -1
    rest_checksum: int = -1
    rest_encoding: int = 0

    def __post_init__(self) -> None:
        if self.rest_size < 0:
            self.rest_size, self.rest_checksum = self.size, self.checksum


class _Lease(NamedTuple):
    deadline: float               # time.monotonic() after which it expires
    entries: list[_Entry]         # the blocks it pins
    spans: list[tuple[int, int]]  # their bytes in the host region: sorted, merged [start, end)
    copies: list[tuple[Slot, int]]  # decoded copies it holds in the host region (an encoded
    # host tier): (slot, bytes), freed with the lease


def merged_spans(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, size)`` ranges as sorted, disjoint ``[start, end)`` spans, touching ones joined."""
    spans: list[tuple[int, int]] = []
    for start, end in sorted((o, o + n) for o, n in ranges if n > 0):
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def _within(spans: list[tuple[int, int]], offset: int, size: int) -> bool:
    i = bisect.bisect_right(spans, (offset, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= offset and offset + size <= spans[i][1]


class _Read(NamedTuple):
    """Where a pinned block was, and its checksum, when its reader or mover took the pin
    (it may move meanwhile; the slot it left stays whole until the last pin goes)."""
    entry: _Entry
    tier: int
    slot: Slot
    checksum: int
    rest_size: int      # bytes at rest in that slot (encoded, where the tier encodes)
    rest_checksum: int  # their checksum
    rest_encoding: int  # the code of the encoding they were written in (0: none)


@dataclass(eq=False)
class _Move:
    """One block on its way to another tier: copied from where ``source`` says it was
    into ``slot`` of ``tier``."""
    index: int  # in the caller's list
    source: _Read
    tier: int
    slot: Slot
    data: bytes | None  # its bytes, where the caller already read and verified them
    # (encoded for ``tier`` where ``rest_checksum`` is set)
    nbytes: int = 0  # bytes reserved in ``slot``: what it will hold at rest
    rest_checksum: int | None = None  # of ``data`` as encoded for ``tier``; None: not encoded
    new_checksum: int | None = None  # the block's checksum after a lossy decode on the way


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
    demotions_ahead: int = 0  # of those, moved by the demoter ahead of need
    promotions: int = 0  # blocks moved into this tier from a slower one
    encoding: str = "none"  # how blocks are held at rest here
    block_bytes: int = 0  # bytes of the blocks held, as put (used_bytes: as held at rest)
    lease_copy_bytes: int = 0  # of used_bytes, those of leases' decoded copies (an encoded host tier)
    sessions: int = 0  # sessions with a block held here
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
                 listener: Callable[[str, bytes, str | None], None] | None = None,
                 io_threads: int = 4, demote_ahead: float = 0.0, sessions: Sessions | None = None):
        """``listener(kind, key, tier)`` hears every change of what is held: ``"stored"``
        (with the tier now holding the key) and ``"removed"``. It is called under the
        store's lock, so it must only record the event (e.g. put it on a queue).
        ``io_threads``: how many block reads and moves of one call run at once (1: one
        after the other, on the caller's thread). ``demote_ahead``: the share of each
        tier but the slowest that a background thread keeps free by moving the tier's
        victims down ahead of need (0: only a put or promotion that finds no room moves
        them, itself). It never drops a block it cannot move; room below is made as for
        a put (the slowest tier evicts). ``sessions``: the session registry whose blocks
        are kept as ``kv_store.sessions`` says (None: no block belongs to a session).
        Raises ``ValueError`` for no tier, fewer than one I/O thread or a share outside
        [0, 1)."""
        if not tiers:
            raise ValueError("a store needs at least one tier")
        if io_threads < 1:
            raise ValueError("io_threads must be at least 1")
        self.io_threads = io_threads
        self._pool: ThreadPoolExecutor | None = None
        self.listener = listener
        self.tiers = list(tiers)
        self._host = next((i for i, t in enumerate(self.tiers) if t.name == "host"), None)  # its index
        self._policies: list[EvictionPolicy] = [make_policy(policy) for _ in self.tiers]
        self._stats = [TierStats(t.name) for t in self.tiers]
        self._entries: dict[bytes, _Entry] = {}
        self._sessions = sessions
        self._children: dict[bytes, int] = {}  # parent key -> stored children naming it
        self._lock = threading.RLock()
        self._misses = self._corrupt = self._rejected = self._puts = 0
        self._leases: dict[bytes, _Lease] = {}
        self._copy_bytes = 0  # in leases' decoded copies (``lease``)
        self._room_wanted = threading.Event()
        self._closing = False
        self._demoter: threading.Thread | None = None
        self._share = 0.0
        self.demote_ahead = demote_ahead

    # ------------------------------------------------------------------ placement
    #
    # Bytes are copied outside the lock; only bookkeeping happens under it. A slot is
    # reserved (allocated, held by no entry), filled without the lock, then handed to an
    # entry under it, or freed if the entry went meanwhile. Pins keep the slots being read
    # alive: only an unpinned block is picked to move down or go, and a slot a block moves
    # out of while someone still reads it is retired, freed with the last pin.

    def _can_evict(self, key: bytes) -> bool:
        entry = self._entries[key]
        return entry.pins == 0 and self._children.get(key, 0) == 0

    def _can_move(self, key: bytes) -> bool:
        return self._entries[key].pins == 0

    def _raw_host(self, tier: int) -> bool:
        """Whether ``tier`` is host RAM holding blocks as put (no encoding): its slots can
        be read, and copied out of, in place, without a check or a decode."""
        t = self.tiers[tier]
        return isinstance(t, HostTier) and not t.encoding.code

    def _victim(self, tier: int, size_class: int, evict: bool = False) -> _Entry | None:
        """Under the lock: the block ``tier`` gives up next, taken off its policy; one in a
        slot of ``size_class`` first (freeing it frees exactly the room wanted). One that
        may be evicted (``evict``, and always from the slowest tier), else one that may
        move."""
        evict = evict or tier == len(self.tiers) - 1
        key = self._pop_victim(tier, self._can_evict if evict else self._can_move, evict, size_class)
        return None if key is None else self._entries[key]

    def _pop_victim(self, tier: int, allowed: Callable[[bytes], bool], evict: bool,
                    size_class: int | None = None) -> bytes | None:
        """Under the lock: the next key ``tier``'s policy gives up among those ``allowed``,
        taken off it; one in a slot of ``size_class`` first, where given. Sessions' blocks
        are weighed as ``kv_store.sessions`` says: to ``evict``, blocks of no session
        first; to move down, idle sessions' blocks first, then blocks of no session, an
        active session's last."""
        policy = self._policies[tier]

        def pop(ok: Callable[[bytes], bool]) -> bytes | None:
            if size_class is not None:
                key = policy.pop_victim(lambda k: ok(k) and self._entries[k].slot.size == size_class)
                if key is not None:
                    return key
            return policy.pop_victim(ok)  # a page may still free up from another size class

        if self._sessions is None or not len(self._sessions):
            return pop(allowed)
        state = self._sessions.state
        if evict:
            passes = ((lambda k: state(k) is None), None)
        else:  # an idle session's blocks are looked for only where one holds any
            passes = ((lambda k: state(k) == IDLE),) if self._sessions.any_idle() else ()
            passes += ((lambda k: state(k) != ACTIVE), None)
        for wanted in passes:
            key = pop(allowed if wanted is None else (lambda k, w=wanted: w(k) and allowed(k)))
            if key is not None:
                return key
        return None

    def _reserve(self, tier: int, nbytes: int) -> Slot | None:
        """A free slot of ``tier`` for ``nbytes``, reserved for the caller, who fills it and
        then, under the lock, gives it to an entry or frees it. Room is made by moving the
        tier's victims one tier down or, from the slowest tier, evicting them. None when no
        room can be made (what is left is pinned, or parents of stored children). Where a
        victim can neither move (no room below) nor go (a parent), a block of the tier
        that may go is evicted instead; expired leases are released before giving up.
        Call without the lock."""
        allocator = self.tiers[tier].allocator
        size_class = allocator.slot_size_for(nbytes)
        if size_class is None:
            return None
        for _ in range(MAX_ROOM_ATTEMPTS):
            with self._lock:
                slot = allocator.alloc(nbytes)
                if slot is not None:
                    return slot
                victim = self._victim(tier, size_class)
                if victim is None:
                    if self._leases and self.expire_leases():
                        continue
                    return None
                if tier == len(self.tiers) - 1:
                    self._evict(victim)
                    continue
                source = self._pin(victim)  # the move's own pin: nobody else picks or frees it
            if self._demote([source], tier, may_evict=True)[0][1]:
                with self._lock:  # stuck: nothing fits below and it may not go
                    victim = self._victim(tier, size_class, evict=True)
                    if victim is None:
                        return None
                    self._evict(victim)
        return None

    def _demote(self, sources: Sequence[_Read], tier: int, may_evict: bool) -> list[tuple[str, bool]]:
        """Move victims the caller took off ``tier``'s policy and pinned (``sources``; the
        pins are released here) one tier down, adjacent ones in one request. Where one
        cannot move, it is evicted if ``may_evict`` and it may go, else it stays (back in
        the policy). Per victim: the move's outcome and whether the victim is stuck: it
        neither moved nor went for want of room (a victim someone began to read
        meanwhile is not stuck, just skipped). Call without the lock."""
        outcomes = [_STAYED] * len(sources)  # if the move raises, the victims just stay
        try:
            outcomes = self._move_many(sources, tier + 1, yield_to_readers=True)
        finally:
            with self._lock:
                self._unpin([s.entry for s in sources])
                stuck = [self._settle(s.entry, tier, o, may_evict) for s, o in zip(sources, outcomes)]
        return list(zip(outcomes, stuck))

    def _settle(self, victim: _Entry, tier: int, outcome: str, may_evict: bool) -> bool:
        """Under the lock, after trying to move a victim down: if it is still in ``tier``,
        evict it where it could not move and may go (and ``may_evict``), else give it
        back to the policy; as ``_demote`` says, whether it is stuck."""
        if self._entries.get(victim.key) is not victim or victim.tier != tier:
            return False
        if outcome == _NO_ROOM and may_evict and self._can_evict(victim.key):
            self._evict(victim)
            return False
        self._policies[tier].insert(victim.key, victim.hint)
        return outcome == _NO_ROOM and victim.pins == 0

    # ------------------------------------------------------------------ demoting ahead

    @property
    def demote_ahead(self) -> float:
        return self._share

    @demote_ahead.setter
    def demote_ahead(self, share: float) -> None:
        """Change the share the demoter keeps free (it starts on the first share above 0,
        in a store of more than one tier); ``ValueError`` outside [0, 1)."""
        if not 0.0 <= share < 1.0:
            raise ValueError(f"demote_ahead must be at least 0 and below 1, not {share}")
        with self._lock:
            self._share = share
            if share > 0 and len(self.tiers) > 1 and self._demoter is None and not self._closing:
                self._demoter = threading.Thread(target=self._run_demoter, name="kvmesh-demoter", daemon=True)
                self._demoter.start()
        self._room_wanted.set()

    def _room_short(self, tier: int) -> float:
        """Under the lock (or racy, as a hint): how many bytes of free slots ``tier`` lacks
        to have its ``demote_ahead`` share of its capacity free (0 or less: none)."""
        a = self.tiers[tier].allocator
        return self.demote_ahead * a.capacity_bytes - (a.capacity_bytes - a.slot_bytes)

    def _room_taken(self, tier: int) -> None:
        """A block just took room in ``tier``: wake the demoter if the tier ran short."""
        if self._demoter is not None and tier < len(self.tiers) - 1 and self._room_short(tier) > 0:
            self._room_wanted.set()

    def _run_demoter(self) -> None:
        """The demoter thread: passes of ``_demote_ahead_pass`` when a block takes room,
        and every second. After a pass that was stuck (a disk that fails its writes, or
        a tier below with no room to make) and moved nothing, it rests before the next,
        twice as long each time up to ``DEMOTER_PAUSE_S[1]``, whatever wakes it meanwhile;
        a pass that moves a block (or has nothing to move) sets the rests back."""
        pause = 0.0
        while not self._closing:
            if pause:
                self._rest(pause)
            else:
                self._room_wanted.wait(1.0)
                self._room_wanted.clear()
            moved, stuck = self._demote_ahead_pass()
            if stuck and not moved and not self._closing:
                pause = min(max(2 * pause, DEMOTER_PAUSE_S[0]), DEMOTER_PAUSE_S[1])
                log.warning("the demoter could not move blocks down; trying again in %.0f s", pause)
            else:
                pause = 0.0

    def _rest(self, seconds: float) -> None:
        """Wait ``seconds``, or until the store closes (wake-ups meanwhile are dropped)."""
        deadline = time.monotonic() + seconds
        while not self._closing and (left := deadline - time.monotonic()) > 0:
            self._room_wanted.wait(left)
            self._room_wanted.clear()

    def _demote_ahead_pass(self) -> tuple[int, bool]:
        """While a tier is short of room, move its victims down, as many at a time as make
        up the room lacking (up to ``MAX_RUN_BYTES``: adjacent ones reach a disk in one
        request), under the same pins and checks as a put's; stop at a victim that
        cannot move. Returns how many blocks moved and whether a victim was stuck."""
        moved_in_all, stuck_any = 0, False
        for tier in range(len(self.tiers) - 1):
            for _ in range(MAX_ROOM_ATTEMPTS):
                with self._lock:
                    short = 0.0 if self._closing else min(self._room_short(tier), MAX_RUN_BYTES)
                    sources: list[_Read] = []
                    while short > 0:
                        key = self._pop_victim(tier, self._can_move, evict=False)
                        if key is None:
                            break
                        sources.append(self._pin(self._entries[key]))
                        short -= sources[-1].slot.size
                if not sources:
                    break
                try:
                    results = self._demote(sources, tier, may_evict=False)
                except Exception:  # the thread lives on; the blocks stayed where they were
                    log.exception("%s tier: moving blocks down ahead of need failed", self.tiers[tier].name)
                    stuck_any = True
                    break
                moved = sum(outcome == _MOVED for outcome, _ in results)
                if moved:
                    moved_in_all += moved
                    with self._lock:
                        self._stats[tier].demotions_ahead += moved
                if any(stuck for _, stuck in results):
                    stuck_any = True
                    break
            else:
                self._room_wanted.set()  # more to do: go on after the other tiers
        return moved_in_all, stuck_any

    def _move_many(self, sources: Sequence[_Read], tier: int,
                   data: Sequence[bytes | None] | None = None,
                   yield_to_readers: bool = False) -> list[str]:
        """Move blocks the caller has pinned (one pin each, the caller's to release) to
        ``tier``; ``sources`` say where each was, and its checksum, when the caller took
        its pin. Room is reserved in ``tier``, the bytes are copied outside the lock (on
        the I/O pool, adjacent disk slots in one request), then each entry takes its new
        slot under the lock, its old one freed, or retired while others read it. Per
        block: ``_MOVED``; ``_NO_ROOM`` (none could be made, or the write failed);
        ``_STAYED`` (dropped, replaced or moved by another meanwhile, or, with
        ``yield_to_readers``, another began to read it: its new slot is freed);
        ``_CORRUPT`` (its bytes failed their checksum on the way: dropped and counted, so
        callers that go on using an entry check ``entry.dead``).

        ``data``: the blocks' bytes where the caller already read and verified them (saves
        reading them again). Call without the lock."""
        data = list(data) if data is not None else [None] * len(sources)
        outcomes = [_STAYED] * len(sources)
        moves: list[_Move] = []
        try:
            for i, (source, d) in enumerate(zip(sources, data)):
                if source.tier == tier:
                    continue
                new_checksum = None
                if d is not None and self.tiers[source.tier].encoding.lossy:
                    new_checksum = checksum_of(d)  # as decoded on the way (get_many)
                rest_checksum = None
                if self.tiers[tier].encoding.code:  # encoded before its room is known
                    try:
                        d, new_checksum = self._encoded_for(source, d, tier, new_checksum)
                    except ValueError as e:  # a block this encoding cannot hold
                        log.warning("%s tier: cannot encode a block: %s", self.tiers[tier].name, e)
                        outcomes[i] = _NO_ROOM
                        continue
                    if d is None:  # its bytes failed on the way
                        with self._lock:
                            outcomes[i] = self._finish_move(_Move(i, source, tier, None, None), False, False)
                        continue
                    rest_checksum = checksum_of(d)
                nbytes = source.entry.size if d is None else len(d)
                slot = self._reserve(tier, nbytes)
                if slot is None:
                    outcomes[i] = _NO_ROOM
                else:
                    moves.append(_Move(i, source, tier, slot, d, nbytes, rest_checksum, new_checksum))
            if not moves:
                return outcomes
            groups = self._copy_groups(moves)
            results = self._run_io([lambda g=g: self._copy_run(g) for g in groups],
                                   parallel=any(self.tiers[t].name != "host" for t in
                                                {tier, *(m.source.tier for m in moves)}))
        except BaseException:
            with self._lock:
                for move in moves:
                    self.tiers[tier].allocator.free(move.slot, move.nbytes)
            raise
        with self._lock:
            for group, copied in zip(groups, results):
                for move, result in zip(group, copied):
                    outcomes[move.index] = self._finish_move(move, result, yield_to_readers)
        return outcomes

    def _finish_move(self, move: _Move, result: bool | None, yield_to_readers: bool) -> str:
        """Under the lock: give a copied block its new slot, or free that slot. ``result``
        is ``_copy``'s: True intact, False bad bytes, None not written."""
        was = move.source
        entry = was.entry
        unchanged = (not entry.dead and entry.tier == was.tier and entry.slot is was.slot
                     and entry.checksum == was.checksum)
        readers = entry.pins - 1  # besides the mover's pin
        if move.slot is not None and (result is None or not unchanged or (result and yield_to_readers and readers > 0)):
            self.tiers[move.tier].allocator.free(move.slot, move.nbytes)
            return _NO_ROOM if result is None else _STAYED
        if not result:
            if move.slot is not None:
                self.tiers[move.tier].allocator.free(move.slot, move.nbytes)
            if not unchanged:
                return _STAYED
            self._corrupt += 1
            self._forget(entry)
            return _CORRUPT
        if readers > 0:  # still reading the old slot: it goes with the last pin
            entry.retired.append((was.tier, was.slot, was.rest_size))
        else:
            self.tiers[was.tier].allocator.free(was.slot, was.rest_size)
        if move.new_checksum is not None:  # decoded lossily: these are its bytes now
            entry.checksum = move.new_checksum
        if move.rest_checksum is None:
            entry.rest_size, entry.rest_checksum, entry.rest_encoding = entry.size, entry.checksum, 0
        else:
            entry.rest_size, entry.rest_checksum = move.nbytes, move.rest_checksum
            entry.rest_encoding = self.tiers[move.tier].encoding.code
        self._policies[was.tier].remove(entry.key)
        if move.tier > was.tier:
            self._stats[was.tier].demotions += 1
        else:
            self._stats[move.tier].promotions += 1
        entry.tier, entry.slot = move.tier, move.slot
        self._policies[move.tier].insert(entry.key, entry.hint)
        self._room_taken(move.tier)
        self._tell("stored", entry.key, self.tiers[move.tier].name)
        return _MOVED

    def _encoded_for(self, source: _Read, data: bytes | None, tier: int,
                     new_checksum: int | None) -> tuple[bytes | None, int | None]:
        """A pinned block's bytes encoded for ``tier``, and its checksum if it changes on
        the way (decoded lossily from its tier): ``data`` where the caller has them, else
        read from where ``source`` says (verified, decoded). ``(None, None)`` when they
        cannot be read or fail their checksum; ``ValueError`` when the encoding cannot
        hold them. Call without the lock."""
        if data is None:
            src = self.tiers[source.tier]
            if self._raw_host(source.tier):
                with src.view(source.slot, source.entry.size) as view:
                    data = bytes(view)
            else:
                data = self._read_decoded(source)
                if data is None:
                    return None, None
                if src.encoding.lossy:
                    new_checksum = checksum_of(data)
        return self.tiers[tier].encoding.encode(data, heads_of(source.entry.key)), new_checksum

    def _read_decoded(self, source: _Read) -> bytes | None:
        """A pinned block read back from a tier that is not raw host RAM, checked against
        its checksum at rest and decoded; None if it cannot be read, fails, or will not
        decode."""
        tier = self.tiers[source.tier]
        try:
            data = tier.read(source.slot, source.rest_size)
        except OSError as e:
            log.warning("%s tier: cannot read a block back: %s", tier.name, e)
            return None
        return self._decoded(tier, data, source)

    def _decoded(self, tier: Tier, data: bytes, source: _Read) -> bytes | None:
        """Bytes of a block read from ``tier``, verified against their checksum at rest
        and decoded (and, from a lossless encoding, the result verified against the
        block's own checksum too); None if they fail. Bytes recorded as written in another
        encoding than the tier's, or whose header names another (``Encoding.decode``
        refuses it), fail too, even where their checksum holds: they are not decoded as
        something they are not."""
        if not verify(data, source.rest_checksum):
            return None
        if source.rest_encoding != tier.encoding.code:
            log.warning("%s tier: a block recorded as encoding %d, the tier's is %d (%s)", tier.name,
                        source.rest_encoding, tier.encoding.code, tier.encoding.name)
            return None
        if not tier.encoding.code:
            return data
        try:
            data = tier.encoding.decode(data)
        except ValueError as e:  # the checksum held, so the writer wrote garbage: still a loss
            log.warning("%s tier: a block does not decode: %s", tier.name, e)
            return None
        return data if tier.encoding.lossy or verify(data, source.checksum) else None

    def _run_io(self, jobs: Sequence[Callable[[], object]], parallel: bool) -> list:
        """Run ``jobs`` (block copies that touch only their own slots, never the store's
        state) and return their results in order: on the I/O pool when ``parallel`` and
        there is more than one, else one after the other on this thread."""
        if not parallel or len(jobs) < 2 or self.io_threads == 1:
            return [job() for job in jobs]
        with self._lock:
            if self._closing:  # no new pool: close has shut it down
                pool = None
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="kvmesh-io")
                pool = self._pool
        if pool is None:
            return [job() for job in jobs]
        futures = [pool.submit(job) for job in jobs]
        try:
            wait(futures)  # all of them, even if one failed: their slots are in use until then
        except BaseException:  # interrupted: the jobs still write into their slots until they end
            wait(futures)
            raise
        return [f.result() for f in futures]

    def _read_into_host(self, move: _Move) -> bool:
        """Whether a move reads a block back from a slower tier that holds it as put into
        host RAM that does too (encoded blocks are decoded on the way: ``_copy``)."""
        return (move.data is None and self._raw_host(move.tier)
                and not isinstance(self.tiers[move.source.tier], HostTier)
                and not self.tiers[move.source.tier].encoding.code)

    def _written_from_host(self, move: _Move) -> bool:
        """Whether a move writes a block out of host RAM that holds it as put into a
        slower tier."""
        return (move.data is None and self._raw_host(move.source.tier)
                and not isinstance(self.tiers[move.tier], HostTier))

    def _copy_groups(self, moves: list[_Move]) -> list[list[_Move]]:
        """Moves cut into jobs: reads back into host RAM by runs of adjacent slots of one
        source tier, and writes out of host RAM by runs of adjacent slots of the new
        tier (one request each); every other move on its own."""
        reads = [m for m in moves if self._read_into_host(m)]
        writes = [m for m in moves if self._written_from_host(m)]
        return ([[m] for m in moves if not (self._read_into_host(m) or self._written_from_host(m))]
                + _adjacent_by_tier(reads, lambda m: (m.source.tier, m.source.slot))
                + _adjacent_by_tier(writes, lambda m: (m.tier, m.slot)))

    def _copy_run(self, moves: list[_Move]) -> list[bool | None]:
        """Copy a group from ``_copy_groups``; per move, as ``_copy``: a run between host
        RAM and a slower tier in one request (``_run_through_host``), else one move."""
        if len(moves) > 1 and self._written_from_host(moves[0]):
            return self._run_through_host(moves, reading=False)
        if self._read_into_host(moves[0]):
            return self._run_through_host(moves, reading=True)
        return [self._copy(moves[0])]

    def _run_through_host(self, moves: list[_Move], reading: bool) -> list[bool | None]:
        """A run of adjacent slots of a slower tier in one request, over whole host slots:
        read back straight into the new host slots and verified there (``reading``), or
        written straight out of the old ones. A failed request fails the whole run:
        False each for a read (bad bytes), None each for a write (not written)."""
        first = moves[0]
        host, other = ((self.tiers[first.tier], self.tiers[first.source.tier]) if reading
                       else (self.tiers[first.source.tier], self.tiers[first.tier]))
        host_slots = [m.slot if reading else m.source.slot for m in moves]
        views = [host.view(slot, slot.size) for slot in host_slots]
        items = [(m.source.slot if reading else m.slot, m.source.entry.size, v) for m, v in zip(moves, views)]
        try:
            if reading:
                other.read_run_into(items)
                return [verify(v[:m.source.entry.size], m.source.checksum) for m, v in zip(moves, views)]
            other.write_run_from(items)
            return [True] * len(moves)
        except OSError as e:
            log.warning("%s tier: cannot %s blocks: %s", other.name, "read back" if reading else "write", e)
            return [False if reading else None] * len(moves)
        finally:
            for view in views:
                view.release()

    def _copy(self, move: _Move) -> bool | None:
        """Copy one block into its new slot (reads back into host RAM go through
        ``_copy_run``): straight out of the host arena where it is there as put, else its
        bytes as given, or read back, verified and decoded. True when copied; False when
        its bytes fail (or cannot be read), and nothing is written; None when the new tier
        failed to write them (its slot is then left to be freed)."""
        was, data = move.source, move.data
        src, dst, size = self.tiers[was.tier], self.tiers[move.tier], was.entry.size
        if data is None and not self._raw_host(was.tier):
            data = self._read_decoded(was)
            if data is None:
                return False
            if src.encoding.lossy:
                move.new_checksum = checksum_of(data)
        try:
            if data is None:  # straight out of the host arena, its whole slot
                with src.view(was.slot, was.slot.size) as view:
                    dst.write_from(move.slot, size, view)
            else:
                dst.write(move.slot, data)
        except OSError as e:
            log.warning("%s tier: cannot write a block: %s", dst.name, e)
            return None
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
            if self._sessions is not None:
                self._sessions.forget_key(entry.key)
            if entry.parent is not None:
                self._child_gone(entry.parent)
        entry.dead = True
        if entry.pins == 0:
            self._free_slot(entry)

    def _tell(self, kind: str, key: bytes, tier: str | None) -> None:
        """Tell the listener; one that raises is logged, never lets bookkeeping stop halfway."""
        if self.listener is not None:
            try:
                self.listener(kind, key, tier)
            except Exception:
                log.exception("the store's listener failed on a %s event", kind)

    def _free_slot(self, entry: _Entry) -> None:
        if entry.slot is not None:
            self.tiers[entry.tier].allocator.free(entry.slot, entry.rest_size)
            entry.slot = None

    def _child_gone(self, parent: bytes) -> None:
        """Under the lock: one child fewer names ``parent``."""
        left = self._children.get(parent, 0) - 1
        if left > 0:
            self._children[parent] = left
        else:
            self._children.pop(parent, None)

    def _pin(self, entry: _Entry) -> _Read:
        """Under the lock: one more pin on ``entry``, and where it is now with its checksum
        (that slot stays whole until the pin goes, ``_unpin``)."""
        entry.pins += 1
        return _Read(entry, entry.tier, entry.slot, entry.checksum, entry.rest_size, entry.rest_checksum,
                     entry.rest_encoding)

    def _unpin(self, entries: Iterable[_Entry]) -> None:
        for entry in entries:
            entry.pins -= 1
            if entry.pins == 0:
                for tier, slot, nbytes in entry.retired:
                    self.tiers[tier].allocator.free(slot, nbytes)
                entry.retired.clear()
                if entry.dead:
                    self._free_slot(entry)

    # ------------------------------------------------------------------ BlockStore

    def put(self, key: bytes, data: bytes, checksum: int, parent: bytes | None = None,
            session: str | None = None, priority: float = 0.0) -> bool:
        """As ``BlockStore.put``; ``priority`` (0: none; a ``session``'s by default) is
        handed to the eviction policy with the block's chain position (its parent's plus
        one where the parent is held; 1 where it is not; 0 for a block without a parent).
        ``session``: the id of the session the block belongs to (it is used now), where
        the store keeps sessions; ignored where it does not. Where the fastest tier
        encodes, a block its encoding cannot hold (``ValueError``: a lossy one's, for
        bytes that are not bf16 K and V) is rejected (False), as one with no room is."""
        if session and self._sessions is not None and not priority:
            priority = self._sessions.priority
        if parent is not None:  # counted from now on: making room for the child never evicts it
            with self._lock:
                self._children[parent] = self._children.get(parent, 0) + 1
        slot, rest, rest_checksum = None, data, checksum
        try:
            if self.tiers[0].encoding.code:  # a store whose fastest tier encodes
                try:
                    rest = self.tiers[0].encoding.encode(data, heads_of(key))
                except ValueError as e:
                    log.warning("%s tier: cannot encode a block: %s", self.tiers[0].name, e)
                    rest = None
                if rest is not None:
                    rest_checksum = checksum_of(rest)
            slot = None if rest is None else self._reserve(0, len(rest))
            if slot is not None:
                self.tiers[0].write(slot, rest)  # the slot is ours alone: no lock needed
        except BaseException:
            with self._lock:
                if slot is not None:
                    self.tiers[0].allocator.free(slot, len(rest))
                if parent is not None:
                    self._child_gone(parent)
            raise
        with self._lock:
            if slot is None:
                self._rejected += 1
                if parent is not None:
                    self._child_gone(parent)
                return False
            old = self._entries.get(key)
            if old is not None:
                self._forget(old)
            above = None if parent is None else self._entries.get(parent)
            position = 0 if parent is None else 1 if above is None else above.hint.position + 1
            entry = _Entry(key, len(data), checksum, parent, 0, slot, hint=BlockHint(position, priority, parent),
                           rest_size=len(rest), rest_checksum=rest_checksum,
                           rest_encoding=self.tiers[0].encoding.code if rest is not data else 0)
            self._entries[key] = entry
            self._policies[0].insert(key, entry.hint)
            if session and self._sessions is not None:
                self._sessions.touch(session, [key])
            self._puts += 1
            self._room_taken(0)
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

    def lease(self, keys: Sequence[bytes], seconds: float) -> tuple[bytes, dict[bytes, tuple[int, int, int]]]:
        """Pin the held ``keys`` in the host tier for up to ``seconds`` so that another process
        can copy them out of the arena (``kv_store.transfer``); blocks in slower tiers are
        promoted first. Returns the lease id (16 random bytes) and, per key leased,
        ``(offset, size, checksum)`` in the host tier's region. The caller ``release``s the
        lease when done; a lease not released in time expires (``expire_leases``), so a
        reader that dies leaks nothing.

        Where the host tier holds blocks encoded, each leased block is decoded into a slot
        of the host region of its own (a copy the lease holds, freed when it is released
        or expires, ``lease_copy_bytes``): the offsets returned are the copies'. A block
        for which no room for a copy can be made, or whose bytes fail their checks, is
        not leased (the reader recomputes it). The checksum is the copy's (a lossy
        encoding's decoded bytes differ from those put)."""
        host = self._host
        wanted: list[_Entry] = []  # each with the lease's pin, from now on
        slower: list[_Read] = []   # those of them in a slower tier, where each was
        with self._lock:
            self.expire_leases()
            if host is not None:
                entries = self._entries
                for key in dict.fromkeys(keys):
                    entry = entries.get(key)
                    if entry is None:
                        self._misses += 1
                    elif entry.tier == host:  # a pinned block stays where it is: no snapshot
                        entry.pins += 1
                        wanted.append(entry)
                    else:
                        slower.append(self._pin(entry))
                        wanted.append(entry)
        encoded = host is not None and bool(self.tiers[host].encoding.code)
        copies: dict[bytes, tuple[Slot, int, int]] = {}
        try:  # promote what is slower, several at a time (read and verified on the way)
            if slower:
                self._move_many(slower, host)
            if encoded:
                copies = self._decoded_copies(wanted, host)
        except BaseException:
            with self._lock:
                self._unpin(wanted)
                for slot, _, nbytes in copies.values():
                    self.tiers[host].allocator.free(slot, nbytes)
            raise
        with self._lock:
            leased: list[_Entry] = []
            where: dict[bytes, tuple[int, int, int]] = {}
            promoted = {id(r.entry): r.tier for r in slower}
            stats, access = self._stats, self._policies[host].access if host is not None else None
            for entry in wanted:
                copy = copies.get(entry.key)
                if entry.dead or entry.tier != host or (encoded and copy is None):
                    # corrupt or dropped; or no room up there (for it, or for its copy)
                    self._misses += entry.dead
                    self._unpin([entry])
                    continue
                stats[promoted.get(id(entry), host)].hits += 1
                access(entry.key)
                leased.append(entry)
                if copy is None:
                    where[entry.key] = (entry.slot.offset, entry.size, entry.checksum)
                else:
                    where[entry.key] = (copy[0].offset, entry.size, copy[1])
            held = [(slot, nbytes) for key, (slot, _, nbytes) in copies.items() if key in where]
            for key, (slot, _, nbytes) in copies.items():
                if key not in where:  # its block went meanwhile: the copy goes too
                    self.tiers[host].allocator.free(slot, nbytes)
            self._copy_bytes += sum(nbytes for _, nbytes in held)
            lease_id = secrets.token_bytes(16)
            spans = merged_spans((offset, size) for offset, size, _ in where.values())
            self._leases[lease_id] = _Lease(time.monotonic() + seconds, leased, spans, held)
            return lease_id, where

    def _decoded_copies(self, entries: list[_Entry], host: int) -> dict[bytes, tuple[Slot, int, int]]:
        """Decoded copies, in slots of the host region, of the pinned blocks among
        ``entries`` that are in the (encoding) host tier now: key -> (slot, checksum of the
        copy, bytes reserved). A block that fails its checks is dropped and counted as
        corrupt; one for which no room can be made gets no copy. The caller frees the
        slots (``_free_copies``) once readers are done. Call without the lock."""
        with self._lock:  # where each is now (promoted meanwhile, or moved by another)
            now = [self._pin(e) for e in entries if not e.dead and e.tier == host]
        copies: dict[bytes, tuple[Slot, int, int]] = {}
        try:
            for read in now:
                data = self._read_decoded(read)
                if data is None:
                    with self._lock:
                        if self._entries.get(read.entry.key) is read.entry and read.entry.slot is read.slot:
                            self._corrupt += 1
                            self._forget(read.entry)
                    continue
                slot = self._reserve(host, len(data))
                if slot is None:
                    continue
                copies[read.entry.key] = (slot, checksum_of(data), len(data))
                self.tiers[host].write(slot, data)  # the slot is ours alone: no lock needed
        except BaseException:
            with self._lock:
                for slot, _, nbytes in copies.values():
                    self.tiers[host].allocator.free(slot, nbytes)
            raise
        finally:
            with self._lock:
                self._unpin([r.entry for r in now])
        return copies

    def _free_copies(self, lease: _Lease) -> None:
        """Under the lock: free the decoded copies ``lease`` holds."""
        for slot, nbytes in lease.copies:
            self.tiers[self._host].allocator.free(slot, nbytes)
            self._copy_bytes -= nbytes

    @property
    def lease_copy_bytes(self) -> int:
        """Bytes of the decoded copies leases hold now (an encoded host tier's; 0 otherwise)."""
        with self._lock:
            return self._copy_bytes

    def release(self, lease_id: bytes) -> bool:
        """End a lease: its blocks may move and go again, its decoded copies are freed.
        False if unknown or expired."""
        with self._lock:
            lease = self._leases.pop(bytes(lease_id), None)
            if lease is None:
                return False
            self._unpin(lease.entries)
            self._free_copies(lease)
            return True

    def lease_covers(self, lease_id: bytes, extents: Iterable[tuple[int, int]]) -> bool:
        """Whether lease ``lease_id`` is held and not past its deadline, and every
        ``(offset, size)`` of ``extents`` lies within the host-region bytes of the blocks
        it pins (one extent may span blocks in adjacent slots). What a transfer source
        asks before it serves bytes of the arena."""
        with self._lock:
            lease = self._leases.get(bytes(lease_id))
        if lease is None or lease.deadline < time.monotonic():
            return False
        return all(_within(lease.spans, offset, size) for offset, size in extents if size)

    def expire_leases(self) -> int:
        """Release the leases past their deadline; returns how many."""
        now = time.monotonic()
        with self._lock:
            expired = [self._leases.pop(i) for i, lease in list(self._leases.items()) if lease.deadline < now]
            for lease in expired:
                self._unpin(lease.entries)
                self._free_copies(lease)
            return len(expired)

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, StoredBlock]:
        """The verified blocks among ``keys``; misses and corrupt blocks are left out.
        Blocks found in a slower tier are promoted with the bytes just read."""
        with self._lock:
            entries = {k: self._entries[k] for k in keys if k in self._entries}
            reads = [self._pin(e) for e in entries.values()]
        found: dict[bytes, StoredBlock] = {}
        pinned = True
        try:
            runs = _adjacent_by_tier(reads, lambda r: (r.tier, r.slot))
            if len(runs) == 1:  # the common call: one run (in slot order), read on this thread
                reads, datas = runs[0], self._read_verified(runs[0])
            else:
                reads = [r for run in runs for r in run]
                datas = [d for ds in self._run_io(
                    [lambda r=r: self._read_verified(r) for r in runs],
                    parallel=any(self.tiers[r[0].tier].name != "host" for r in runs)) for d in ds]
            slower: list[tuple[_Read, bytes]] = []
            with self._lock:
                for read, data in zip(reads, datas):
                    if data is None:
                        self._corrupt += 1
                        self._forget(read.entry)
                        continue
                    found[read.entry.key] = StoredBlock(
                        data, checksum_of(data) if self.tiers[read.tier].encoding.lossy else read.checksum)
                    if read.tier > 0:
                        slower.append((read, data))
                    self._stats[read.tier].hits += 1
                    self._policies[read.entry.tier].access(read.entry.key)
                self._misses += len(set(keys)) - len(found)
                if not slower:  # nothing to promote: the pins go under this same lock, once
                    pinned = False
                    self._unpin(entries.values())
            if slower:
                self._move_many([r for r, _ in slower], 0, [d for _, d in slower])
        finally:
            if pinned:
                with self._lock:
                    self._unpin(entries.values())
        return found

    def _read_verified(self, run: list[_Read]) -> list[bytes | None]:
        """The bytes of pinned blocks in adjacent slots of one tier, each checked against
        its checksum (and decoded) unless they come from host RAM that holds them as put;
        None for one that fails it, and for all of them if they cannot be read."""
        tier = self.tiers[run[0].tier]
        try:
            datas = tier.read_run([(r.slot, r.rest_size) for r in run])
        except OSError as e:
            log.warning("%s tier: cannot read blocks back: %s", tier.name, e)
            return [None] * len(run)
        if self._raw_host(run[0].tier):
            return datas
        return [self._decoded(tier, d, r) for d, r in zip(datas, run)]

    def lookup(self, groups: Sequence[Sequence[bytes]], session: str | None = None) -> int:
        """As ``BlockStore.lookup``; with a ``session`` (where the store keeps sessions),
        the session is used now and the blocks of the prefix found are its from now on."""
        with self._lock:
            found = len(groups)
            for n, group in enumerate(groups):
                if not all(k in self._entries for k in group):
                    found = n
                    break
            if session and self._sessions is not None:
                self._sessions.touch(session, (k for group in groups[:found] for k in group))
            return found

    # ------------------------------------------------------------------ sessions

    def release_session(self, session: str) -> int:
        """Forget a session: its blocks become ordinary blocks (they stay until evicted).
        Returns how many held blocks it had; -1 if it is unknown (or sessions are off)."""
        with self._lock:
            return -1 if self._sessions is None else self._sessions.release(session)

    def session_occupancy(self, session: str | None = None, limit: int = 0) -> list[Occupancy]:
        """Per session (only ``session`` if given), where its blocks are held, most
        blocks first, at most ``limit`` sessions (0: all); empty where sessions are off."""
        with self._lock:
            if self._sessions is None:
                return []
            return self._sessions.occupancy(self._tier_name, session, limit)

    def sessions_tracked(self) -> int:
        """Sessions the store keeps now."""
        with self._lock:
            return 0 if self._sessions is None else len(self._sessions)

    def sessions_resident(self) -> dict[str, int]:
        """Tier name -> sessions with a block held there (every tier named, 0 where none)."""
        with self._lock:
            counts = {} if self._sessions is None else self._sessions.resident(self._tier_name)
            return {t.name: counts.get(t.name, 0) for t in self.tiers}

    def _tier_name(self, key: bytes) -> str:
        return self.tiers[self._entries[key].tier].name

    def drop(self, keys: Iterable[bytes] | None = None) -> int:
        with self._lock:
            targets = list(self._entries.values()) if keys is None else [
                self._entries[k] for k in keys if k in self._entries]
            for entry in targets:
                self._forget(entry)
            return len(targets)

    def replace(self, key: bytes, block: StoredBlock) -> bool:
        """Overwrite a block's bytes and checksum in place (fault injection), as if they
        had been put (encoded where its tier encodes: False if they do not fit its slot)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or len(block.data) != entry.size:
                return False
            tier = self.tiers[entry.tier]
            rest = tier.encoding.encode(block.data, heads_of(key)) if tier.encoding.code else block.data
            if len(rest) > entry.slot.size:
                return False
            tier.allocator.payload_bytes += len(rest) - entry.rest_size  # the same slot, new bytes
            tier.write(entry.slot, rest)
            entry.checksum = block.checksum
            entry.rest_size = len(rest)
            entry.rest_checksum = block.checksum if rest is block.data else checksum_of(rest)
            entry.rest_encoding = 0 if rest is block.data else tier.encoding.code
            return True

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._entries)

    def holdings(self) -> dict[bytes, str]:
        """Every key held now, with the name of its tier (one consistent snapshot)."""
        with self._lock:
            return {key: self.tiers[e.tier].name for key, e in self._entries.items()}

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
            raw = [0] * len(self.tiers)
            resident = {} if self._sessions is None else self._sessions.resident(self._tier_name)
            for entry in self._entries.values():
                counts[entry.tier] += 1
                raw[entry.tier] += entry.size
            for i, (tier, s) in enumerate(zip(self.tiers, self._stats)):
                a = tier.allocator
                out.tiers.append(TierStats(
                    name=s.name, capacity_bytes=a.capacity_bytes, used_bytes=a.payload_bytes,
                    held_bytes=a.held_bytes, blocks=counts[i], fragmentation=a.fragmentation,
                    hits=s.hits, evictions=s.evictions, demotions=s.demotions,
                    demotions_ahead=s.demotions_ahead,
                    promotions=s.promotions, encoding=tier.encoding.name, block_bytes=raw[i],
                    lease_copy_bytes=self._copy_bytes if tier.name == "host" else 0,
                    sessions=resident.get(tier.name, 0),
                    read_bytes=tier.io.read_bytes,
                    read_seconds=tier.io.read_seconds, write_bytes=tier.io.write_bytes,
                    write_seconds=tier.io.write_seconds))
            return out

    def flush(self) -> bool:
        """Wait until every tier's writes have reached its medium (a disk tier with
        write-behind); False if one timed out."""
        return all([tier.flush() for tier in self.tiers])

    def close(self) -> None:
        """Stop the demoter (after the move it is in), then the I/O pool, then the tiers."""
        with self._lock:
            self._closing = True
        stuck = False
        if self._demoter is not None:
            self._room_wanted.set()
            self._demoter.join(60)
            stuck = self._demoter.is_alive()
            if stuck:
                log.warning("the demoter is stuck in a move; closing the tiers under it")
        if self._pool is not None:
            self._pool.shutdown(wait=not stuck)  # its stuck job may be in the pool
            self._pool = None
        for tier in self.tiers:
            tier.close()


def _adjacent_by_tier(items: list, where: Callable[[object], tuple[int, Slot]]) -> list[list]:
    """``items`` grouped by the tier ``where`` says they are in, each group cut into runs
    of adjacent slots of at most ``MAX_RUN_BYTES`` (one read request each)."""
    if len(items) < 2:  # the common single-block call: one run, without the grouping
        return [list(items)] if items else []
    by_tier: dict[int, list] = {}
    for item in items:
        by_tier.setdefault(where(item)[0], []).append(item)
    return [[group[i] for i in run] for group in by_tier.values()
            for run in adjacent_runs([where(x)[1] for x in group], MAX_RUN_BYTES)]


def build_store(host_bytes: int, disk_bytes: int = 0, disk_dir: str | None = None,
                gpu_bytes: int = 0, policy: str = "lru", direct_io: bool = False,
                page_bytes: int = 4 << 20, listener=None, shm_name: str | None = None,
                io_threads: int = 4, disk_write_behind_bytes: int = 0,
                demote_ahead: float = 0.0, disk_encoding: str = "none",
                sessions: Sessions | None = None, host_encoding: str = "none") -> TieredStore:
    """A store with the tiers whose capacity is positive, fastest first.

    The disk tier's slab file is created in ``disk_dir`` (a new temporary directory when
    None), under a name no other store uses, and removed by ``close``; slab files there
    that no live store holds (left by a store that died) are removed first. With ``shm_name`` the host tier lives in named shared
    memory, readable by other processes on this host. With ``disk_write_behind_bytes``
    disk writes return once staged in that much RAM (``kv_store.write_behind``). With
    ``demote_ahead`` a thread keeps that share of each faster tier free (``TieredStore``).
    ``disk_encoding``, ``host_encoding``: how the disk and host tiers hold blocks at rest
    (``kv_store.encoding``).
    ``sessions``: the session registry (``TieredStore``).
    Raises ``ValueError`` for a store with no tier (or write-behind below one page, or a
    share outside [0, 1), or an unknown encoding) and ``RuntimeError`` for a GPU tier where no GPU is usable;
    whatever it raises, the tiers it had made are closed first.
    """
    import os
    import tempfile

    import secrets

    from kvmesh.kv_store.encoding import make_encoding
    from kvmesh.kv_store.tiers import DiskTier, GpuTier, reap_orphaned_files

    make_encoding(disk_encoding), make_encoding(host_encoding)  # an unknown name fails before any tier is made

    tiers: list[Tier] = []
    try:
        if gpu_bytes > 0:
            tiers.append(GpuTier(gpu_bytes, page_bytes))
        if host_bytes > 0:
            tiers.append(HostTier(host_bytes, page_bytes, shm_name=shm_name, encoding=make_encoding(host_encoding)))
        if disk_bytes > 0:
            directory = disk_dir or tempfile.mkdtemp(prefix="kvmesh-disk-")
            os.makedirs(directory, exist_ok=True)
            for name in reap_orphaned_files(directory, SLAB_PREFIX, min_age_s=0):  # locked from birth
                log.warning("removed %s, the disk tier of a store that died", os.path.join(directory, name))
            # a name of its own: stores in containers of one host may share the directory and a pid
            path = os.path.join(directory, f"{SLAB_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.bin")
            tiers.append(DiskTier(path, disk_bytes, page_bytes, direct_io=direct_io,
                                  write_behind_bytes=disk_write_behind_bytes,
                                  encoding=make_encoding(disk_encoding)))
        if not tiers:
            raise ValueError("give at least one tier a capacity (host, disk or gpu bytes)")
        return TieredStore(tiers, policy, listener, io_threads, demote_ahead, sessions)
    except BaseException:  # a tier made before the failure (a shared segment) goes too
        for tier in tiers:
            tier.close()
        raise
