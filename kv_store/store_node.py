"""A store node in a cluster: its entries in the shared block index, and blocks of peers.

* ``IndexPublisher`` keeps the index true to what this node holds: it registers the node,
  heart-beats, and publishes the store's stored/removed changes in batches from a
  background thread (the store's listener only queues them). Stopping it unregisters the
  node, so its blocks leave every lookup at once; a node that dies instead leaves them
  when its heartbeat times out.
* ``PeerBlocks`` answers for blocks this node lacks: the longest prefix a live peer
  holds, and fetching blocks from it. Bytes from a peer are checksum-verified by the
  store client; a peer that is down, slow or wrong only makes a miss.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Sequence

from kv_store.block_store import StoredBlock
from kv_store.client import StoreClient, StoreError
from kv_store.index import BlockIndex

log = logging.getLogger("kvmesh.store")


class IndexPublisher:
    def __init__(self, index: BlockIndex, node_id: str, address: str,
                 heartbeat_s: float = 1.0, flush_s: float = 0.05):
        self.index = index
        self.node_id = node_id
        self.address = address
        self.heartbeat_s = heartbeat_s
        self.flush_s = flush_s
        self._events: queue.SimpleQueue[tuple[str, bytes, str | None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kvmesh-index", daemon=True)

    def on_change(self, kind: str, key: bytes, tier: str | None) -> None:
        """The store's listener: queue only, never block."""
        self._events.put((kind, key, tier))

    def start(self) -> None:
        self.index.register_node(self.node_id, self.address)
        self._thread.start()

    def flush(self) -> None:
        """Publish every queued change; the last change of a key wins. Batches go out in
        order (one flush at a time); the store server flushes before a put returns, so a
        block a worker has written is in the index when the worker moves on."""
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        final: dict[bytes, str | None] = {}
        while True:
            try:
                kind, key, tier = self._events.get_nowait()
            except queue.Empty:
                break
            final[key] = tier if kind == "stored" else None
        if not final:
            return
        by_tier: dict[str, list[bytes]] = {}
        removed = []
        for key, tier in final.items():
            if tier is None:
                removed.append(key)
            else:
                by_tier.setdefault(tier, []).append(key)
        for tier, keys in by_tier.items():
            self.index.add(self.node_id, tier, keys)
        if removed:
            self.index.remove(self.node_id, removed)

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
                now = time.monotonic()
                if now >= next_beat:
                    try:
                        self.index.heartbeat(self.node_id)
                    except KeyError:  # expired while we were stalled: come back
                        self.index.register_node(self.node_id, self.address)
                    self.index.expire_dead_nodes()
                    next_beat = now + self.heartbeat_s
            except Exception as e:  # the index is down: keep serving, retry next round
                log.warning("block index unavailable: %s", e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.index.unregister_node(self.node_id)
        except Exception as e:
            log.warning("could not unregister from the block index: %s", e)


class PeerBlocks:
    def __init__(self, index: BlockIndex, node_id: str, timeout_s: float = 2.0):
        self.index = index
        self.node_id = node_id
        self.timeout_s = timeout_s
        self._clients: dict[str, StoreClient] = {}
        self._lock = threading.Lock()

    def _client(self, address: str) -> StoreClient:
        with self._lock:
            if address not in self._clients:
                self._clients[address] = StoreClient(address, timeout_s=self.timeout_s)
            return self._clients[address]

    def longest_prefix(self, groups: Sequence[Sequence[bytes]]) -> int:
        """The longest prefix of ``groups`` one live peer holds (0 if the index is down)."""
        try:
            per_node = self.index.longest_prefix(groups)
        except Exception as e:
            log.warning("block index lookup failed: %s", e)
            return 0
        return max((n for node, n in per_node.items() if node != self.node_id), default=0)

    def fetch(self, keys: Sequence[bytes]) -> dict[bytes, StoredBlock]:
        """Verified blocks fetched from live peers; keys no peer could supply are left out."""
        try:
            where = self.index.locate(keys)
            nodes = self.index.live_nodes()
        except Exception as e:
            log.warning("block index locate failed: %s", e)
            return {}
        by_address: dict[str, list[bytes]] = {}
        for key, holders in where.items():
            peers = [n for n in holders if n != self.node_id and n in nodes]
            if peers:
                by_address.setdefault(nodes[peers[0]].address, []).append(key)
        found: dict[bytes, StoredBlock] = {}
        for address, wanted in by_address.items():
            try:
                result = self._client(address).get(wanted)
            except StoreError as e:
                log.warning("peer %s unavailable: %s", address, e)
                continue
            found.update(result.blocks)
        return found

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
