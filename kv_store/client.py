"""Client of the store server.

Every call has a deadline. Every failure of the transport (peer down, refused, deadline
exceeded) raises ``StoreError``; callers on the data path turn that into "these blocks are
missing", never into a hang or a wrong token. ``get`` verifies each block's checksum and
leaves out (and counts) blocks whose bytes do not match it, and splits a get whose reply
could pass the message limit into several calls. With a ``secret`` (the cluster's,
``kvmesh.kv_store.auth``) every call carries it; a store that wants another refuses
each call (``StoreError`` naming ``UNAUTHENTICATED``).
"""

from __future__ import annotations

import time
from typing import Iterator, NamedTuple, Sequence

import grpc

from kvmesh_proto.options import DEFAULT_MAX_MESSAGE_BYTES, message_options
from kvmesh.kv_store import extent_table
from kvmesh.kv_store.auth import call_metadata
from kvmesh.kv_store.block_store import StoredBlock
from kvmesh.kv_store.integrity import checksum, verify
from kvmesh_proto import store_pb2, store_pb2_grpc


# Bytes a block adds to a GetReply besides its key and data: the field tags and lengths
# (varints of up to 5 bytes) and the fixed64 checksum.
BLOCK_OVERHEAD_BYTES = 32


class StoreError(RuntimeError):
    """The store could not be reached or did not answer in time."""


class Located(NamedTuple):
    lease_id: bytes                             # b"": nothing leased
    extents: dict[bytes, tuple[int, int, int]]  # key -> (offset, size, checksum) in the arena
    offers: dict[str, bytes]                    # transfer backend -> descriptor


class GetResult(NamedTuple):
    blocks: dict[bytes, StoredBlock]  # verified blocks (bytes and their checksum), by key
    corrupt: int                # blocks returned whose checksum did not match


class StoreClient:
    def __init__(self, address: str, timeout_s: float = 5.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, secret: str | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.secret = secret
        self._metadata = call_metadata(secret)
        self._channel = grpc.insecure_channel(address, options=message_options(max_message_bytes))
        self._stub = store_pb2_grpc.KVStoreStub(self._channel)

    def _call(self, method, request, timeout_s: float | None = None):
        try:
            return method(request, timeout=self.timeout_s if timeout_s is None else timeout_s,
                          metadata=self._metadata)
        except grpc.RpcError as e:
            raise StoreError(f"store {self.address}: {e.code().name}: {e.details()}") from e

    def put(self, blocks: Sequence[tuple]) -> int:
        """Store ``(key, data)``, ``(key, data, parent key)`` or ``(key, data, parent key,
        session id)`` blocks (parent and session may be None), checksumming each; returns
        how many were stored."""
        msg = store_pb2.PutRequest(blocks=[
            store_pb2.Block(key=b[0], data=b[1], checksum=checksum(b[1]),
                            parent=(b[2] if len(b) > 2 else None) or b"",
                            session=(b[3] if len(b) > 3 else None) or "") for b in blocks])
        return self._call(self._stub.Put, msg).stored

    def lookup(self, groups: Sequence[Sequence[bytes]], session: str | None = None) -> int:
        """Number of leading key groups fully present in the store. With a ``session``
        id, that session is used now and the prefix found is its."""
        msg = store_pb2.LookupRequest(groups=[store_pb2.KeyGroup(keys=g) for g in groups],
                                      session=session or "")
        return self._call(self._stub.Lookup, msg).prefix_groups

    def release_session(self, session: str) -> int:
        """Forget a session (its blocks become ordinary ones); how many blocks it held,
        -1 if the store did not know it."""
        reply = self._call(self._stub.ReleaseSession, store_pb2.SessionRequest(session=session))
        return reply.blocks if reply.released else -1

    def sessions(self, session: str | None = None, limit: int = 0) -> store_pb2.SessionsReply:
        """Where sessions' blocks are held: one (``session``) or the ones with the most
        blocks (at most ``limit``; 0: the store's bound, 100)."""
        return self._call(self._stub.Sessions, store_pb2.SessionsRequest(session=session or "", limit=limit))

    def get(self, keys: Sequence[bytes], block_bytes: int | Sequence[int] = 0,
            deadline: float | None = None) -> GetResult:
        """The verified blocks held among ``keys``.

        ``block_bytes`` is the size of each key's block, or one bound for every key (0:
        unknown, counted as empty). The keys go in as many Get calls, in order, as keep
        each reply within ``max_message_bytes`` (a block bigger than that goes alone, and
        fails). All calls share one deadline: ``deadline`` (a ``time.monotonic()``
        instant), by default ``timeout_s`` from now. Raises ``StoreError`` if any call
        fails or the deadline passes before the last one. A block the reply carries that
        was not asked for is ignored."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        sizes = [block_bytes] * len(keys) if isinstance(block_bytes, int) else block_bytes
        if len(sizes) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(sizes)} block sizes")
        asked = set(keys)
        good: dict[bytes, StoredBlock] = {}
        corrupt = 0
        for batch in self._batches(keys, sizes):
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreError(f"store {self.address}: DEADLINE_EXCEEDED before the last Get")
            reply = self._call(self._stub.Get, store_pb2.GetRequest(keys=batch), left)
            for block in reply.blocks:
                if block.key not in asked:
                    continue
                if verify(block.data, block.checksum):
                    good[block.key] = StoredBlock(block.data, block.checksum)
                else:
                    corrupt += 1
        return GetResult(good, corrupt)

    def _batches(self, keys: Sequence[bytes], sizes: Sequence[int]) -> Iterator[list[bytes]]:
        """``keys`` cut into runs whose blocks of ``sizes`` fit in one reply."""
        batch: list[bytes] = []
        total = 0
        for key, size in zip(keys, sizes):
            cost = size + len(key) + BLOCK_OVERHEAD_BYTES
            if batch and total + cost > self.max_message_bytes:
                yield batch
                batch, total = [], 0
            batch.append(key)
            total += cost
        if batch:
            yield batch

    def locate(self, keys: Sequence[bytes], lease_s: float) -> Located:
        """Lease the held ``keys`` for a zero-copy read (empty offers: use ``get``)."""
        reply = self._call(self._stub.Locate, store_pb2.LocateRequest(keys=keys, lease_s=lease_s))
        try:
            extents = extent_table.unpack(keys, reply.extents)
        except ValueError as e:
            if reply.lease_id:  # nothing will read under it (it would expire anyway)
                try:
                    self.release(reply.lease_id)
                except StoreError:
                    pass
            raise StoreError(f"store {self.address}: a malformed Locate reply: {e}") from None
        return Located(reply.lease_id, extents, dict(reply.offers))

    def release(self, lease_id: bytes) -> bool:
        return self._call(self._stub.Release, store_pb2.ReleaseRequest(lease_id=lease_id)).released

    def drop(self, keys: Sequence[bytes] | None = None) -> int:
        msg = store_pb2.DropRequest(all=keys is None, keys=keys or [])
        return self._call(self._stub.Drop, msg).dropped

    def inject_fault(self, mode: str, keys: Sequence[bytes] | None = None, seconds: float = 0.0) -> int:
        msg = store_pb2.FaultRequest(mode=mode, all=keys is None, keys=keys or [], seconds=seconds)
        return self._call(self._stub.InjectFault, msg).affected

    def stats(self) -> store_pb2.StatsReply:
        return self._call(self._stub.Stats, store_pb2.StatsRequest())

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "StoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
