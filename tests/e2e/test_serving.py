"""The front door: the official ``openai`` client and the kvmesh SDK against a real cluster
(one prefill worker, two decode workers with local prefix caches, KV-aware routing)."""

from __future__ import annotations

import asyncio
import os
import random
import re
import threading
import time

import grpc
import httpx
import openai
import pytest

import kvmesh_client
from kvmesh.cluster.local import LocalCluster
from kvmesh.kv_store.auth import call_metadata
from kvmesh_proto import worker_pb2, worker_pb2_grpc
from tests.colocated import reference_table
from tests.waiting import wait_until

BLOCK = 32
MAX_TOKENS = 10
TEXTS = ["The quick brown fox jumps over the lazy dog",
         "Prefill workers compute the cache; decode workers load it and generate tokens. " * 3,
         "alpha beta gamma delta " * 20]
CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What does the store hold? " * 6}]
_rng = random.Random(5)
PREFIX = [_rng.randrange(10, 1000) for _ in range(320)]
AFFINITY = [PREFIX + [_rng.randrange(10, 1000) for _ in range(8)] for _ in range(4)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Every prompt the tests compare, as token ids."""
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    return {"texts": [tokenizer.encode(t) for t in TEXTS], "chat": chat_ids}


@pytest.fixture(scope="module")
def reference(tiny_model, prompts, tmp_path_factory):
    return reference_table(tiny_model, prompts["texts"] + [prompts["chat"]] + AFFINITY, MAX_TOKENS,
                           BLOCK, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      decode_workers=2, decode_local_cache=True,
                      run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def decode_running(cluster) -> int:
    total = 0
    for address in cluster.decode_addresses:
        with grpc.insecure_channel(address) as ch:
            total += worker_pb2_grpc.WorkerStub(ch).Health(
                worker_pb2.HealthRequest(), timeout=5, metadata=call_metadata(cluster.secret)).running
    return total


def test_openai_client_completions_and_chat(cluster, prompts, reference, tokenizer):
    client = openai.OpenAI(base_url=cluster.router_url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for text, prompt in zip(TEXTS, prompts["texts"]):
        expected = reference[tuple(prompt)]
        r = client.completions.create(model="tiny", prompt=text, max_tokens=MAX_TOKENS, temperature=0)
        assert expected.matches_text(tokenizer, r.choices[0].text)
        assert r.usage.completion_tokens == MAX_TOKENS
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=text, max_tokens=MAX_TOKENS, temperature=0, stream=True))
        assert expected.matches_text(tokenizer, streamed)
    expected = reference[tuple(prompts["chat"])]
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert expected.matches_text(tokenizer, r.choices[0].message.content)
    assert r.choices[0].message.role == "assistant"
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True)]
    assert expected.matches_text(tokenizer, "".join(parts))


def test_sdk_sync_and_async(cluster, prompts, reference):
    prompt = prompts["texts"][1]
    with kvmesh_client.Client(cluster.grpc_address) as client:
        done = client.generate(TEXTS[1], max_tokens=MAX_TOKENS, temperature=0)
        assert list(done.token_ids) == reference[tuple(prompt)]
        assert done.finish_reason == "length" and done.usage.prompt_tokens == len(prompt)
        chunks = list(client.stream(prompt, max_tokens=MAX_TOKENS, temperature=0))
        assert [t for c in chunks for t in c.token_ids] == reference[tuple(prompt)]
        assert client.models()[0].id == "tiny" and client.health()["status"] == "ok"

    async def run():
        async with kvmesh_client.AsyncClient(cluster.grpc_address) as client:
            done = await client.generate(TEXTS[2], max_tokens=MAX_TOKENS, temperature=0)
            streamed = [t async for c in client.stream(TEXTS[2], max_tokens=MAX_TOKENS, temperature=0)
                        for t in c.token_ids]
            return list(done.token_ids), streamed

    done, streamed = asyncio.run(run())
    assert done == streamed == reference[tuple(prompts["texts"][2])]


def test_shared_prefix_goes_to_the_worker_that_holds_it(cluster, reference):
    url = cluster.router_url
    per_worker = lambda: {a: metric(url, "kvmesh_router_decode_requests_total", f'{{worker="{a}"}}')
                          for a in cluster.decode_addresses}
    affinity = lambda: metric(url, "kvmesh_router_routing_decisions_total", '{reason="prefix_affinity"}')
    before, aff_before = per_worker(), affinity()
    for prompt in AFFINITY:
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                       "temperature": 0, "return_token_ids": True}, timeout=120).json()
        assert r["choices"][0]["token_ids"] == reference[tuple(prompt)]
    after = per_worker()
    moved = {a: after[a] - before[a] for a in after}
    assert sorted(moved.values()) == [0, len(AFFINITY)], moved  # all on one worker
    assert affinity() - aff_before == len(AFFINITY) - 1  # all but the first, by affinity
    # Conditional disaggregation: with the prefix cached, the 8-token suffix skipped prefill.
    assert metric(url, "kvmesh_router_prefill_skipped_total") >= len(AFFINITY) - 1


def test_components_share_our_session_in_groups_of_their_own(cluster):
    """Each component can be stopped as a process group, yet all stay in one session:
    the kernel shares the CPU between sessions, and an engine in a session of its own
    starved the other components (a stream stalled for seconds, a Health call timed out)."""
    for proc in cluster.processes:
        assert os.getpgid(proc.popen.pid) == proc.popen.pid, proc.name
        assert os.getsid(proc.popen.pid) == os.getsid(0), proc.name


def test_disconnect_mid_stream_frees_the_request(cluster):
    url = cluster.router_url
    cancelled = metric(url, "kvmesh_router_requests_total", '{outcome="cancelled"}')
    body = {"prompt": "alpha " * 40, "max_tokens": 3000, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert decode_running(cluster) == 1
    assert wait_until(lambda: decode_running(cluster) == 0), "decode slot still held"
    assert wait_until(lambda: metric(url, "kvmesh_router_requests_total",
                                     '{outcome="cancelled"}') == cancelled + 1)

    with kvmesh_client.Client(cluster.grpc_address) as client:  # the SDK: break out of a stream
        stream = client.stream("beta " * 40, max_tokens=3000, ignore_eos=True)
        next(stream)
        stream.close()
        assert wait_until(lambda: decode_running(cluster) == 0)

        errors = []  # and Cancel by request id, from another thread

        def consume():
            try:
                for _ in client.stream("gamma " * 40, max_tokens=3000, ignore_eos=True, request_id="c1"):
                    pass
            except kvmesh_client.KvmeshError as e:
                errors.append(e)

        t = threading.Thread(target=consume)
        t.start()
        assert wait_until(lambda: client.cancel("c1"), 60)  # True once the router runs it
        t.join(30)
        assert not t.is_alive() and isinstance(errors[0], kvmesh_client.Cancelled)
        assert wait_until(lambda: decode_running(cluster) == 0)
        assert not client.cancel("c1")


def test_hundred_concurrent_streams_complete(cluster):
    async def one(client, i):
        body = {"prompt": f"request {i} " + "delta epsilon " * (20 + i % 7), "max_tokens": 8,
                "ignore_eos": True, "temperature": 0, "stream": True, "return_token_ids": True}
        tokens, finish = 0, None
        async with client.stream("POST", cluster.router_url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    import json
                    choice = json.loads(line[6:])["choices"][0]
                    tokens += len(choice["token_ids"])
                    finish = choice["finish_reason"] or finish
        return tokens, finish

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    results = asyncio.run(run())
    assert results == [(8, "length")] * 100
    assert wait_until(lambda: decode_running(cluster) == 0)


def test_admission_limit_answers_overloaded(cluster):
    url, grpc_address = cluster.add_router("router-small", "--max-inflight", "1", "--max-queue", "1",
                                           "--queue-timeout", "60")
    body = {"prompt": "epsilon " * 30, "max_tokens": 400, "ignore_eos": True, "temperature": 0}

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(url + "/v1/completions", json=body)
                                          for _ in range(6)))

    started = time.monotonic()
    codes = sorted(r.status_code for r in asyncio.run(run()))
    # One runs, one waits, the rest are refused at once (a refused one may arrive after the
    # first finished and be served: the router never admits more than its limits).
    assert codes.count(429) >= 3 and codes.count(200) >= 2 and set(codes) <= {200, 429}, codes
    with kvmesh_client.Client(grpc_address, retries=0) as client:
        outcomes = []

        def one():
            try:
                client.generate("zeta " * 30, max_tokens=400, ignore_eos=True)
                outcomes.append("done")
            except kvmesh_client.Overloaded:
                outcomes.append("overloaded")

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert sorted(set(outcomes)) == ["done", "overloaded"], outcomes
        assert outcomes.count("overloaded") >= 3, outcomes
    assert time.monotonic() - started < 240
    assert metric(url, "kvmesh_router_requests_total", '{outcome="overloaded"}') >= 5


def test_invalid_inputs_and_auth(cluster, tiny_model):
    url, grpc_address = cluster.add_router("router-auth", "--api-token", "s3cret")
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
    assert r.status_code == 401
    headers = {"authorization": "Bearer s3cret"}
    cases = [({"prompt": "hi", "temperature": 3}, 400), ({"prompt": "hi", "top_p": 0}, 400),
             ({"prompt": "hi", "model": "other"}, 404), ({"prompt": ""}, 400),
             ({"prompt": [7] * 5000}, 400), ({"prompt": "hi", "n": 2}, 400),
             ({"messages": []}, 400)]
    for body, status in cases:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = httpx.post(url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", content=b"{nope", headers=headers, timeout=30)
    assert r.status_code == 400
    big = httpx.post(url + "/v1/completions", content=b"x" * (5 << 20), headers=headers, timeout=30)
    assert big.status_code == 413

    with kvmesh_client.Client(grpc_address) as client:
        with pytest.raises(kvmesh_client.Unauthenticated):
            client.generate("hi")
    with kvmesh_client.Client(grpc_address, token="s3cret") as client:
        for kwargs, error in (({"prompt": ""}, kvmesh_client.InvalidArgument),
                              ({"prompt": "hi", "temperature": -1.0}, kvmesh_client.InvalidArgument),
                              ({"prompt": "hi", "top_k": -5}, kvmesh_client.InvalidArgument),
                              ({"prompt": "hi", "model": "nope"}, kvmesh_client.NotFound),
                              ({"prompt": [3] * 5000}, kvmesh_client.InvalidArgument)):
            with pytest.raises(error):
                client.generate(**kwargs)
        assert client.generate("hi", max_tokens=3, temperature=0).finish_reason == "length"
    assert decode_running(cluster) == 0  # nothing left behind


def test_tenant_salt_separates_prefix_caches(cluster):
    rng = random.Random(99)
    prompt = [rng.randrange(10, 1000) for _ in range(200)]

    def run(salt):
        body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "cache_salt": salt}
        return httpx.post(cluster.router_url + "/v1/completions", json=body, timeout=60).json()["kvmesh"]

    run("tenant-a")
    same = run("tenant-a")
    other = run("tenant-b")
    assert same["prefill_skipped"] or same["prefix_tokens_from_store"]["prefill"] > 0
    assert not other["prefill_skipped"]
    assert other["prefix_tokens_from_store"]["prefill"] == 0
    assert other["prefix_tokens_from_store"]["decode"] == (len(prompt) - 1) // BLOCK * BLOCK


def test_a_dead_decode_worker_loses_no_request(cluster, reference):
    """Runs last: kills one decode worker. Requests routed to it move to the other."""
    url = cluster.router_url
    cluster.kill("decode1")
    for prompt in AFFINITY:  # their prefix may be credited to the dead worker
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                       "temperature": 0, "return_token_ids": True}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == reference[tuple(prompt)]
    # /health answers from the poller's last findings (every 2 s): the requests above may
    # all have gone to the live worker before the next poll. Degraded, still serving: ready.
    def health():
        return httpx.get(url + "/health", timeout=10)

    assert wait_until(lambda: health().json()["status"] != "ok", timeout_s=15, every_s=0.2)
    answer = health()
    assert answer.status_code == 200 and answer.json()["status"] == "degraded", answer.text
