"""The asyncio kvmesh client: the same calls as ``Client``, awaitable.

    from kvmesh_client import AsyncClient
    async with AsyncClient("127.0.0.1:50050") as client:
        completion = await client.generate("Hello", max_tokens=16, temperature=0)
        async for chunk in client.stream("Hello", max_tokens=16):
            ...

Deadlines, retries, the message limit and the errors raised are those of ``Client``
(``kvmesh_client.client``).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Sequence

import grpc

from kvmesh_client.calls import Attempts, check_size
from kvmesh_client.channel import ClientOptions
from kvmesh_client.errors import from_rpc_error
from kvmesh_client.types import Chunk, Completion, Model, build_request, join, to_chunk
from kvmesh_proto import serving_pb2, serving_pb2_grpc


class AsyncClient:
    def __init__(self, target: str = "127.0.0.1:50050", options: ClientOptions | None = None, **kw):
        self.options = options or ClientOptions(**kw)
        creds = self.options.credentials()
        args = self.options.channel_args()
        self._channel = (grpc.aio.secure_channel(target, creds, options=args) if creds
                         else grpc.aio.insecure_channel(target, options=args))
        self._stub = serving_pb2_grpc.KVMeshStub(self._channel)

    async def _unary(self, method, request, timeout_s):
        attempts = Attempts(self.options, timeout_s)
        check_size(request, self.options.max_message_bytes)
        while True:
            try:
                return await method(request, timeout=attempts.time_left(),
                                    metadata=self.options.metadata())
            except grpc.aio.AioRpcError as e:
                await asyncio.sleep(attempts.backoff(from_rpc_error(e)))

    def stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
               **params) -> AsyncIterator[Chunk]:
        """Stream an answer (``async for``); the same parameters and contract as
        ``Client.stream``: ValueError and ``InvalidArgument`` for a request that cannot be
        sent are raised here, before iterating."""
        request = build_request(prompt, **params)
        attempts = Attempts(self.options, timeout_s)
        check_size(request, self.options.max_message_bytes)
        return self._stream(request, attempts)

    async def _stream(self, request, attempts: Attempts) -> AsyncIterator[Chunk]:
        while True:
            call = self._stub.Generate(request, timeout=attempts.time_left(),
                                       metadata=self.options.metadata())
            received = False
            try:
                async for msg in call:
                    received = True
                    yield to_chunk(msg)
                return
            except grpc.aio.AioRpcError as e:
                delay = attempts.backoff(from_rpc_error(e), retry=not received)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                       **params) -> Completion:
        return join([c async for c in self.stream(prompt, timeout_s=timeout_s, **params)])

    async def cancel(self, request_id: str, timeout_s: float | None = None) -> bool:
        reply = await self._unary(self._stub.Cancel, serving_pb2.CancelRequest(request_id=request_id),
                                  timeout_s)
        return reply.cancelled

    async def health(self, timeout_s: float | None = None) -> dict:
        reply = await self._unary(self._stub.Health, serving_pb2.HealthRequest(), timeout_s)
        return {"status": reply.status, "workers": dict(reply.workers)}

    async def models(self, timeout_s: float | None = None) -> list[Model]:
        reply = await self._unary(self._stub.ListModels, serving_pb2.ListModelsRequest(), timeout_s)
        return [Model(m.id, m.max_model_len) for m in reply.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
