"""Each transfer backend end to end: store, prefill and decode workers as separate
processes on different loopback addresses; one decode worker per backend (shared memory,
NIXL, gRPC streaming, and the store's plain Get), and one more over shared memory that
loads every layer before computing (``--no-layerwise``). Outputs equal the colocated run;
with the stored KV replaced by noise they differ. Each decode reports its load path."""

from __future__ import annotations

import asyncio
import random

import pytest

from kvmesh.cluster.local import LocalCluster
from kvmesh.kv_store.client import StoreClient
from tests.colocated import prefill_then_decode, reference_table

BLOCK = 32
MAX_TOKENS = 8
BACKENDS = ["shm", "nixl", "grpc", "get"]
# (backend, load mode) of each decode worker: every backend layer by layer, and shared
# memory with everything loaded first
WORKERS = [(b, "layerwise") for b in BACKENDS] + [("shm", "load_all")]
PROMPTS = [[rng.randrange(10, 1000) for _ in range(n)]
           for rng, n in ((random.Random(31), 300), (random.Random(32), 97))]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return reference_table(tiny_model, PROMPTS, MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      decode_local_cache=False,  # every cached prefix comes through the store
                      hosts={"store": "127.0.0.2", "prefill": "127.0.0.3", "decode": "127.0.0.4"},
                      decode_workers=len(WORKERS),
                      decode_worker_args=tuple(("--transfer-preference", b) + (() if mode == "layerwise"
                                                                              else ("--no-layerwise",))
                                               for b, mode in WORKERS),
                      allow_fault_injection=True, run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


@pytest.mark.parametrize("backend,mode", WORKERS)
def test_every_backend_carries_the_kv(cluster, reference, backend, mode):
    address = cluster.decode_addresses[WORKERS.index((backend, mode))]
    with StoreClient(cluster.store_address, secret=cluster.secret) as store:
        for prompt in PROMPTS:
            store.drop()
            tokens, last = asyncio.run(prefill_then_decode(cluster.prefill_address, address, prompt, MAX_TOKENS,
                                                           secret=cluster.secret))
            loaded = (len(prompt) - 1) // BLOCK * BLOCK
            assert last.kv_backend == backend
            assert last.tokens_from_store == loaded and last.tokens_load_failed == 0
            assert last.kv_bytes > 0
            # the load path: lookup, then lease to the last block in the paged cache
            assert last.kv_placed_s >= last.kv_transfer_s > 0 and last.kv_read_s > 0
            assert last.kv_load_path_s == pytest.approx(last.lookup_s + last.kv_placed_s)
            assert tokens == reference[tuple(prompt)]
        # The negative control: the same path with the stored KV replaced by noise.
        store.drop()
        tokens, last = asyncio.run(prefill_then_decode(
            cluster.prefill_address, address, PROMPTS[0], MAX_TOKENS, lambda: store.inject_fault("noise"),
            secret=cluster.secret))
        assert last.kv_backend == backend and last.tokens_load_failed == 0
        assert tokens != reference[tuple(PROMPTS[0])]
        store.drop()
        assert store.stats().leases == 0  # every lease was released
