"""A store node in a cluster: its entries in the shared block index, and blocks of peers.

* ``IndexPublisher`` keeps the index true to what this node holds: it registers the node,
  heart-beats, and publishes the store's stored/removed changes in batches from a
  background thread (the store's listener only queues them), keeping those the index
  could not take for the next batch. Stopping it unregisters the
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
from typing import Callable, Sequence

from kvmesh.kv_store.block_store import StoredBlock
from kvmesh.kv_store.client import StoreClient, StoreError
from kvmesh.kv_store.index import BlockIndex
from kvmesh_proto.options import DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger("kvmesh.store")


DEFAULT_MAX_BLOCK_BYTES = 4 << 20  # a store's default page: no block it holds is larger
DEFAULT_MAX_PENDING = 1 << 17  # changes kept while the index is down: some 25 MB at most


class IndexPublisher:
    """Publishes what the store holds to the block index (see the module doc).

    Changes the index could not take (it is down or timed out) are kept, the last change
    of a key winning, and go out with the next flush: removals first, since a stale entry
    sends peers after a block that is gone while a missing one only costs a hit. Up to
    ``max_pending`` keys are kept; past that they are dropped and, once the index answers
    again, the node rebuilds its entries: it unregisters (so nothing stale is left),
    registers again and announces every block of ``holdings`` (given to ``start``; without
    it the node comes back empty). It does the same when the index has dropped its
    registration (a heartbeat or an add refused as not live). An outage is logged once
    when it starts and once when it ends.
    """

    def __init__(self, index: BlockIndex, node_id: str, address: str,
                 heartbeat_s: float = 1.0, flush_s: float = 0.05,
                 max_pending: int = DEFAULT_MAX_PENDING):
        self.index = index
        self.node_id = node_id
        self.address = address
        self.heartbeat_s = heartbeat_s
        self.flush_s = flush_s
        self.max_pending = max_pending
        self._events: queue.SimpleQueue[tuple[str, bytes, str | None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        # Under the flush lock: key -> tier (None: removed) not yet in the index, and
        # whether the index's entries of this node must be rebuilt from ``_holdings``.
        self._pending: dict[bytes, str | None] = {}
        self._rebuild = False
        self._holdings: Callable[[], dict[bytes, str]] | None = None
        self._report_lock = threading.Lock()
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="kvmesh-index", daemon=True)

    def on_change(self, kind: str, key: bytes, tier: str | None) -> None:
        """The store's listener: queue only, never block."""
        self._events.put((kind, key, tier))

    def start(self, holdings: Callable[[], dict[bytes, str]] | None = None) -> None:
        """Register the node and start publishing. ``holdings()`` is what the store holds
        now (key -> tier), read when the node must re-announce everything; the store's
        listener must be called in the same order as the changes it reports."""
        self._holdings = holdings
        self.index.register_node(self.node_id, self.address)
        self._thread.start()

    def flush(self) -> bool:
        """Publish every queued change and those kept from failed flushes; the last change
        of a key wins. Batches go out in order (one flush at a time); the store server
        flushes before a put returns, so a block a worker has written is in the index when
        the worker moves on (while the index works). Never raises: returns False if the
        index failed, the changes it did not take being kept for the next flush."""
        with self._flush_lock:
            try:
                published = self._flush()
            except Exception as e:
                self._report(e)
                return False
        if published:
            self._report(None)
        return True

    def _flush(self) -> bool:
        """Under the flush lock. True if the index was updated; raises what it raised."""
        self._drain()
        if not self._rebuild:
            if not self._pending:
                return False
            try:
                self._publish(self._pending)
                return True
            except KeyError:  # our registration was dropped, and our entries with it
                self._rebuild = True
        self._pending.clear()  # the holdings read below cover every change drained so far
        self.index.unregister_node(self.node_id)
        self.index.register_node(self.node_id, self.address)
        self._publish(self._holdings() if self._holdings is not None else {})
        self._rebuild = False
        return True

    def _drain(self) -> None:
        """Move the queued changes into ``_pending``; drop them once it overflows (the
        rebuild will announce what the store holds then)."""
        while True:
            try:
                kind, key, tier = self._events.get_nowait()
            except queue.Empty:
                break
            if not self._rebuild:
                self._pending[key] = tier if kind == "stored" else None
        if len(self._pending) > self.max_pending:
            log.warning("more than %d block changes wait for the block index; dropped them, "
                        "the node will re-announce all it holds once the index answers",
                        self.max_pending)
            self._pending.clear()
            self._rebuild = True

    def _publish(self, changes: dict[bytes, str | None]) -> None:
        """Apply ``changes`` (key -> tier, None: removed), removals first; the keys of each
        index call that succeeds leave ``changes``. Raises what the index raised."""
        removed = [key for key, tier in changes.items() if tier is None]
        if removed:
            self.index.remove(self.node_id, removed)
            for key in removed:
                del changes[key]
        by_tier: dict[str, list[bytes]] = {}
        for key, tier in changes.items():
            by_tier.setdefault(tier, []).append(key)
        for tier, keys in by_tier.items():
            self.index.add(self.node_id, tier, keys)
            for key in keys:
                del changes[key]

    def _report(self, error: Exception | None) -> None:
        """Log the first failure of an outage (``error``) and the first success after it."""
        with self._report_lock:
            if error is not None and self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("block index unavailable, keeping up to %d block changes for when "
                            "it is back: %s", self.max_pending, error)
            elif error is None and self._down_since is not None:
                log.warning("block index available again after %.1f s",
                            time.monotonic() - self._down_since)
                self._down_since = None

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.wait(self.flush_s):
            self.flush()
            now = time.monotonic()
            if now < next_beat:
                continue
            try:
                try:
                    self.index.heartbeat(self.node_id)
                except KeyError:  # expired while we were stalled: the next flush comes back
                    with self._flush_lock:
                        self._rebuild = True
                self.index.expire_dead_nodes()
                next_beat = now + self.heartbeat_s
                self._report(None)
            except Exception as e:  # the index is down: keep serving, retry next round
                self._report(e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.index.unregister_node(self.node_id)
        except Exception as e:
            log.warning("could not unregister from the block index: %s", e)


class PeerBlocks:
    """Blocks of live peers. A fetch from one peer has ``timeout_s`` in all, and goes in as
    many Get calls as keep each reply within ``max_message_bytes`` were every block
    ``max_block_bytes``: a block's size is not known before it arrives, and a store holds
    none larger than its page (4 MiB by default; peers are assumed to share the page
    size of this node). Every call to a peer carries the cluster ``secret``."""

    def __init__(self, index: BlockIndex, node_id: str, timeout_s: float = 2.0,
                 max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, secret: str | None = None):
        self.index = index
        self.secret = secret
        self.node_id = node_id
        self.timeout_s = timeout_s
        self.max_block_bytes = max_block_bytes
        self.max_message_bytes = max_message_bytes
        self._clients: dict[str, StoreClient] = {}
        self._lock = threading.Lock()

    def _client(self, address: str) -> StoreClient:
        with self._lock:
            if address not in self._clients:
                self._clients[address] = StoreClient(address, self.timeout_s,
                                                     self.max_message_bytes, secret=self.secret)
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
                result = self._client(address).get(wanted, self.max_block_bytes)
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
