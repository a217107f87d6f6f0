"""End to end, a session outlives one-off traffic: real vLLM engines on the CPU, a real
store process with a small host tier over a small disk tier, the router over HTTP.

Two prompts of the same length are served once, one naming a session, one not; the
session goes idle past its TTL while one-off prompts, more than both tiers hold, come
and go. The session's blocks move down to disk instead of being evicted, and its prompt
resumes from there (the store's disk hits grow) with the colocated run's greedy tokens;
the prompt without a session has been evicted and is recomputed. Prefill is skipped
(a router limit above every prompt), so the decode worker itself loads or computes
the prompt, and its time to first token for each is printed beside the other (no speed
is asserted here: ``bench/`` measures).
"""

from __future__ import annotations

import random
import time

import httpx
import pytest

from kvmesh.cluster.local import LocalCluster
from tests.colocated import reference_table
from tests.e2e.test_disaggregation import BLOCK, complete, metric

TTL_S = 1.0
MAX_TOKENS = 4
_rng = random.Random(23)
SESSION, PLAIN, *ONE_OFF = [[_rng.randrange(10, 1000) for _ in range(8 * BLOCK)] for _ in range(7)]
LOADABLE = (len(SESSION) - 1) // BLOCK * BLOCK  # the engine computes at least the last token


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return reference_table(tiny_model, [SESSION, PLAIN], MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("colocated"))


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    # Blocks of 8 KiB (one layer of one block), a prompt 32 of them: host RAM holds 48
    # (one and a half prompts), disk 128 (four); the traffic below is seven prompts.
    store_args = ("--page-bytes", "64KiB", "--disk-bytes", "1MiB", "--session-ttl", str(TTL_S))
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      store_capacity_bytes=384 * 1024, store_args=store_args,
                      router_args=("--max-local-prefill-tokens", "100000"),  # decode computes
                      decode_local_cache=False,  # every cached prefix comes through the store
                      run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


def session_blocks(cluster) -> dict:
    r = httpx.post(cluster.router_url + "/v1/sessions/lookup", json={"session": "chat"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_an_idle_session_resumes_from_disk_while_a_one_off_prompt_is_recomputed(cluster, reference):
    chat = {"kvmesh": {"session": "chat"}, "max_tokens": MAX_TOKENS}
    assert complete(cluster, SESSION, **chat)["choices"][0]["token_ids"] == reference[tuple(SESSION)]
    assert complete(cluster, PLAIN, max_tokens=MAX_TOKENS)["choices"][0]["token_ids"] == reference[tuple(PLAIN)]
    time.sleep(TTL_S * 1.5)  # the session goes idle
    for prompt in ONE_OFF:  # more than host RAM and disk hold together
        complete(cluster, prompt, max_tokens=MAX_TOKENS)
    held = session_blocks(cluster)
    assert held["state"] == "idle" and held["blocks"].get("disk", 0) > 0, held

    disk_hits = lambda: metric(cluster, "kvmesh_store_hits_total", '{tier="disk"}', cluster.store_metrics_url)
    before = disk_hits()
    resumed = complete(cluster, SESSION, **chat)
    assert disk_hits() > before  # served from disk
    assert resumed["kvmesh"]["prefill_skipped"]
    assert resumed["kvmesh"]["prefix_tokens_from_store"]["decode"] == LOADABLE
    assert resumed["kvmesh"]["kv_load_failed_tokens"] == 0
    assert resumed["choices"][0]["token_ids"] == reference[tuple(SESSION)]
    assert session_blocks(cluster)["state"] == "active"

    recomputed = complete(cluster, PLAIN, max_tokens=MAX_TOKENS)  # no session: evicted meanwhile
    assert recomputed["kvmesh"]["prefix_tokens_from_store"]["decode"] == 0
    assert recomputed["choices"][0]["token_ids"] == reference[tuple(PLAIN)]
    first_step = lambda r: r["kvmesh"]["breakdown"]["decode_first_step"]
    print(f"time to first token: resumed session {resumed['kvmesh']['ttft_s']:.4f} s (decode's first "
          f"step {first_step(resumed):.4f} s), recomputed {recomputed['kvmesh']['ttft_s']:.4f} s "
          f"({first_step(recomputed):.4f} s)")
