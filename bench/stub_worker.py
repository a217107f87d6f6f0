"""A stub worker for measuring the router itself: the worker gRPC API with no engine.

It answers ``Generate`` with ``max_tokens`` made-up tokens (at once, or one every
``token_delay_s``) and ``Health`` with a fixed context length and the calls it is running.
It computes nothing and stores nothing: it exists so that a benchmark can subtract
everything that is not the router, and so that tests of the router can stand it in for
a vLLM worker.
"""

from __future__ import annotations

import asyncio

import grpc

from kvmesh_proto import worker_pb2, worker_pb2_grpc
from kvmesh_proto.options import bind_port, host_port, message_options


class StubWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, role: str, max_model_len: int = 4096, token_delay_s: float = 0.0):
        self.role = role
        self.max_model_len = max_model_len
        self.token_delay_s = token_delay_s
        self.calls = 0      # Generate calls received
        self.running = 0    # Generate calls in progress
        self.completed = 0  # Generate calls that sent their last chunk
        self.sessions: list[str] = []  # each Generate call's session id, in order

    async def Generate(self, request, context):
        n = request.sampling.max_tokens
        self.calls += 1
        self.sessions.append(request.session)
        self.running += 1
        try:
            for i in range(n):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                last = i == n - 1
                yield worker_pb2.GenerateChunk(
                    token_ids=[(request.prompt_token_ids[-1] + i) % 100], text="x",
                    finish_reason="length" if last else "",
                    num_prompt_tokens=len(request.prompt_token_ids) if last else 0)
            self.completed += 1
        finally:
            self.running -= 1

    async def Health(self, request, context):
        return worker_pb2.HealthReply(status="ok", role=self.role, model="stub",
                                      max_model_len=self.max_model_len, running=self.running)


async def start_stub(role: str, host: str = "127.0.0.1", port: int = 0,
                     stub: StubWorker | None = None) -> tuple[grpc.aio.Server, str]:
    """Serve ``stub`` (a new ``StubWorker(role)`` when None) on ``host:port`` (0: any free
    port); returns the started server and its address."""
    server = grpc.aio.server(options=message_options())
    worker_pb2_grpc.add_WorkerServicer_to_server(stub or StubWorker(role), server)
    bound = bind_port(server, host, port, f"the {role} stub worker")
    await server.start()
    return server, host_port(host, bound)
