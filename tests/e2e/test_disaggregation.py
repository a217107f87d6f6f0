"""End to end: real vLLM engines on the CPU, a real store process, the router over HTTP.

Correctness is greedy-token equality with a colocated vLLM run of the same model, and
every equality check has a negative control: with the stored KV replaced by noise the
outputs differ, which proves the decode worker really used the transferred bytes.
"""

from __future__ import annotations

import asyncio
import json
import random
import re

import httpx
import pytest

from kvmesh.cluster.local import LocalCluster
from kvmesh.kv_store.client import StoreClient
from tests.colocated import prefill_then_decode, reference_table

BLOCK = 32
MAX_TOKENS = 12
# Shorter than a block, exact multiples of it, and in between.
LENGTHS = [5, 31, 32, 33, 64, 65, 100, 128, 200, 300]
_rng = random.Random(7)
PREFIX = [_rng.randrange(10, 1000) for _ in range(256)]
SHARED = [PREFIX + [_rng.randrange(10, 1000) for _ in range(20)] for _ in range(2)]


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(10, 1000) for _ in range(n)] for n in LENGTHS]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> dict[tuple[int, ...], list[int]]:
    return reference_table(tiny_model, PROMPTS + SHARED, MAX_TOKENS, BLOCK,
                           tmp_path_factory.mktemp("colocated"))


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory, production_executor):
    # A host tier of 64 blocks (of 8 KiB: one layer of one block) over a disk tier, so
    # that the workload below spills to disk and is served back from it; a quarter of
    # host RAM is kept free by the demoter, in the background.
    store_args = ("--page-bytes", "64KiB", "--disk-bytes", "64MiB", "--demote-ahead", "0.25")
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      store_capacity_bytes=512 * 1024, store_args=store_args,
                      # Always disaggregate (but for prompts shorter than one block).
                      router_args=("--max-local-prefill-tokens", "0", "--max-decode-prefill-tokens", "0"),
                      decode_local_cache=False,  # every cached prefix comes through the store
                      allow_fault_injection=True, run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


@pytest.fixture
def store(cluster):
    """The cluster's store, emptied before and after each test."""
    with StoreClient(cluster.store_address, secret=cluster.secret) as client:
        client.drop()
        yield client
        client.drop()


