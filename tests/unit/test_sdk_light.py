import subprocess
import sys


def test_client_sdk_imports_without_the_serving_stack():
    code = ("import sys, kvmesh_client\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'vllm', 'transformers', 'kvmesh'})\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]"


# The SDK against stub servers (real gRPC, in-process): deadlines, retries, message limit.

import asyncio
import math
import threading
import time
from concurrent import futures

import grpc
import pytest

import kvmesh_client
from kvmesh_proto import serving_pb2, serving_pb2_grpc
from kvmesh_proto.options import message_options

ROUTER_MAX_REQUEST_BYTES = 4 * 1024 * 1024


class _Counter(grpc.ServerInterceptor):
    """Counts the calls reaching the server, also those gRPC refuses before the handler."""

    def __init__(self):
        self.calls, self._lock = 0, threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        with self._lock:
            self.calls += 1
        return continuation(handler_call_details)


class _Failing(serving_pb2_grpc.KVMeshServicer):
    """Every call sleeps ``delay_s`` then fails with UNAVAILABLE."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def _fail(self, context):
        time.sleep(self.delay_s)
        context.abort(grpc.StatusCode.UNAVAILABLE, "no worker can serve")

    def Generate(self, request, context):
        self._fail(context)
        yield serving_pb2.GenerateResponse()  # never reached: makes this a stream

    def Health(self, request, context):
        self._fail(context)


@pytest.fixture
def stub_server():
    """Start a stub (``_Failing(delay_s)``) with the router's message limit; yields
    ``(address, counter)``."""
    servers = []

    def start(delay_s: float = 0.0):
        counter = _Counter()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[counter],
                             options=message_options(ROUTER_MAX_REQUEST_BYTES))
        serving_pb2_grpc.add_KVMeshServicer_to_server(_Failing(delay_s), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", counter

    yield start
    for server in servers:
        server.stop(None)


def _outcome(kind: str, address: str, run, **options):
    """``run(client)`` with the sync or the asyncio client (``kind``; for "aio" it returns
    an awaitable); returns (the ``KvmeshError`` raised or None, seconds taken)."""
    started = time.monotonic()
    try:
        if kind == "sync":
            with kvmesh_client.Client(address, **options) as client:
                run(client)
        else:
            async def main():
                async with kvmesh_client.AsyncClient(address, **options) as client:
                    await run(client)
            asyncio.run(main())
    except kvmesh_client.KvmeshError as e:
        return e, time.monotonic() - started
    return None, time.monotonic() - started


CALLS = {"health": lambda client: client.health(), "generate": lambda client: client.generate("hi")}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_the_deadline_covers_all_attempts(stub_server, kind, call):
    address, counter = stub_server(delay_s=1.0)
    # Attempt 1 fails at 1.0 s, the retry starts at 1.2 s; it fails at 2.2 s and its 0.4 s
    # backoff would end past the 2.5 s deadline: the call ends there (not after 3 x 1 s
    # plus backoff, with each attempt given the whole timeout), and a third never starts.
    # Margins of a second or more, for a loaded machine.
    error, took = _outcome(kind, address, CALLS[call], timeout_s=2.5, retries=2,
                           retry_backoff_s=0.2)
    assert isinstance(error, kvmesh_client.DeadlineExceeded), error
    assert 2.0 < took < 3.2, took
    assert counter.calls == 2


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_no_backoff_sleep_past_the_deadline(stub_server, kind, call):
    address, counter = stub_server(delay_s=0.0)
    error, took = _outcome(kind, address, CALLS[call], timeout_s=2.0, retries=1,
                           retry_backoff_s=5.0)
    assert isinstance(error, kvmesh_client.DeadlineExceeded), error
    assert isinstance(error.__cause__, kvmesh_client.Unavailable)
    assert took < 1.8 and counter.calls == 1, (took, counter.calls)  # neither the 5 s sleep nor the deadline


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_timeouts_must_be_finite_and_positive(stub_server, kind):
    address, counter = stub_server()
    for bad in (0, 0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="timeout_s"):
            kvmesh_client.ClientOptions(timeout_s=bad)
    client_class = kvmesh_client.Client if kind == "sync" else kvmesh_client.AsyncClient

    async def check():
        client = client_class(address, retries=0)
        for bad in (0, -1.0, math.nan, math.inf):
            for call in (lambda: client.health(timeout_s=bad),
                         lambda: client.models(timeout_s=bad),
                         lambda: client.cancel("r", timeout_s=bad),
                         lambda: client.generate("hi", timeout_s=bad),
                         lambda: client.stream("hi", timeout_s=bad)):  # at once, not iterated
                with pytest.raises(ValueError, match="timeout_s"):
                    result = call()
                    if asyncio.iscoroutine(result):
                        await result
        closed = client.close()
        if asyncio.iscoroutine(closed):
            await closed

    asyncio.run(check())
    assert counter.calls == 0


def test_the_default_message_limit_is_the_routers():
    from kvmesh.router.settings import RouterSettings

    default = RouterSettings.model_fields["max_request_bytes"].default
    assert kvmesh_client.ClientOptions().max_message_bytes == default == ROUTER_MAX_REQUEST_BYTES


BIG_PROMPT = "x" * (5 * 1024 * 1024)


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_an_oversized_request_is_refused_before_sending(stub_server, kind):
    address, counter = stub_server()
    error, _ = _outcome(kind, address, lambda client: client.generate(BIG_PROMPT))
    assert isinstance(error, kvmesh_client.InvalidArgument), error
    assert "message limit" in error.details
    assert counter.calls == 0  # nothing sent, so nothing retried


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_message_over_the_servers_limit_is_invalid_not_overloaded(stub_server, kind):
    address, counter = stub_server()
    # A client allowing more than the server: gRPC's RESOURCE_EXHAUSTED "message larger
    # than max" is a request that can never succeed, not an overload to retry.
    error, _ = _outcome(kind, address, lambda client: client.generate(BIG_PROMPT),
                        max_message_bytes=16 * 1024 * 1024, retries=2, retry_backoff_s=0.0)
    assert isinstance(error, kvmesh_client.InvalidArgument), error
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert counter.calls == 1
