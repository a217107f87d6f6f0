"""Sessions: which held blocks belong to a named conversation, and whether it is idle.

A request may name its session. The router turns the name into a session id that also
depends on the request's tenant salt (``session_id``), so one tenant can never name, see
or release another's session: the store only ever sees ids. Blocks put or looked up
under a session id are that session's (a block may belong to several sessions: a shared
system prompt).

A session is *active* while it was used (a put or a lookup naming it) within its idle
TTL, and *idle* after that. The store (``kv_store.tiered_store``) weighs it when room is
wanted:

* moving blocks down (host -> disk): idle sessions' blocks go first, then blocks of no
  session, and an active session's only when nothing else can move;
* evicting (out of the slowest tier): blocks of no session go first; a session's blocks
  (active or idle) only when nothing else can go, so a put never fails for them.

So an idle session sleeps in the slowest tier while one-off prompts come and go, and a
resumed session is served from wherever its blocks are. At most ``max_sessions`` are
kept: past that, the least recently used one is forgotten (its blocks become ordinary
blocks). ``release`` forgets one at once.

Not thread-safe: the store calls it under its own lock.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Callable, Iterable, NamedTuple

ACTIVE, IDLE = "active", "idle"


def session_id(name: str, tenant_salt: str | None = None) -> str:
    """The id the store knows a session by: a hash of the tenant salt and the name, so
    that the same name under two salts is two sessions and an id reveals neither."""
    digest = hashlib.blake2b(digest_size=16, person=b"kvmesh-session")
    digest.update((tenant_salt or "").encode())
    digest.update(b"\0")
    digest.update(name.encode())
    return digest.hexdigest()


class _Session:
    __slots__ = ("last_used", "keys")

    def __init__(self, now: float):
        self.last_used = now
        self.keys: set[bytes] = set()


class Occupancy(NamedTuple):
    session: str            # its id
    state: str              # ACTIVE or IDLE
    idle_s: float           # seconds since it was last used
    blocks: dict[str, int]  # tier name -> blocks of it held there


class Sessions:
    """The registry (see the module doc). ``clock`` is ``time.monotonic`` unless a test
    gives its own."""

    def __init__(self, ttl_s: float, max_sessions: int, priority: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if ttl_s <= 0 or max_sessions < 1:
            raise ValueError("a session TTL above 0 and at least one session are needed")
        self.ttl_s, self.max_sessions, self.priority = ttl_s, max_sessions, priority
        self.clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self._of: dict[bytes, set[str]] = {}  # key -> sessions holding it
        self.forgotten = 0  # sessions forgotten to stay within max_sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session: str) -> bool:
        return session in self._sessions

    def touch(self, session: str, keys: Iterable[bytes] = ()) -> None:
        """``session`` was used now; ``keys`` (held blocks) are its from now on. Forgets
        the least recently used session if a new one makes more than ``max_sessions``."""
        s = self._sessions.get(session)
        if s is None:
            s = self._sessions[session] = _Session(self.clock())
            while len(self._sessions) > self.max_sessions:
                self._drop(next(iter(self._sessions)))
                self.forgotten += 1
        else:
            s.last_used = self.clock()
            self._sessions.move_to_end(session)
        for key in keys:
            if key not in s.keys:
                s.keys.add(key)
                self._of.setdefault(key, set()).add(session)

    def release(self, session: str) -> int:
        """Forget ``session``; returns how many held blocks it had (-1: unknown)."""
        if session not in self._sessions:
            return -1
        return len(self._drop(session))

    def _drop(self, session: str) -> set[bytes]:
        s = self._sessions.pop(session)
        for key in s.keys:
            holders = self._of.get(key)
            if holders is not None:
                holders.discard(session)
                if not holders:
                    del self._of[key]
        return s.keys

    def forget_key(self, key: bytes) -> None:
        """The store no longer holds ``key``."""
        for session in self._of.pop(key, ()):
            self._sessions[session].keys.discard(key)

    def state(self, key: bytes) -> str | None:
        """ACTIVE if an active session holds ``key``, IDLE if only idle ones do, else None."""
        holders = self._of.get(key)
        if not holders:
            return None
        cutoff = self.clock() - self.ttl_s
        return ACTIVE if any(self._sessions[s].last_used >= cutoff for s in holders) else IDLE

    def any_idle(self) -> bool:
        """Whether an idle session holds a block (cheap: sessions are kept in the order of
        their last use, so only the idle ones are looked at)."""
        cutoff = self.clock() - self.ttl_s
        for s in self._sessions.values():
            if s.last_used >= cutoff:
                return False
            if s.keys:
                return True
        return False

    def occupancy(self, tier_of: Callable[[bytes], str], session: str | None = None,
                  limit: int = 0) -> list[Occupancy]:
        """Per session (only ``session`` if given), its blocks per tier (``tier_of`` a held
        key), most blocks first; at most ``limit`` sessions (0: all)."""
        now = self.clock()
        names = [session] if session is not None else list(self._sessions)
        out = []
        for name in names:
            s = self._sessions.get(name)
            if s is None:
                continue
            blocks: dict[str, int] = {}
            for key in s.keys:
                tier = tier_of(key)
                blocks[tier] = blocks.get(tier, 0) + 1
            idle = now - s.last_used
            out.append(Occupancy(name, IDLE if idle > self.ttl_s else ACTIVE, idle, blocks))
        out.sort(key=lambda o: -sum(o.blocks.values()))
        return out[:limit] if limit else out

    def resident(self, tier_of: Callable[[bytes], str]) -> dict[str, int]:
        """Tier name -> sessions with at least one block held there."""
        counts: dict[str, int] = {}
        for s in self._sessions.values():
            for tier in {tier_of(k) for k in s.keys}:
                counts[tier] = counts.get(tier, 0) + 1
        return counts