def complete(cluster, prompt, **extra) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True, **extra}
    r = httpx.post(cluster.router_url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def metric(cluster, name: str, labels: str = "", url: str | None = None) -> float:
    text = httpx.get(url or cluster.router_url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_outputs_match_colocated(cluster, store, reference):
    for prompt in PROMPTS:
        r = complete(cluster, prompt)
        assert r["choices"][0]["token_ids"] == reference[tuple(prompt)], f"prompt of {len(prompt)}"
        # Every full block but the one holding the last prompt token comes from the store.
        expected = (len(prompt) - 1) // BLOCK * BLOCK
        assert r["kvmesh"]["prefix_tokens_from_store"]["decode"] == expected
        assert r["kvmesh"]["prefill_skipped"] == (len(prompt) < BLOCK)
        assert r["kvmesh"]["kv_load_failed_tokens"] == 0


def test_streaming_matches_colocated(cluster, store, reference):
    for prompt in PROMPTS[3:6]:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "stream": True, "return_token_ids": True}
        tokens, text_parts, finish = [], [], None
        with httpx.stream("POST", cluster.router_url + "/v1/completions", json=body,
                          timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                tokens += chunk["choices"][0]["token_ids"]
                text_parts.append(chunk["choices"][0]["text"])
                finish = chunk["choices"][0]["finish_reason"] or finish
        assert tokens == reference[tuple(prompt)]
        assert finish == "length"
        assert "".join(text_parts) == complete(cluster, prompt)["choices"][0]["text"]


def test_shared_prefix_comes_from_store(cluster, store, reference):
    first = complete(cluster, SHARED[0])
    assert first["kvmesh"]["prefix_tokens_from_store"]["prefill"] == 0
    before = metric(cluster, "kvmesh_router_prefix_tokens_from_store_total", '{stage="prefill"}')
    second = complete(cluster, SHARED[1])
    after = metric(cluster, "kvmesh_router_prefix_tokens_from_store_total", '{stage="prefill"}')
    # The 256-token prefix (8 blocks) was computed once, then loaded by the second prefill.
    assert second["kvmesh"]["prefix_tokens_from_store"]["prefill"] == len(PREFIX)
    assert second["kvmesh"]["kv_load_failed_tokens"] == 0
    assert after - before == len(PREFIX)
    assert first["choices"][0]["token_ids"] == reference[tuple(SHARED[0])]
    assert second["choices"][0]["token_ids"] == reference[tuple(SHARED[1])]


def test_prefix_demoted_to_disk_is_served_from_disk(cluster, store, reference):
    first = PROMPTS[-1]  # 300 tokens: 9 blocks x 4 layers
    complete(cluster, first)
    for prompt in PROMPTS[-4:-1]:  # more than the host tier holds pushes `first` to disk
        complete(cluster, prompt)
    disk_hits = lambda: metric(cluster, "kvmesh_store_hits_total", '{tier="disk"}', cluster.store_metrics_url)
    demoted = metric(cluster, "kvmesh_store_demotions_total", '{tier="host"}', cluster.store_metrics_url)
    ahead = metric(cluster, "kvmesh_store_demotions_ahead_total", '{tier="host"}', cluster.store_metrics_url)
    assert demoted >= ahead > 0
    before = disk_hits()
    again = complete(cluster, first)
    assert disk_hits() > before
    assert again["kvmesh"]["prefix_tokens_from_store"]["decode"] == (len(first) - 1) // BLOCK * BLOCK
    assert again["kvmesh"]["kv_load_failed_tokens"] == 0
    assert again["choices"][0]["token_ids"] == reference[tuple(first)]


async def _prefill_then_decode(cluster, prompt, between):
    return await prefill_then_decode(cluster.prefill_address, cluster.decode_address, prompt,
                                     MAX_TOKENS, between, secret=cluster.secret)


LONG = [p for p in PROMPTS if len(p) > 2 * BLOCK]


@pytest.mark.parametrize("fault", ["flip", "vanish"])
def test_damaged_or_missing_blocks_are_recomputed(cluster, store, reference, fault):
    for prompt in LONG:
        tokens, out = asyncio.run(_prefill_then_decode(
            cluster, prompt, lambda: store.inject_fault(fault)))
        loaded = (len(prompt) - 1) // BLOCK * BLOCK
        assert out.tokens_from_store == loaded  # the lookup saw the blocks ...
        assert out.tokens_load_failed == loaded  # ... the load found them unusable ...
        assert tokens == reference[tuple(prompt)]  # ... and recompute fixed it
        store.drop()


def test_dropped_blocks_are_computed(cluster, store, reference):
    for prompt in LONG:
        tokens, out = asyncio.run(_prefill_then_decode(cluster, prompt, lambda: store.drop()))
        assert out.tokens_from_store == 0
        assert tokens == reference[tuple(prompt)]


def test_negative_control_noise_changes_outputs(cluster, store, reference):
    """KV replaced by noise (with valid checksums) must change the output: the decode
    worker really computes from the transferred KV, so equality above means something."""
    for prompt in LONG:
        tokens, out = asyncio.run(_prefill_then_decode(
            cluster, prompt, lambda: store.inject_fault("noise")))
        assert out.tokens_from_store > 0 and out.tokens_load_failed == 0
        assert tokens != reference[tuple(prompt)], f"prompt of {len(prompt)}"
        store.drop()


@pytest.mark.parametrize("body,status,needle", [
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "", "max_tokens": 4}, 400, "empty"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": [1, 2, 100000]}, 400, "vocabulary"),
    ({"prompt": "hi", "model": "not-this-one"}, 404, "not-this-one"),
    ({"prompt": [5] * 4096, "max_tokens": 4}, 400, "context"),
])
def test_bad_requests_get_clear_4xx(cluster, body, status, needle):
    r = httpx.post(cluster.router_url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_invalid_json_and_cluster_keeps_serving(cluster, store, reference):
    r = httpx.post(cluster.router_url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    prompt = PROMPTS[4]
    assert complete(cluster, prompt)["choices"][0]["token_ids"] == reference[tuple(prompt)]
    assert httpx.get(cluster.router_url + "/health", timeout=10).json()["status"] == "ok"


def test_every_turn_is_kept_for_the_next(cluster, store, reference, tiny_model, tmp_path):
    """The decode worker saves the blocks it generated: the next turn (history + answer +
    a new message) loads the answer's KV from the store instead of computing it, and
    still produces the colocated tokens."""
    rng = random.Random(5)
    first = [rng.randrange(10, 1000) for _ in range(120)]  # 3 blocks and 24 tokens
    r1 = complete(cluster, first)
    answer = r1["choices"][0]["token_ids"]
    # 120 prompt + 11 generated tokens have KV: the 4th block (24 + 8) is new, and full.
    assert r1["kvmesh"]["tokens_saved"] == BLOCK
    question = [rng.randrange(10, 1000) for _ in range(30)]
    # Control: after another answer, only the 3 blocks the prefill worker saved are found.
    other = complete(cluster, first + [w + 1 for w in answer[:8]] + question)
    assert other["kvmesh"]["prefix_tokens_from_store"]["prefill"] == 3 * BLOCK
    follow_up = first + answer + question
    expected = reference_table(tiny_model, [follow_up], MAX_TOKENS, BLOCK, tmp_path)[tuple(follow_up)]
    r2 = complete(cluster, follow_up)
    assert r2["choices"][0]["token_ids"] == expected
    # The prefill worker loaded 4 blocks, the last of which only the decode worker saved.
    assert r2["kvmesh"]["prefix_tokens_from_store"]["prefill"] == 4 * BLOCK
    assert r2["kvmesh"]["kv_load_failed_tokens"] == 0
