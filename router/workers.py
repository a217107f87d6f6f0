"""Asynchronous client of one worker's gRPC API (prefill or decode)."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from kvmesh_proto.options import message_options
from kvmesh_proto import worker_pb2, worker_pb2_grpc


class WorkerClient:
    def __init__(self, address: str):
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=message_options())
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)

    async def health(self, timeout_s: float = 2.0) -> worker_pb2.HealthReply:
        return await self._stub.Health(worker_pb2.HealthRequest(), timeout=timeout_s)

    async def generate(self, request: worker_pb2.GenerateRequest,
                       timeout_s: float) -> AsyncIterator[worker_pb2.GenerateChunk]:
        """Stream the request's chunks. Raises ``grpc.aio.AioRpcError`` on failure; closing
        the iterator early cancels the call, which aborts the request on the worker."""
        call = self._stub.Generate(request, timeout=timeout_s)
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()
