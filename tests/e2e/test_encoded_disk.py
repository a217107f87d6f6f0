"""End to end through compressed host and disk tiers: real vLLM engines on the CPU, a
real store process whose host tier holds blocks lz4-compressed and whose disk tier holds
them zstd-compressed, the router over HTTP.

Each prompt's blocks are read from the host tier as decoded copies the store makes in its
shared region for the reader's lease; a prompt's blocks are pushed from host RAM to disk
by later prompts (a host tier of 96 blocks as put: a lease needs room for the encoded
blocks and their decoded copies, 36 of each for the longest prompt), re-encoded on the
way, then the prompt comes again: its prefix is read back from disk, decoded, promoted
and loaded. Every time the greedy tokens must equal a colocated vLLM run's, with no load
failing. Both tiers' bytes at rest are fewer than their blocks' own (the KV really was
compressed).
"""

from __future__ import annotations

import random

import pytest

from kvmesh.cluster.local import LocalCluster
from kvmesh.kv_store.client import StoreClient
from tests.colocated import reference_table
from tests.e2e.test_disaggregation import BLOCK, complete, metric

_rng = random.Random(19)
PROMPTS = [[_rng.randrange(10, 1000) for _ in range(n)] for n in (300, 200, 260, 230)]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return reference_table(tiny_model, PROMPTS, 12, BLOCK, tmp_path_factory.mktemp("colocated"))


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    store_args = ("--page-bytes", "32KiB", "--disk-bytes", "64MiB", "--disk-encoding", "zstd",
                  "--host-encoding", "lz4")
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      store_capacity_bytes=768 * 1024, store_args=store_args,
                      router_args=("--max-local-prefill-tokens", "0", "--max-decode-prefill-tokens", "0"),
                      decode_local_cache=False,  # every cached prefix comes through the store
                      run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


def test_prefix_read_back_from_compressed_host_and_disk_tiers_matches_colocated(cluster, reference):
    first = PROMPTS[0]  # 300 tokens: 9 blocks x the model's layers
    for prompt in PROMPTS:  # more than the host tier holds: `first` goes to disk
        answer = complete(cluster, prompt)  # its KV read from decoded copies in host RAM
        assert answer["choices"][0]["token_ids"] == reference[tuple(prompt)]
        assert answer["kvmesh"]["prefix_tokens_from_store"]["decode"] == (len(prompt) - 1) // BLOCK * BLOCK
        assert answer["kvmesh"]["kv_load_failed_tokens"] == 0
    with StoreClient(cluster.store_address, secret=cluster.secret) as client:
        tiers = {t.name: t for t in client.stats().tiers}
    host, disk = tiers["host"], tiers["disk"]
    assert disk.encoding == "zstd" and disk.blocks > 0
    assert 0 < disk.used_bytes < disk.block_bytes  # held compressed
    assert host.encoding == "lz4" and host.blocks > 0
    assert 0 < host.used_bytes < host.block_bytes  # held compressed, no lease's copy left
    disk_hits = lambda: metric(cluster, "kvmesh_store_hits_total", '{tier="disk"}', cluster.store_metrics_url)
    before = disk_hits()
    again = complete(cluster, first)
    assert disk_hits() > before  # read back from disk, decoded
    assert again["kvmesh"]["prefix_tokens_from_store"]["decode"] == (len(first) - 1) // BLOCK * BLOCK
    assert again["kvmesh"]["kv_load_failed_tokens"] == 0
    assert again["choices"][0]["token_ids"] == reference[tuple(first)]
