"""The store server: a ``BlockStore`` served over gRPC (``kvmesh store``).

The server binds only the address it is given. With a cluster secret it refuses every
call that does not carry it (``UNAUTHENTICATED``, ``kvmesh.kv_store.auth``): without the
cluster's credentials no block can be written, read, looked up or dropped. Fault
injection (damaging or hiding blocks, for failure tests) is refused unless the server
was started with it enabled.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc

from kvmesh.kv_store import extent_table
from kvmesh.kv_store.auth import server_interceptors
from kvmesh.kv_store.block_store import BlockStore, StoredBlock
from kvmesh.kv_store.store_node import IndexPublisher, PeerBlocks
from kvmesh_proto.options import DEFAULT_MAX_MESSAGE_BYTES, bind_port, host_port, message_options
from kvmesh.kv_store.integrity import checksum
from kvmesh_proto import store_pb2, store_pb2_grpc

log = logging.getLogger("kvmesh.store")

FAULT_MODES = ("flip", "noise", "vanish", "stall")


class StoreService(store_pb2_grpc.KVStoreServicer):
    """The store API. With ``peers``, blocks this node lacks are looked up through the
    block index and fetched from the peer that holds them (then kept here too)."""

    MAX_LEASE_S = 60.0
    MAX_SESSIONS_LISTED = 100  # a Sessions call without a limit

    def __init__(self, store: BlockStore, allow_fault_injection: bool = False,
                 peers: PeerBlocks | None = None, publisher: IndexPublisher | None = None,
                 offers: dict[str, bytes] | None = None):
        self.store = store
        self.peers = peers
        self.publisher = publisher
        self.offers = offers or {}  # transfer backend -> descriptor of the host arena
        self.allow_fault_injection = allow_fault_injection
        self._vanished: set[bytes] = set()
        self._stall_s = 0.0  # "stall": every Put and Get first sleeps this long
        self._lock = threading.Lock()

    def _stall(self) -> None:
        if self._stall_s > 0:
            time.sleep(self._stall_s)

    def Put(self, request, context):
        self._stall()
        stored = 0
        for block in request.blocks:
            if self.store.put(block.key, block.data, block.checksum, block.parent or None,
                              session=block.session or None):
                stored += 1
            with self._lock:
                self._vanished.discard(block.key)
        if self.publisher is not None:  # if the index is down, it publishes them later
            self.publisher.flush()
        return store_pb2.PutReply(stored=stored, rejected=len(request.blocks) - stored)

    @property
    def sessions(self) -> bool:
        """Whether the store keeps sessions (``kv_store.sessions``)."""
        return hasattr(self.store, "release_session")

    def Lookup(self, request, context):
        groups = [list(g.keys) for g in request.groups]
        found = self.store.lookup(groups, session=request.session or None)
        if self.peers is not None and found < len(groups):
            found = max(found, self.peers.longest_prefix(groups))
        return store_pb2.LookupReply(prefix_groups=found)

    def Get(self, request, context):
        self._stall()
        with self._lock:
            vanished = set(self._vanished)
        found = self.store.get_many([k for k in request.keys if k not in vanished])
        found.update(self._from_peers([k for k in request.keys if k not in found and k not in vanished]))
        return store_pb2.GetReply(blocks=[
            store_pb2.Block(key=k, data=b.data, checksum=b.checksum) for k, b in found.items()])

    def Drop(self, request, context):
        keys = None if request.all else list(request.keys)
        with self._lock:
            if keys is None:
                self._vanished.clear()
            else:
                self._vanished.difference_update(keys)
        return store_pb2.DropReply(dropped=self.store.drop(keys))

    def InjectFault(self, request, context):
        if not self.allow_fault_injection:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "fault injection is disabled on this store (start it with --allow-fault-injection)")
        if request.mode not in FAULT_MODES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown fault mode {request.mode!r}; use one of {FAULT_MODES}")
        if request.mode == "stall":
            self._stall_s = request.seconds
            return store_pb2.FaultReply(affected=1)
        keys = self.store.keys() if request.all else list(request.keys)
        affected = 0
        for key in keys:
            if request.mode == "vanish":
                with self._lock:
                    self._vanished.add(key)
                affected += 1
                continue
            block = self.store.get(key)
            if block is None:
                continue
            if request.mode == "flip":
                data = bytes(b ^ 0x5A for b in block.data)
                damaged = StoredBlock(data, block.checksum)
            else:
                data = bf16_noise(len(block.data))
                damaged = StoredBlock(data, checksum(data))
            affected += self.store.replace(key, damaged)
        return store_pb2.FaultReply(affected=affected)

    def _from_peers(self, keys: list[bytes]) -> dict[bytes, StoredBlock]:
        """The blocks among ``keys`` that live peers hold (verified), fetched and stored
        here too, so that later reads, and leases, find them here."""
        if self.peers is None or not keys:
            return {}
        found = self.peers.fetch(keys)
        for key, block in found.items():
            self.store.put(key, block.data, block.checksum)
        return found

    def Locate(self, request, context):
        if not hasattr(self.store, "lease") or not self.offers:
            return store_pb2.LocateReply()  # no zero-copy path: the reader uses Get
        self._stall()
        lease_s = min(max(request.lease_s, 0.1), self.MAX_LEASE_S)
        asked = list(request.keys)
        with self._lock:
            vanished = set(self._vanished)
        keys = [k for k in asked if k not in vanished] if vanished else asked
        if self.peers is not None:
            self._from_peers([k for k in keys if self.store.tier_of(k) is None])  # then leased here
        lease_id, where = self.store.lease(keys, lease_s)  # 16 random bytes
        return store_pb2.LocateReply(lease_id=lease_id, offers=self.offers,
                                     extents=extent_table.pack(asked, where))

    def Release(self, request, context):
        released = hasattr(self.store, "release") and self.store.release(request.lease_id)
        return store_pb2.ReleaseReply(released=bool(released))

    def ReleaseSession(self, request, context):
        blocks = self.store.release_session(request.session) if self.sessions else -1
        return store_pb2.ReleaseSessionReply(released=blocks >= 0, blocks=max(blocks, 0))

    def Sessions(self, request, context):
        if not self.sessions:
            return store_pb2.SessionsReply()
        found = self.store.session_occupancy(request.session or None,
                                             min(request.limit or self.MAX_SESSIONS_LISTED, self.MAX_SESSIONS_LISTED))
        return store_pb2.SessionsReply(tracked=self.store.sessions_tracked(), sessions=[
            store_pb2.SessionOccupancy(session=o.session, state=o.state, idle_s=o.idle_s, blocks=o.blocks)
            for o in found])

    def Stats(self, request, context):
        s = self.store.stats()
        return store_pb2.StatsReply(
            capacity_bytes=s.capacity_bytes, used_bytes=s.used_bytes, blocks=s.blocks,
            hits=s.hits, misses=s.misses, evictions=s.evictions, puts=s.puts,
            rejected=s.rejected, corrupt=s.corrupt, leases=getattr(self.store, "leases", 0),
            tiers=[store_pb2.TierStats(**vars(t)) for t in s.tiers])


def bf16_noise(nbytes: int) -> bytes:
    """Random finite bfloat16 values (standard normal), for replacing KV with noise.

    Raw random bytes would hold NaNs, which poison the engine's cache slots beyond the
    request under test; finite noise keeps a negative control about this request only.
    """
    import numpy as np

    values = np.random.default_rng().standard_normal(nbytes // 2, dtype=np.float32)
    return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes().ljust(nbytes, b"\0")


def start_store_server(
    host: str,
    port: int,
    store: BlockStore,
    *,
    allow_fault_injection: bool = False,
    peers: PeerBlocks | None = None,
    publisher: IndexPublisher | None = None,
    offers: dict[str, bytes] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_workers: int = 32,
    secret: str | None = None,
) -> tuple[grpc.Server, int]:
    """Serve ``store`` on ``host:port``; returns the server and the bound port. With
    ``secret``, a call without it is refused ``UNAUTHENTICATED`` before it reaches the
    store; without, every call is served.

    Raises ``RuntimeError`` when the address cannot be bound. The caller stops the
    server (``server.stop(grace)``) and then closes the store.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=message_options(max_message_bytes),
                         interceptors=server_interceptors(secret))
    store_pb2_grpc.add_KVStoreServicer_to_server(StoreService(store, allow_fault_injection, peers, publisher, offers), server)
    bound = bind_port(server, host, port, "the store server")
    server.start()
    log.info("store serving on %s", host_port(host, bound))
    return server, bound
