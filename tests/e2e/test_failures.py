"""Transfers that fail: a store that stalls past the deadline, a store or a prefill worker
killed mid-transfer. Store, prefill and decode run as separate processes on different
loopback addresses; every request must still complete, correctly, in bounded time."""

from __future__ import annotations

import random
import threading
import time

import grpc
import httpx
import pytest

from kvmesh.cluster.local import LocalCluster
from kvmesh.kv_store.auth import call_metadata
from kvmesh.kv_store.client import StoreClient
from kvmesh_proto import worker_pb2, worker_pb2_grpc
from tests.colocated import reference_table

BLOCK = 32
MAX_TOKENS = 8
STORE_TIMEOUT_S = 2.0
BOUND_S = 40.0  # a request that needs longer than this hangs, as far as the tests go
PROMPTS = [[rng.randrange(10, 1000) for _ in range(n)]
           for rng, n in ((random.Random(21), 200), (random.Random(22), 150),
                          (random.Random(23), 260), (random.Random(24), 180))]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return reference_table(tiny_model, PROMPTS, MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      hosts={"store": "127.0.0.2", "prefill": "127.0.0.3", "decode": "127.0.0.4"},
                      worker_args=("--store-timeout", str(STORE_TIMEOUT_S)),
                      router_args=("--max-local-prefill-tokens", "0", "--max-decode-prefill-tokens", "0"),
                      decode_local_cache=False,  # every cached prefix comes through the store
                      allow_fault_injection=True, run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


def complete(cluster, prompt) -> tuple[dict, float]:
    start = time.monotonic()
    r = httpx.post(cluster.router_url + "/v1/completions", timeout=BOUND_S + 20, json={
        "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json(), time.monotonic() - start


def decode_running(cluster) -> int:
    with grpc.insecure_channel(cluster.decode_address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Health(worker_pb2.HealthRequest(), timeout=5,
                                                     metadata=call_metadata(cluster.secret)).running


def test_components_on_separate_addresses_match_colocated(cluster, reference):
    assert {a.split(":")[0] for a in (cluster.store_address, cluster.prefill_address,
                                      cluster.decode_address)} == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    r, _ = complete(cluster, PROMPTS[0])
    assert r["kvmesh"]["prefix_tokens_from_store"]["decode"] == (len(PROMPTS[0]) - 1) // BLOCK * BLOCK
    assert r["kvmesh"]["kv_load_failed_tokens"] == 0  # every one of them loaded
    assert r["choices"][0]["token_ids"] == reference[tuple(PROMPTS[0])]


def test_a_stall_longer_than_the_deadline_means_recompute(cluster, reference):
    with StoreClient(cluster.store_address, secret=cluster.secret) as store:
        store.inject_fault("stall", seconds=3 * STORE_TIMEOUT_S)
        try:
            r, elapsed = complete(cluster, PROMPTS[1])
        finally:
            store.inject_fault("stall", seconds=0)
    assert r["choices"][0]["token_ids"] == reference[tuple(PROMPTS[1])]
    assert r["kvmesh"]["prefix_tokens_from_store"]["decode"] == 0  # the lookup timed out
    assert elapsed < BOUND_S
    assert decode_running(cluster) == 0


def _request_while(cluster, prompt, action, delay_s: float) -> tuple[dict, float]:
    """Send ``prompt`` and run ``action`` ``delay_s`` later, mid-transfer."""
    timer = threading.Timer(delay_s, action)
    timer.start()
    try:
        return complete(cluster, prompt)
    finally:
        timer.cancel()


def test_prefill_killed_mid_transfer(cluster, reference):
    with StoreClient(cluster.store_address, secret=cluster.secret) as store:
        store.inject_fault("stall", seconds=3 * STORE_TIMEOUT_S)  # holds the saves in flight
        try:
            r, elapsed = _request_while(cluster, PROMPTS[2], lambda: cluster.kill("prefill"), 1.0)
        finally:
            store.inject_fault("stall", seconds=0)
    assert not r["kvmesh"]["prefill_ok"]
    assert r["choices"][0]["token_ids"] == reference[tuple(PROMPTS[2])]
    assert elapsed < BOUND_S
    assert decode_running(cluster) == 0


def test_store_killed_mid_transfer(cluster, reference):
    """Runs last: the store stays dead; decode then computes everything itself."""
    prompt = PROMPTS[0]  # its blocks are in the store since the first test
    with StoreClient(cluster.store_address, secret=cluster.secret) as store:
        store.inject_fault("stall", seconds=30)  # gets now hang (lookups still answer) ...
    r, elapsed = _request_while(cluster, prompt, lambda: cluster.kill("store"), 1.0)  # ... until it dies
    loaded = (len(prompt) - 1) // BLOCK * BLOCK
    assert r["kvmesh"]["prefix_tokens_from_store"]["decode"] == loaded  # found, then lost mid-get
    assert r["kvmesh"]["kv_load_failed_tokens"] == loaded
    assert r["choices"][0]["token_ids"] == reference[tuple(prompt)]
    assert elapsed < BOUND_S
    again, elapsed = complete(cluster, PROMPTS[3])  # and the cluster keeps serving
    assert again["choices"][0]["token_ids"] == reference[tuple(PROMPTS[3])] and elapsed < BOUND_S
    assert again["kvmesh"]["prefix_tokens_from_store"]["decode"] == 0
    assert decode_running(cluster) == 0
