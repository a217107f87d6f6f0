"""The worker API over real gRPC (``start_worker_server``, as ``kvmesh prefill|decode``
serves it) in front of a stand-in engine: it refuses callers without the cluster secret,
holds every ``Generate`` to the router's bounds and to ``max_requests``, and the router's
worker client carries the secret."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from kvmesh.engine_host.service import WorkerService, start_worker_server
from kvmesh.engine_host.settings import DecodeSettings
from kvmesh.kv_store.auth import call_metadata
from kvmesh.router.workers import WorkerClient
from kvmesh_proto import worker_pb2, worker_pb2_grpc

SECRET = "the-cluster-secret-of-this-test"
MAX_MODEL_LEN, VOCAB = 128, 1000


class StandInEngine:
    """What ``WorkerService`` uses of an AsyncLLM; counts the requests that reach it and
    holds each until ``release`` is set."""

    def __init__(self):
        model = SimpleNamespace(max_model_len=MAX_MODEL_LEN, model="m", dtype="float32",
                                quantization=None, get_vocab_size=lambda: VOCAB)
        cache = SimpleNamespace(block_size=16, num_gpu_blocks=8, num_gpu_blocks_override=None,
                                cache_dtype="auto", enable_prefix_caching=False)
        self.vllm_config = SimpleNamespace(
            model_config=model, cache_config=cache, speculative_config=None,
            scheduler_config=SimpleNamespace(max_num_seqs=4, max_num_batched_tokens=256, policy="fcfs"),
            parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1))
        self.requests: list[tuple[dict, object]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def generate(self, prompt, params, request_id):
        self.requests.append((prompt, params))
        await self.release.wait()
        yield SimpleNamespace(
            finished=True, outputs=[SimpleNamespace(token_ids=[7], text="x", finish_reason="length")],
            prompt_token_ids=prompt["prompt_token_ids"], num_cached_tokens=0, kv_transfer_params=None,
            metrics=None)


def _request(**sampling) -> worker_pb2.GenerateRequest:
    fields = {"max_tokens": 4, "temperature": 0.0, **sampling}
    prompt = fields.pop("prompt", [1, 2, 3])
    extra = {k: fields.pop(k) for k in ("cache_salt", "request_id") if k in fields}
    return worker_pb2.GenerateRequest(request_id=extra.get("request_id", "r1"), prompt_token_ids=prompt,
                                      cache_salt=extra.get("cache_salt", ""),
                                      sampling=worker_pb2.SamplingParams(**fields))


def _serve(check, max_requests: int = 512):
    """Run ``check(address, engine)`` against a worker with the secret, on its own loop."""
    async def main():
        engine = StandInEngine()
        service = WorkerService(engine, DecodeSettings(port=0, max_requests=max_requests))
        server, port = await start_worker_server(service, "127.0.0.1", 0, SECRET)
        try:
            await check(f"127.0.0.1:{port}", engine)
        finally:
            await server.stop(None)
    asyncio.run(main())


async def _generate(address: str, request, metadata=()) -> list[worker_pb2.GenerateChunk]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        return [c async for c in stub.Generate(request, timeout=10, metadata=metadata)]


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("metadata", [(), call_metadata("a-wrong-secret"), call_metadata(SECRET[:-1]),
                                      (("authorization", f"Bearer {SECRET}"),)])
def test_the_worker_refuses_callers_without_the_secret(metadata):
    async def check(address, engine):
        assert await _code(_generate(address, _request(), metadata)) == grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(address) as channel:
            health = worker_pb2_grpc.WorkerStub(channel).Health(worker_pb2.HealthRequest(), timeout=5,
                                                                metadata=metadata)
            assert await _code(health) == grpc.StatusCode.UNAUTHENTICATED
        assert engine.requests == []  # nothing reached the engine
        # the control: the same request with the secret runs
        chunks = await _generate(address, _request(), call_metadata(SECRET))
        assert chunks[-1].finish_reason == "length" and len(engine.requests) == 1
    _serve(check)


BAD_REQUESTS = {
    "max_tokens 2^32-1": _request(max_tokens=2**32 - 1),
    "max_tokens 0": _request(max_tokens=0),
    "prompt plus max_tokens past the context": _request(prompt=[1] * 100, max_tokens=29),
    "a prompt as long as the context": _request(prompt=[1] * MAX_MODEL_LEN, max_tokens=1),
    "an empty prompt": _request(prompt=[]),
    "a token outside the vocabulary": _request(prompt=[1, VOCAB]),
    "a negative token": _request(prompt=[-1, 2]),
    "temperature above 2": _request(temperature=2.5),
    "temperature NaN": _request(temperature=float("nan")),
    "top_p above 1": _request(top_p=1.5),
    "top_k below -1": _request(top_k=-2),
    "17 stop strings": _request(stop=["s"] * 17),
    "a stop string of 257 characters": _request(stop=["s" * 257]),
    "a cache salt of 257 characters": _request(cache_salt="s" * 257),
    "an empty request id": _request(request_id=""),
    "a request id of 257 characters": _request(request_id="r" * 257),
}


def test_the_worker_holds_generate_to_the_routers_bounds():
    async def check(address, engine):
        for name, request in BAD_REQUESTS.items():
            assert await _code(_generate(address, request, call_metadata(SECRET))) \
                == grpc.StatusCode.INVALID_ARGUMENT, name
        assert engine.requests == []
        # the control: the largest request within bounds runs
        edge = _request(prompt=[VOCAB - 1] * 100, max_tokens=MAX_MODEL_LEN - 100, temperature=2.0,
                        top_p=1.0, top_k=-1, stop=["s" * 256] * 16, cache_salt="s" * 256,
                        request_id="r" * 136)
        chunks = await _generate(address, edge, call_metadata(SECRET))
        assert chunks[-1].finish_reason and len(engine.requests) == 1
        assert engine.requests[0][1].max_tokens == MAX_MODEL_LEN - 100
    _serve(check)


def test_the_worker_refuses_requests_past_max_requests():
    async def check(address, engine):
        engine.release.clear()
        held = [asyncio.ensure_future(_generate(address, _request(request_id=f"r{i}"), call_metadata(SECRET)))
                for i in range(2)]
        while len(engine.requests) < 2:
            await asyncio.sleep(0.01)
        assert await _code(_generate(address, _request(request_id="r3"), call_metadata(SECRET))) \
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        engine.release.set()
        assert all(chunks[-1].finish_reason for chunks in await asyncio.gather(*held))
        assert (await _generate(address, _request(request_id="r4"), call_metadata(SECRET)))[-1].finish_reason
    _serve(check, max_requests=2)


def test_the_routers_worker_client_carries_the_secret():
    async def check(address, engine):
        member, stranger = WorkerClient(address, secret=SECRET), WorkerClient(address)
        try:
            assert (await member.health()).status == "ok"
            chunks = [c async for c in member.generate(_request(), timeout_s=10)]
            assert chunks[-1].finish_reason == "length"
            assert await _code(stranger.health()) == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await member.close()
            await stranger.close()
    _serve(check)
