"""Two store nodes sharing a Redis block index, with real vLLM workers on the CPU.

The prefill worker writes to store0, the decode worker reads through store1: every block
the decode worker loads was found through the index and fetched from the other node.
"""

from __future__ import annotations

import random
import time

import pytest

from kvmesh.cluster.local import LocalCluster
from kvmesh.kv_store.index import RedisBlockIndex
from tests.colocated import reference_table
from tests.e2e.test_disaggregation import BLOCK, MAX_TOKENS, complete

HEARTBEAT_TIMEOUT_S = 2.0
PROMPTS = [[rng.randrange(10, 1000) for _ in range(n)]
           for rng, n in ((random.Random(11), 150), (random.Random(12), 230), (random.Random(13), 97))]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return reference_table(tiny_model, PROMPTS, MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_url, tmp_path_factory):
    store_args = ("--heartbeat", "0.5", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S))
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      num_stores=2, index_url=redis_url, store_args=store_args,
                      store_capacity_bytes=64 << 20,
                      run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


def test_blocks_written_on_one_node_are_fetched_through_the_other(cluster, reference):
    for prompt in PROMPTS[:2]:
        r = complete(cluster, prompt)
        assert r["kvmesh"]["prefix_tokens_from_store"]["decode"] == (len(prompt) - 1) // BLOCK * BLOCK
        # loaded, not recomputed: store1 fetched the blocks from store0 and leased them out
        assert r["kvmesh"]["kv_load_failed_tokens"] == 0
        assert r["kvmesh"]["kv_transfer"]["backend"] in ("shm", "nixl", "grpc")
        assert r["choices"][0]["token_ids"] == reference[tuple(prompt)]


def test_a_killed_node_leaves_lookups_and_requests_recompute(cluster, redis_url, reference):
    index = RedisBlockIndex.from_url(redis_url, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    try:
        assert {"store0", "store1"} <= set(index.live_nodes())
        cluster.kill("store0")
        killed = time.monotonic()
        while "store0" in index.live_nodes():
            assert time.monotonic() - killed < HEARTBEAT_TIMEOUT_S + 2, "dead node still listed"
            time.sleep(0.1)
    finally:
        index.close()
    prompt = PROMPTS[2]  # never stored anywhere: prefill cannot save it (its store is dead)
    r = complete(cluster, prompt)
    assert r["kvmesh"]["prefix_tokens_from_store"]["decode"] == 0
    assert r["choices"][0]["token_ids"] == reference[tuple(prompt)]
    again = complete(cluster, PROMPTS[0])  # store1 kept its own copy of what it fetched
    assert again["choices"][0]["token_ids"] == reference[tuple(PROMPTS[0])]


def test_standalone_processes_find_each_other_through_redis(tiny_model, redis_url, reference,
                                                            tmp_path_factory):
    """No addresses given: workers find their store in the index and announce themselves;
    the router discovers the workers."""
    own_db = redis_url.rsplit("/", 1)[0] + "/1"  # apart from the other cluster's index
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      index_url=own_db, discover=True, store_capacity_bytes=64 << 20,
                      run_dir=tmp_path_factory.mktemp("standalone")) as c:
        for prompt in PROMPTS[:2]:
            r = complete(c, prompt)
            assert r["choices"][0]["token_ids"] == reference[tuple(prompt)]
            assert r["kvmesh"]["prefix_tokens_from_store"]["decode"] == (len(prompt) - 1) // BLOCK * BLOCK
            assert r["kvmesh"]["kv_load_failed_tokens"] == 0
