"""Asynchronous client of one worker's gRPC API (prefill or decode).

Its calls fail only with ``grpc.aio.AioRpcError``: a call cut short because the router
closed the channel (a worker that left the pool, or shutdown) raises ``UNAVAILABLE``, not
the bare ``asyncio.CancelledError`` gRPC gives, so that the caller retries or reports it
as a worker failure; a cancellation of the calling task still propagates as one.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from kvmesh.kv_store.auth import call_metadata
from kvmesh_proto.options import message_options
from kvmesh_proto import worker_pb2, worker_pb2_grpc


def _task_cancelled() -> bool:
    """Whether the running task was asked to stop (Python 3.11+ can tell; 3.10: assume not)."""
    task = asyncio.current_task()
    return bool(task is not None and getattr(task, "cancelling", lambda: 0)())


class WorkerClient:
    """Calls one worker; with the cluster ``secret`` every call carries it (a worker that
    wants another answers ``UNAUTHENTICATED``)."""

    def __init__(self, address: str, secret: str | None = None):
        self.address = address
        self.closed = False
        self._metadata = call_metadata(secret)
        self._channel = grpc.aio.insecure_channel(address, options=message_options())
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)

    def _closed_error(self) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                    details=f"the router closed its channel to {self.address}")

    async def health(self, timeout_s: float = 2.0) -> worker_pb2.HealthReply:
        if self.closed:
            raise self._closed_error()
        try:
            return await self._stub.Health(worker_pb2.HealthRequest(), timeout=timeout_s,
                                           metadata=self._metadata)
        except asyncio.CancelledError:
            if self.closed and not _task_cancelled():
                raise self._closed_error() from None
            raise

    async def generate(self, request: worker_pb2.GenerateRequest,
                       timeout_s: float) -> AsyncIterator[worker_pb2.GenerateChunk]:
        """Stream the request's chunks. Raises ``grpc.aio.AioRpcError`` on failure; closing
        the iterator early cancels the call, which aborts the request on the worker."""
        if self.closed:
            raise self._closed_error()
        call = self._stub.Generate(request, timeout=timeout_s, metadata=self._metadata)
        try:
            async for chunk in call:
                yield chunk
        except asyncio.CancelledError:
            if self.closed and not _task_cancelled():
                raise self._closed_error() from None
            raise
        finally:
            call.cancel()

    async def close(self) -> None:
        """Close the channel, cutting short any call still running on it."""
        self.closed = True
        await self._channel.close()
