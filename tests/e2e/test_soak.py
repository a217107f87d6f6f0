"""Soak: ``SOAK_REQUESTS`` mixed requests against a local cluster on the tiny model, then
nothing held is left behind and no component has grown.

The mix, drawn from a fixed seed: short and long prompts, streaming and not, and a share
(``CANCEL_SHARE``) of streams cancelled mid-stream by closing the client connection after
the first tokens; ``CONCURRENCY`` requests at a time. ``SOAK_REQUESTS`` (3,000) runs in about
half a minute on a 2-core machine, the whole module (cluster start and references
included) in under two; every completed request must have the colocated engine's greedy
tokens.

Baselines are taken after a warm-up that sends every prompt of the pool (so the store
already holds every block the soak can write: each prompt is a whole number of blocks
plus at most ``TAIL`` tokens, and ``TAIL + MAX_TOKENS`` stays under a block, so no block
holds a generated token; a stream to cancel asks for ``CANCEL_MAX_TOKENS``, still short of
a block, so that it is cut while its tokens still come), then the same mix on a smaller
scale. Afterwards, once the last
request has ended, these must equal their baselines: every store tier's used bytes and
blocks, the store's leases, each engine's free KV blocks (all of them) and running
requests, the router's in-flight and queued gauges, and the ``/dev/shm`` segments the
cluster's processes hold; and each component's resident memory (its process and its
engine's) must be within ``RSS_TOLERANCE`` of its value after the warm-up.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time

import grpc
import httpx
import pytest

from kvmesh.cluster.local import LocalCluster
from tests import cluster_state
from tests.colocated import reference_table
from tests.waiting import wait_until

SOAK_REQUESTS = 3000
WARMUP_REQUESTS = 300
CONCURRENCY = 16
CANCEL_SHARE = 0.15
STREAM_SHARE = 0.5
LONG_SHARE = 0.25
RSS_TOLERANCE = 0.10
BLOCK = 32
TAIL = 8        # a prompt is k blocks plus 1..TAIL tokens
MAX_TOKENS = 12  # TAIL + MAX_TOKENS < BLOCK: generated tokens never fill a block
CANCEL_MAX_TOKENS = BLOCK - TAIL - 1  # a stream to cancel asks for more (still no full block)
REQUEST_TIMEOUT_S = 60.0

_rng = random.Random(4242)
SHORT = [[_rng.randrange(10, 1000) for _ in range(BLOCK * _rng.randrange(1, 3) + _rng.randrange(1, TAIL + 1))]
         for _ in range(16)]
LONG = [[_rng.randrange(10, 1000) for _ in range(BLOCK * _rng.randrange(10, 17) + _rng.randrange(1, TAIL + 1))]
        for _ in range(6)]
POOL = SHORT + LONG


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return reference_table(tiny_model, POOL, MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory, production_executor):
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


def mix(count: int, seed: int) -> list[tuple[list[int], str]]:
    """``count`` requests: (prompt, kind), kind "plain", "stream" or "cancel"."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        prompt = rng.choice(LONG if rng.random() < LONG_SHARE else SHORT)
        r = rng.random()
        kind = "cancel" if r < CANCEL_SHARE else "stream" if r < CANCEL_SHARE + STREAM_SHARE else "plain"
        out.append((prompt, kind))
    return out


async def one(client: httpx.AsyncClient, url: str, prompt: list[int], kind: str, reference) -> str | None:
    """Send one request; what went wrong, or None. A "cancel" stream is closed (its
    connection with it) as soon as its first tokens came."""
    body = {"prompt": prompt, "max_tokens": CANCEL_MAX_TOKENS if kind == "cancel" else MAX_TOKENS,
            "temperature": 0, "return_token_ids": True}
    if kind == "plain":
        r = await client.post(url + "/v1/completions", json=body)
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text}"
        return None if r.json()["choices"][0]["token_ids"] == reference[tuple(prompt)] else "tokens differ"
    tokens = []
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return f"status {r.status_code}: {(await r.aread())!r}"
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if '"error"' in line:
                return f"error event: {line}"
            tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
            if kind == "cancel" and tokens:
                return None  # leaving the block closes the stream and its connection
    return None if tokens == reference[tuple(prompt)] else "streamed tokens differ"


