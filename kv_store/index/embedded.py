"""In-process block index: dicts behind one lock, for a single node and for tests.

Follows every contract of ``kv_store.index.base``. Events are handed to each subscription
under the index lock, so they are queued in the order the changes were made. Publishers
never wait on subscribers: a subscription holding ``max_pending`` undelivered events drops
further ones (counted in its ``dropped``) until it is drained.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Sequence

from kvmesh.kv_store.index.base import (
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    BlockIndex,
    IndexEvent,
    NodeInfo,
    Subscription,
    check_groups,
    check_node_id,
    check_tier,
    check_timeout,
    is_live,
    unique,
)

DEFAULT_MAX_PENDING = 65536


class EmbeddedSubscription(Subscription):
    def __init__(self, index: "EmbeddedBlockIndex", max_pending: int):
        self._index = index
        self._queue: queue.Queue[IndexEvent] = queue.Queue(maxsize=max_pending)
        self._closed = False
        self.dropped = 0

    def deliver(self, event: IndexEvent) -> None:
        """Queue ``event``; called by the index under its lock."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def get(self, timeout_s: float) -> IndexEvent | None:
        if self._closed:
            raise ValueError("subscription is closed")
        try:
            if timeout_s <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._index.forget(self)


class EmbeddedBlockIndex(BlockIndex):
    def __init__(
        self,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        max_pending: int = DEFAULT_MAX_PENDING,
    ):
        if max_pending <= 0:
            raise ValueError("max_pending must be positive")
        self.heartbeat_timeout_s = check_timeout(heartbeat_timeout_s)
        self._clock = clock
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeInfo] = {}
        self._holders: dict[bytes, dict[str, str]] = {}  # key -> {node_id: tier}
        self._node_keys: dict[str, set[bytes]] = {}  # node_id -> keys it holds
        self._subscriptions: list[EmbeddedSubscription] = []

    # Under the lock only.

    def _live(self, node_id: str, now: float) -> bool:
        info = self._nodes.get(node_id)
        return info is not None and is_live(info.last_seen, now, self.heartbeat_timeout_s)

    def _publish(self, event: IndexEvent) -> None:
        for sub in self._subscriptions:
            sub.deliver(event)

    def _drop_node(self, node_id: str) -> None:
        del self._nodes[node_id]
        for key in self._node_keys.pop(node_id, ()):
            holders = self._holders[key]
            del holders[node_id]
            if not holders:
                del self._holders[key]
        self._publish(IndexEvent("node_expired", node_id, None, ()))

    # The interface.

    def register_node(self, node_id: str, address: str) -> None:
        check_node_id(node_id)
        with self._lock:
            now = self._clock()
            if node_id in self._nodes and not self._live(node_id, now):
                self._drop_node(node_id)
            self._nodes[node_id] = NodeInfo(node_id, address, now)

    def heartbeat(self, node_id: str) -> None:
        with self._lock:
            now = self._clock()
            if not self._live(node_id, now):
                raise KeyError(node_id)
            self._nodes[node_id] = self._nodes[node_id]._replace(last_seen=now)

    def unregister_node(self, node_id: str) -> None:
        with self._lock:
            if node_id in self._nodes:
                self._drop_node(node_id)

    def live_nodes(self) -> dict[str, NodeInfo]:
        with self._lock:
            now = self._clock()
            return {n: info for n, info in self._nodes.items() if self._live(n, now)}

    def add(self, node_id: str, tier: str, keys: Sequence[bytes]) -> None:
        check_tier(tier)
        keys = unique(keys)
        with self._lock:
            if not self._live(node_id, self._clock()):
                raise KeyError(node_id)
            if not keys:
                return
            held = self._node_keys.setdefault(node_id, set())
            for key in keys:
                self._holders.setdefault(key, {})[node_id] = tier
                held.add(key)
            self._publish(IndexEvent("stored", node_id, tier, tuple(keys)))

    def remove(self, node_id: str, keys: Sequence[bytes]) -> None:
        with self._lock:
            held = self._node_keys.get(node_id)
            if not held:
                return
            removed = []
            for key in unique(keys):
                if key in held:
                    held.discard(key)
                    holders = self._holders[key]
                    del holders[node_id]
                    if not holders:
                        del self._holders[key]
                    removed.append(key)
            if removed:
                self._publish(IndexEvent("removed", node_id, None, tuple(removed)))

    def longest_prefix(self, groups: Sequence[Sequence[bytes]]) -> dict[str, int]:
        check_groups(groups)
        result: dict[str, int] = {}
        with self._lock:
            now = self._clock()
            candidates = {n for n in self._nodes if self._live(n, now)}
            for depth, group in enumerate(groups):
                for key in group:
                    candidates.intersection_update(self._holders.get(key, ()))
                if not candidates:
                    return result
                for node_id in candidates:
                    result[node_id] = depth + 1
        return result

    def locate(self, keys: Sequence[bytes]) -> dict[bytes, dict[str, str]]:
        out: dict[bytes, dict[str, str]] = {}
        with self._lock:
            now = self._clock()
            for key in keys:
                found = {n: t for n, t in self._holders.get(key, {}).items() if self._live(n, now)}
                if found:
                    out[key] = found
        return out

    def subscribe(self) -> EmbeddedSubscription:
        sub = EmbeddedSubscription(self, self._max_pending)
        with self._lock:
            self._subscriptions.append(sub)
        return sub

    def forget(self, sub: EmbeddedSubscription) -> None:
        """Stop delivering to ``sub``; called by its ``close``."""
        with self._lock:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)

    def expire_dead_nodes(self) -> list[str]:
        with self._lock:
            now = self._clock()
            dead = [n for n in self._nodes if not self._live(n, now)]
            for node_id in dead:
                self._drop_node(node_id)
        return dead

    def close(self) -> None:
        with self._lock:
            subs = list(self._subscriptions)
        for sub in subs:
            sub.close()
