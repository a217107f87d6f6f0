"""The router's health poll against a real gRPC worker API whose replies we control
(no engine behind it): a late reply is tolerated a few times in a row, a refused call
or an error status marks the worker down at once, and a good reply brings it back."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import grpc
import pytest

from kvmesh_proto import store_pb2, store_pb2_grpc, worker_pb2, worker_pb2_grpc
from kvmesh.router.core import RouterCore, RouterSettings
from kvmesh.router.routing import RoutingPolicy, Worker
from kvmesh.router.stores import StoreProbe
from kvmesh.router.workers import WorkerClient

TIMEOUT_S = 0.2


class ControlledWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self):
        self.delay_s = 0.0
        self.status = "ok"
        self.engine_config = ""

    async def Health(self, request, context):
        await asyncio.sleep(self.delay_s)
        return worker_pb2.HealthReply(status=self.status, role="decode", model="m", max_model_len=64,
                                      engine_config=self.engine_config)


@asynccontextmanager
async def router_with_one_worker(servicer):
    """A router whose only (decode) worker is ``servicer``; yields (server, core, worker)
    and closes the worker's channel and stops the server afterwards."""
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    core = RouterCore(RouterSettings(model="unused", served_model_name="m", prefill=(),
                                     decode=(address,), health_timeout=TIMEOUT_S,
                                     health_timeouts_to_fail=3))
    worker = Worker(address, WorkerClient(address))
    core.routing = RoutingPolicy(prefill=[], decode=[worker])  # what start() builds, minus the poller
    try:
        yield server, core, worker
    finally:
        await worker.client.close()
        await server.stop(None)


def test_late_replies_mark_a_worker_down_only_when_they_repeat():
    async def run():
        servicer = ControlledWorker()
        async with router_with_one_worker(servicer) as (_, core, worker):
            assert (await core.health())[0] and worker.healthy
            servicer.delay_s = TIMEOUT_S * 3
            seen = []
            for _ in range(3):
                ok, status = await core.health()
                seen.append((ok, worker.healthy, next(iter(status.values()))))
            assert [s[:2] for s in seen] == [(True, True), (True, True), (False, False)], seen
            assert seen[0][2].startswith("ok (a late health reply, 1 in a row)")
            assert seen[2][2] == "unavailable (DEADLINE_EXCEEDED)"
            servicer.delay_s = 0.0
            assert (await core.health())[0] and worker.healthy and worker.health_timeouts == 0

    asyncio.run(run())


@pytest.mark.parametrize("failure", ["error status", "refused"])
def test_a_refused_call_or_an_error_status_marks_it_down_at_once(failure):
    async def run():
        servicer = ControlledWorker()
        async with router_with_one_worker(servicer) as (server, core, worker):
            assert (await core.health())[0]
            if failure == "refused":
                await server.stop(None)
            else:
                servicer.status = "error"
            ok, status = await core.health()
            assert not ok and not worker.healthy, status
            if failure == "refused":
                assert next(iter(status.values())) == "unavailable (UNAVAILABLE)"

    asyncio.run(run())


def test_readiness_stays_up_while_a_decode_worker_is_and_answers_from_the_poll():
    """One decode worker down of two (or the prefill worker down) leaves the router ready
    ("degraded", HTTP 200): it still serves. No healthy decode worker: "unavailable", and
    ``decode_down`` says so, naming each decode worker's state (what a request is refused
    with)."""
    async def run():
        up, down = ControlledWorker(), ControlledWorker()
        down.status = "error"
        async with router_with_one_worker(up) as (_, core, first), \
                router_with_one_worker(down) as (_, other, second):
            core.routing = RoutingPolicy(prefill=[], decode=[first, second])
            assert core.readiness()[0] == "ok"  # nothing polled yet: every worker counts as up
            ok, status = await core.health()
            assert not ok and not second.healthy
            state, workers = core.readiness()
            assert state == "degraded" and workers[f"decode {second.address}"] == "error"
            assert core.decode_down() is None
            first.healthy = False  # a failed call marks it down between polls
            state, workers = core.readiness()
            assert state == "unavailable" and workers[f"decode {first.address}"].startswith("down")
            why = core.decode_down()  # what a request is refused with, at once: every worker's state
            assert why.startswith("no decode worker is up")
            assert f"decode {first.address}: down" in why and f"decode {second.address}: error" in why
            core.routing.set_members("decode", [])
            assert "none is configured or registered" in core.decode_down()

    asyncio.run(run())


