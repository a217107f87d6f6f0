"""One engine step's saves (``prefill_workers.step_saves``) against a real store over gRPC."""

import concurrent.futures as cf
import socket
import time

import pytest

from kvmesh.kv_store.client import StoreClient
from kvmesh.kv_store.server import start_store_server
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.tiers import HostTier
from kvmesh.prefill_workers.step_saves import StepSaves


@pytest.fixture
def client():
    srv, port = start_store_server("127.0.0.1", 0, TieredStore([HostTier(1 << 20, page_bytes=1 << 20)]))
    with StoreClient(f"127.0.0.1:{port}", timeout_s=5) as c:
        yield c
    srv.stop(0)


def items(name: str, layers: int = 2) -> list:
    return [(b"%s-L%d" % (name.encode(), layer), name.encode() * 64, None) for layer in range(layers)]


def present(client, name: str) -> bool:
    return client.lookup([[key for key, _, _ in items(name)]]) == 1


def test_saves_computed_over_a_failed_load_never_reach_the_store(client):
    with cf.ThreadPoolExecutor(2) as pool:
        saves = StepSaves(client.put, pool, timeout_s=5)
        for layer_items in zip(items("plain"), items("loaded-ok"), items("loaded-bad")):  # layer by layer
            plain, ok, bad = ([item] for item in layer_items)
            saves.add(plain)  # no load in this step: sent at once
            saves.add(ok, held_for="r-ok")
            saves.add(bad, held_for="r-bad")
        deadline = time.monotonic() + 5
        while not present(client, "plain") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert present(client, "plain") and not present(client, "loaded-ok")  # held until settled
        assert saves.settle(failed={"r-bad"}) == 2
        saves.wait()
    assert present(client, "loaded-ok")
    assert not present(client, "loaded-bad") and client.stats().blocks == 4


def test_saves_still_held_at_the_end_of_the_step_are_dropped(client):
    with cf.ThreadPoolExecutor(2) as pool:
        saves = StepSaves(client.put, pool, timeout_s=5)
        saves.add(items("unsettled"), held_for="r")
        saves.wait()
        saves.wait()  # nothing left: returns at once
    assert client.stats().blocks == 0


def test_a_store_that_is_gone_costs_the_step_at_most_its_deadline():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with StoreClient(f"127.0.0.1:{port}", timeout_s=0.5) as gone, cf.ThreadPoolExecutor(2) as pool:
        saves = StepSaves(gone.put, pool, timeout_s=1.0)
        saves.add(items("lost"))
        saves.add(items("lost-too"), held_for="r")
        saves.settle(failed=set())
        start = time.monotonic()
        saves.wait()  # the puts fail (logged): the blocks become misses
        assert time.monotonic() - start < 2.0
