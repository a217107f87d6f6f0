"""A stub worker for measuring the router itself: the worker gRPC API with no engine.

It answers ``Generate`` at once with ``max_tokens`` made-up tokens and ``Health`` with a
fixed context length. It computes nothing and stores nothing: it exists so that a
benchmark can subtract everything that is not the router.
"""

from __future__ import annotations

import grpc

from kvmesh_proto import worker_pb2, worker_pb2_grpc


class StubWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, role: str, max_model_len: int = 4096):
        self.role = role
        self.max_model_len = max_model_len

    async def Generate(self, request, context):
        n = request.sampling.max_tokens
        for i in range(n):
            last = i == n - 1
            yield worker_pb2.GenerateChunk(
                token_ids=[(request.prompt_token_ids[-1] + i) % 100], text="x",
                finish_reason="length" if last else "",
                num_prompt_tokens=len(request.prompt_token_ids) if last else 0)

    async def Health(self, request, context):
        return worker_pb2.HealthReply(status="ok", role=self.role, model="stub",
                                      max_model_len=self.max_model_len)


async def start_stub(role: str, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(StubWorker(role), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, f"{host}:{bound}"