def test_a_worker_that_left_is_credited_nothing_and_the_request_stands():
    """A request finishing on a decode worker that left the pool meanwhile (discovery)
    must not fail in the routing table's bookkeeping; the worker that served it gets the
    credit."""
    a, b = Worker("a:1", None), Worker("b:1", None)
    routing = RoutingPolicy(prefill=[], decode=[a, b], block_size=4, decode_local_cache=True)
    route = routing.choose(list(range(16)))
    served = b if route.decode is a else a  # a retry moved it to the other one
    routing.record(route, served.address)
    assert routing.choose(list(range(16))).decode is served  # credited where it ran
    route = routing.choose(list(range(16, 32)))
    routing.set_members("decode", [w for w in (a, b) if w is not route.decode])
    routing.record(route)  # its worker left: no KeyError


def test_the_router_learns_from_health_which_decode_workers_keep_a_local_prefix_cache():
    """A decode worker whose reported engine config has vLLM's prefix cache on gets the
    conversations it served back (prefix affinity); one with it off, or reporting nothing,
    is chosen by load alone."""
    async def run():
        servicer = ControlledWorker()
        async with router_with_one_worker(servicer) as (_, core, worker):
            for config, keeps in (('{"enable_prefix_caching": true}', True),
                                  ('{"enable_prefix_caching": false}', False), ("", False), ("{", False),
                                  ('{"enable_prefix_caching": true}', True)):
                servicer.engine_config = config
                await core.health()
                assert worker.local_cache is keeps, config

    asyncio.run(run())
    a, b = Worker("a:1", None, local_cache=True), Worker("b:1", None, local_cache=True)
    routing = RoutingPolicy(prefill=[], decode=[a, b], block_size=4)
    first = routing.choose(list(range(16)))
    routing.record(first)
    first.decode.inflight = 1  # busier than the other, within the load slack
    again = routing.choose(list(range(20)))
    assert again.decode is first.decode and again.reason == "prefix_affinity" and again.cached_tokens == 16
    a.local_cache = b.local_cache = False  # control: without local caches, load decides
    assert routing.choose(list(range(20))).decode is not first.decode


class ControlledStore(store_pb2_grpc.KVStoreServicer):
    async def Stats(self, request, context):
        return store_pb2.StatsReply(capacity_bytes=1)


def test_a_store_that_dies_makes_health_not_ok_and_says_which():
    """The router asks its stores (``--store``) with its workers: a live store is "ok"; a
    stopped one is named "store ADDRESS" with why, and the router is "degraded" (its
    decode worker still serves), never "ok"."""
    async def run():
        store = grpc.aio.server()
        store_pb2_grpc.add_KVStoreServicer_to_server(ControlledStore(), store)
        address = f"127.0.0.1:{store.add_insecure_port('127.0.0.1:0')}"
        await store.start()
        async with router_with_one_worker(ControlledWorker()) as (_, core, worker):
            core.stores = [StoreProbe(address, timeouts_to_fail=3)]
            try:
                ok, status = await core.health()
                assert ok and status[f"store {address}"] == "ok", status
                assert core.readiness()[0] == "ok"
                await store.stop(None)
                ok, status = await core.health()
                assert not ok and status[f"store {address}"] == "unavailable (UNAVAILABLE)", status
                state, shown = core.readiness()
                assert state == "degraded" and shown[f"store {address}"].startswith("unavailable"), shown
            finally:
                await core.stores[0].close()

    asyncio.run(run())


class FixedReadiness:
    """A ``RouterCore`` stand-in whose readiness is fixed (``create_app`` needs no more for
    /health; the lifespan, which would start a real core, is not run)."""

    tokenizer = object()

    def readiness(self):
        return "degraded", {"decode 10.1.2.3:7000": "ok", "store 10.1.2.4:7001": "unavailable (UNAVAILABLE)"}


@pytest.mark.parametrize("token", [None, "sesame"])
def test_public_health_shows_the_state_only_the_token_shows_addresses(token):
    """With an API token, /health without it (or with a wrong one) is the overall status
    alone, on the same status code; with it, every component's address and state. Without
    a token configured everyone gets the detail."""
    from starlette.testclient import TestClient

    from kvmesh.router.app import create_app

    settings = RouterSettings(model="unused", served_model_name="m", api_token=token, grpc_port=0)
    client = TestClient(create_app(settings, FixedReadiness()))
    full = {"status": "degraded", "workers": FixedReadiness().readiness()[1]}
    anyone = client.get("/health")
    wrong = client.get("/health", headers={"authorization": "Bearer nope"})
    holder = client.get("/health", headers={"authorization": f"Bearer {token}"})
    assert anyone.status_code == wrong.status_code == holder.status_code == 200
    assert holder.json() == full
    if token is None:
        assert anyone.json() == full
    else:
        assert anyone.json() == wrong.json() == {"status": "degraded"}
        assert "10.1.2" not in anyone.text
