"""Prefill/decode orchestration for one request.

1. The prefill worker runs the prompt with ``max_tokens=1``; its connector saves the
   prompt's KV blocks to the store before the call returns.
2. The decode worker runs the prompt with the client's sampling parameters; its
   connector loads what the store holds and the engine computes the rest.

Failure contract: a failed or late prefill never fails the request: the decode worker
then finds fewer blocks in the store and computes them itself. A decode failure is
raised to the caller as ``grpc.aio.AioRpcError``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from kvmesh_proto import worker_pb2
from router.workers import WorkerClient

log = logging.getLogger("kvmesh.router")


@dataclass
class RequestTrace:
    """What happened to one request, for the response and the metrics."""

    prefill_ok: bool = False
    prefill_s: float = 0.0
    prefill_tokens_from_store: int = 0
    decode_tokens_from_store: int = 0
    decode_tokens_load_failed: int = 0
    ttft_s: float | None = None
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)


class PDOrchestrator:
    def __init__(self, prefill: WorkerClient, decode: WorkerClient,
                 prefill_timeout_s: float = 120.0, request_timeout_s: float = 600.0):
        self.prefill = prefill
        self.decode = decode
        self.prefill_timeout_s = prefill_timeout_s
        self.request_timeout_s = request_timeout_s

    async def _run_prefill(self, request: worker_pb2.GenerateRequest, trace: RequestTrace) -> None:
        pre = worker_pb2.GenerateRequest()
        pre.CopyFrom(request)
        pre.request_id = request.request_id + "-prefill"
        pre.sampling.CopyFrom(worker_pb2.SamplingParams(max_tokens=1, temperature=0.0))
        start = time.monotonic()
        try:
            async for chunk in self.prefill.generate(pre, self.prefill_timeout_s):
                if chunk.finish_reason:
                    trace.prefill_ok = True
                    trace.prefill_tokens_from_store = chunk.tokens_from_store
        except grpc.aio.AioRpcError as e:
            log.warning("prefill of %s failed (%s: %s); decode will compute the prompt",
                        request.request_id, e.code().name, e.details())
        trace.prefill_s = time.monotonic() - start

    async def generate(self, request: worker_pb2.GenerateRequest,
                       trace: RequestTrace) -> AsyncIterator[worker_pb2.GenerateChunk]:
        """Yield the decode worker's chunks; ``trace`` is filled in as they arrive."""
        start = time.monotonic()
        await self._run_prefill(request, trace)
        remaining = max(1.0, self.request_timeout_s - (time.monotonic() - start))
        async for chunk in self.decode.generate(request, remaining):
            if chunk.token_ids and trace.ttft_s is None:
                trace.ttft_s = time.monotonic() - start
            trace.token_ids.extend(chunk.token_ids)
            if chunk.finish_reason:
                trace.finish_reason = chunk.finish_reason
                trace.decode_tokens_from_store = chunk.tokens_from_store
                trace.decode_tokens_load_failed = chunk.tokens_load_failed
            yield chunk