async def run_mix(url: str, requests: list[tuple[list[int], str]], reference) -> list[str]:
    """Send ``requests``, ``CONCURRENCY`` at a time; the problems found."""
    problems: list[str] = []
    queue = list(reversed(requests))
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        async def worker():
            while queue:
                prompt, kind = queue.pop()
                try:
                    why = await asyncio.wait_for(one(client, url, prompt, kind, reference), REQUEST_TIMEOUT_S + 5)
                except Exception as e:  # a hang or a broken connection: a problem, not a crash
                    why = f"{type(e).__name__}: {e}"
                if why is not None:
                    problems.append(f"{kind} request of {len(prompt)} tokens: {why}")
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return problems


def outcomes(cluster) -> dict[str, float]:
    text = httpx.get(cluster.router_url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^kvmesh_router_requests_total\{outcome="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def test_soak_leaves_nothing_behind_and_nothing_grows(cluster, reference):
    warm = [(p, kind) for p in POOL for kind in ("plain", "stream")] + mix(WARMUP_REQUESTS, seed=1)
    assert not asyncio.run(run_mix(cluster.router_url, warm, reference))
    assert wait_until(lambda: cluster_state.idle_engines(cluster), 30), cluster_state.engine_figures(cluster)
    baseline = cluster_state.figures(cluster)
    rss = cluster_state.rss_bytes(cluster)
    before = outcomes(cluster)

    requests = mix(SOAK_REQUESTS, seed=2)
    lowest: dict[str, int] = {}  # each decode engine's fewest free KV blocks seen meanwhile
    done = threading.Event()

    def watch_engines() -> None:
        while not done.wait(0.2):
            try:
                seen = cluster_state.engine_figures(cluster)
            except grpc.RpcError:  # a health call late under load: look again
                continue
            for k, v in seen.items():
                if k.startswith("decode") and k.endswith("kv_blocks_free"):
                    lowest[k] = min(v, lowest.get(k, v))

    watcher = threading.Thread(target=watch_engines, daemon=True)
    watcher.start()
    start = time.monotonic()
    try:
        problems = asyncio.run(run_mix(cluster.router_url, requests, reference))
    finally:
        done.set()
        watcher.join(10)
    elapsed = time.monotonic() - start
    print(f"{len(requests)} requests in {elapsed:.1f}s ({len(requests) / elapsed:.1f}/s); "
          f"outcomes {outcomes(cluster)}")
    assert not problems, f"{len(problems)} problems, e.g.:\n" + "\n".join(problems[:10])

    after = {}  # a cancelled request is counted once the router has seen its client go
    assert wait_until(lambda: after.update(outcomes(cluster)) or
                      sum(after.values()) - sum(before.values()) == len(requests), 30), (before, after)
    cancelled = after.get("cancelled", 0) - before.get("cancelled", 0)
    assert cancelled > 0, "no stream was cancelled mid-way: the cancellation path went untested"

    # the free-block figure is live: under load the decode engines had blocks in use (a
    # prefill holds its blocks too briefly to be seen by a poll)
    assert lowest and all(lowest[k] < baseline[k] for k in lowest), (lowest, baseline)
    found = {}
    assert wait_until(lambda: found.update(cluster_state.figures(cluster)) or found == baseline, 30), \
        {k: (baseline.get(k), v) for k, v in found.items() if baseline.get(k) != v}
    grown = {name: (rss[name], now) for name, now in cluster_state.rss_bytes(cluster).items()
             if abs(now - rss[name]) > RSS_TOLERANCE * rss[name]}
    assert not grown, f"resident memory off by more than {RSS_TOLERANCE:.0%} (after warm-up, now): {grown}"
