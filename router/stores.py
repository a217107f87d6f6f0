"""The router's view of the KV stores: whether each one answers, and its sessions.

``StoreProbe`` asks one store for its ``Stats`` (carrying the cluster secret) and keeps
what it found in ``status``: "ok", or why not ("unavailable (UNAVAILABLE)"). A late reply
is tolerated ``timeouts_to_fail - 1`` times in a row, as for workers (a busy store answers
late); a refused call or any other error marks the store down at once. A probe never
raises: every failure becomes a status. ``release_session`` and ``session`` reach a
session's blocks on the store (raising what gRPC raises). ``close`` frees its channel.
"""

from __future__ import annotations

import grpc

from kvmesh.kv_store.auth import call_metadata
from kvmesh_proto import store_pb2, store_pb2_grpc


class StoreProbe:
    def __init__(self, address: str, secret: str | None = None, timeouts_to_fail: int = 3):
        self.address = address
        self.status = "ok"  # nothing asked yet: counted as up, as workers are
        self.timeouts = 0
        self.timeouts_to_fail = timeouts_to_fail
        self._metadata = call_metadata(secret)
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = store_pb2_grpc.KVStoreStub(self._channel)

    @property
    def healthy(self) -> bool:
        return self.status.startswith("ok")

    async def probe(self, timeout_s: float) -> str:
        """Ask the store once (at most ``timeout_s``); returns and keeps its status."""
        try:
            await self._stub.Stats(store_pb2.StatsRequest(), timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            late = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            self.timeouts = self.timeouts + 1 if late else 0
            if late and self.healthy and self.timeouts < self.timeouts_to_fail:
                self.status = f"ok (a late reply, {self.timeouts} in a row)"
            else:
                self.status = f"unavailable ({e.code().name})"
            return self.status
        self.status, self.timeouts = "ok", 0
        return self.status

    async def release_session(self, session: str, timeout_s: float) -> store_pb2.ReleaseSessionReply:
        """Release a session (by id) on this store; raises ``grpc.aio.AioRpcError``."""
        return await self._stub.ReleaseSession(store_pb2.SessionRequest(session=session),
                                               timeout=timeout_s, metadata=self._metadata)

    async def session(self, session: str, timeout_s: float) -> store_pb2.SessionsReply:
        """Where one session's blocks are held on this store; raises ``grpc.aio.AioRpcError``."""
        return await self._stub.Sessions(store_pb2.SessionsRequest(session=session, limit=1),
                                         timeout=timeout_s, metadata=self._metadata)

    async def close(self) -> None:
        await self._channel.close()
