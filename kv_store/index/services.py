"""Service discovery through Redis: which prefill and decode workers are up, and where.

Standalone processes (what containers run) find each other here instead of being given
addresses: a worker ``announce``s itself under its role and keeps doing so from a
background thread (``Announcer``); a router asks for the live ``members`` of each role.
Store nodes need no entry of their own: they are the block index's live nodes.

A member is live while its last announcement is younger than ``ttl_s``; a process that
dies simply stops announcing and drops out. Every Redis call has a socket timeout.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

log = logging.getLogger("kvmesh.discovery")

ROLES = ("prefill", "decode")


class ServiceRegistry:
    def __init__(self, url: str, prefix: str = "kvmesh", ttl_s: float = 5.0,
                 socket_timeout_s: float = 2.0):
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._redis = redis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                           socket_connect_timeout=socket_timeout_s)

    def _key(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {ROLES}")
        return f"{self.prefix}:svc:{role}"

    def announce(self, role: str, address: str) -> None:
        self._redis.hset(self._key(role), address, repr(time.time()))

    def withdraw(self, role: str, address: str) -> None:
        self._redis.hdel(self._key(role), address)

    def members(self, role: str) -> list[str]:
        """Live addresses of ``role``, sorted; entries past ``ttl_s`` are removed."""
        now = time.time()
        live, stale = [], []
        for address, seen in self._redis.hgetall(self._key(role)).items():
            (live if now - float(seen) < self.ttl_s else stale).append(address.decode())
        if stale:
            self._redis.hdel(self._key(role), *stale)
        return sorted(live)

    def close(self) -> None:
        self._redis.close()


class Announcer:
    """Announces ``address`` under ``role`` every ``ttl_s / 3`` until ``stop``.

    ``start`` announces once and raises ``redis.RedisError`` if that fails; ``stop`` may be
    called whether or not ``start`` ran or succeeded (then it does nothing) and never
    raises: a withdraw that fails is logged, and the entry expires after ``ttl_s``."""

    def __init__(self, registry: ServiceRegistry, role: str, address: str):
        self.registry, self.role, self.address = registry, role, address
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvmesh-announce", daemon=True)

    def start(self) -> None:
        self.registry.announce(self.role, self.address)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.registry.ttl_s / 3):
            try:
                self.registry.announce(self.role, self.address)
            except redis.RedisError as e:
                log.warning("cannot announce %s %s: %s", self.role, self.address, e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is None:  # never started: nothing was announced
            return
        self._thread.join(timeout=5)
        try:
            self.registry.withdraw(self.role, self.address)
        except redis.RedisError as e:
            log.warning("cannot withdraw %s %s: %s", self.role, self.address, e)
