"""Chaos under load: a supervised local cluster (``LocalCluster(restart=...)``, what
``kvmesh serve`` runs) on the tiny model, with ``IN_FLIGHT`` streaming requests in flight
while a component fails. Each component in turn is

* stopped (SIGSTOP to its process group, as a hung machine would be) for longer than the
  request deadline, then let go on (SIGCONT) — the store instead is killed while stopped;
* killed (SIGKILL to its process group, as a crash would), and restarted by supervision.

For each: every in-flight request either completes with the colocated engine's greedy
tokens or fails with an OpenAI-shaped error saying why (503 or 504) within its deadline
— none hangs; while no decode worker is up a request gets its 503 within a second; once
the component is back new requests are served the colocated tokens; and afterwards no
request runs anywhere, every engine has all its KV blocks free, the store holds no lease
and the router's gauges are at zero.

A fault on the decode worker comes once the first stream has its first token (the
worker is streaming); one on the prefill worker or the store once the router holds half
the requests (prefills, saves and lookups are under way).

Every request goes through a prefill worker (conditional disaggregation off), so a
prefill worker's failure is on every request's path. The deadlines are short (the
router's ``REQUEST_TIMEOUT_S``, a prefill call's ``PREFILL_TIMEOUT_S``, a store call's
``STORE_TIMEOUT_S``) to keep the module's time bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
from dataclasses import dataclass, field

import httpx
import pytest

from kvmesh.cluster.local import LocalCluster
from kvmesh.cluster.supervisor import RestartPolicy
from tests import cluster_state
from tests.colocated import reference_table
from tests.waiting import wait_until

BLOCK = 32
MAX_TOKENS = 24
IN_FLIGHT = 20
REQUEST_TIMEOUT_S = 12.0
PREFILL_TIMEOUT_S = 3.0
STORE_TIMEOUT_S = 2.0
SLACK_S = 3.0           # a request's answer may come this much after its deadline
NO_DECODE_503_S = 1.0   # how fast a request is refused while no decode worker is up
RESTART_S = 300.0       # how long a replacement may take to be up (an engine loads)
_rng = random.Random(2020)
PROMPTS = [[_rng.randrange(10, 1000) for _ in range(_rng.randrange(40, 200))]
           for _ in range(IN_FLIGHT + 4)]
LOAD, AFTER = PROMPTS[:IN_FLIGHT], PROMPTS[IN_FLIGHT:]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return reference_table(tiny_model, PROMPTS, MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      restart=RestartPolicy(backoff_s=1.0),
                      worker_args=("--store-timeout", str(STORE_TIMEOUT_S)),
                      router_args=("--request-timeout", str(REQUEST_TIMEOUT_S),
                                   "--prefill-timeout", str(PREFILL_TIMEOUT_S),
                                   "--max-local-prefill-tokens", "0",
                                   "--max-decode-prefill-tokens", "0"),
                      run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


@dataclass
class Outcome:
    prompt: list[int]
    status: int = 0
    tokens: list[int] = field(default_factory=list)
    error: dict | None = None
    seconds: float = 0.0
    first_token_at: float | None = None  # monotonic time of its first token
    hung: bool = False
    info: dict = field(default_factory=dict)  # the last chunk's "kvmesh" report

    def check(self, reference) -> str | None:
        """What is wrong with it, or None: it hung, or it neither matched the colocated
        tokens nor failed with a clear error (503/504, OpenAI-shaped, a reason) in time."""
        if self.hung:
            return f"no answer within {REQUEST_TIMEOUT_S + SLACK_S:.0f}s (a hang)"
        if self.seconds > REQUEST_TIMEOUT_S + SLACK_S:
            return f"answered after {self.seconds:.1f}s, past its deadline"
        if self.error is None:
            if self.status == 200 and self.tokens == reference[tuple(self.prompt)]:
                return None
            return f"status {self.status}, tokens {self.tokens} are not the colocated ones"
        code, message = self.error.get("code"), self.error.get("message")
        if code in (503, 504) and message and self.error.get("type") == "server_error":
            return None
        return f"not a clear error: status {self.status}, {self.error}"


async def stream(client: httpx.AsyncClient, url: str, prompt: list[int],
                 first_token: asyncio.Event | None = None) -> Outcome:
    """One streaming completion, its tokens and its error (an error event in the stream,
    or a refusal before it)."""
    out = Outcome(prompt)
    start = time.monotonic()

    async def run() -> None:
        async with client.stream("POST", url + "/v1/completions", json={
                "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
                "return_token_ids": True}) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = json.loads(await r.aread())["error"]
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[len("data: "):])
                if "error" in data:
                    out.error = data["error"]
                    continue
                out.info = data.get("kvmesh", out.info)
                ids = data["choices"][0].get("token_ids") or []
                if ids and out.first_token_at is None:
                    out.first_token_at = time.monotonic()
                    if first_token is not None:
                        first_token.set()
                out.tokens += ids

    try:
        await asyncio.wait_for(run(), REQUEST_TIMEOUT_S + SLACK_S)
    except asyncio.TimeoutError:
        out.hung = True
    out.seconds = time.monotonic() - start
    return out


def health(cluster) -> dict:
    return httpx.get(cluster.router_url + "/health", timeout=10).json()


def group_signal(cluster, name: str, sig: int) -> None:
    """``sig`` to the process group of component ``name`` (it and its engine)."""
    proc = next(p for p in cluster.processes if p.name == name)
    os.killpg(proc.popen.pid, sig)


async def admitted(client: httpx.AsyncClient, cluster, count: int) -> None:
    """Return once the router holds at least ``count`` requests (its in-flight gauge)."""
    while True:
        text = (await client.get(cluster.router_url + "/metrics")).text
        m = re.search(r"^kvmesh_router_inflight (\S+)$", text, re.MULTILINE)
        if m and float(m.group(1)) >= count:
            return
        await asyncio.sleep(0.005)


async def under_load(cluster, fault, at: str = "first token") -> tuple[list[Outcome], int, object]:
    """``IN_FLIGHT`` streams, and ``await fault()`` beside them once the first of them
    has its first token (``at="first token"``: the decode worker is streaming), or once
    the router holds half of them (``at="admitted"``: prefills and store calls are under
    way). Returns the outcomes, how many streams had ended when the fault began, and what
    ``fault`` returned."""
    first = asyncio.Event()
    limits = httpx.Limits(max_connections=IN_FLIGHT + 8)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S + 30, limits=limits) as client:
        tasks = [asyncio.ensure_future(stream(client, cluster.router_url, p, first)) for p in LOAD]
        wait = first.wait() if at == "first token" else admitted(client, cluster, IN_FLIGHT // 2)
        await asyncio.wait_for(wait, REQUEST_TIMEOUT_S)
        ended = sum(t.done() for t in tasks)
        found = await fault()
        return list(await asyncio.gather(*tasks)), ended, found


def assert_in_flight_ok(outcomes: list[Outcome], ended: int, reference) -> None:
    assert ended < IN_FLIGHT, "every request had ended before the fault: nothing was in flight"
    problems = [f"prompt {LOAD.index(o.prompt)}: {why}" for o in outcomes
                if (why := o.check(reference)) is not None]
    assert not problems, "\n".join(problems)
    codes = [o.error["code"] for o in outcomes if o.error is not None]
    print(f"{ended} ended before the fault; {len(outcomes) - len(codes)} completed, "
          f"failed: {sorted(codes)}; prefills cut short: "
          f"{sum(1 for o in outcomes if o.info and not o.info['prefill_ok'])}; "
          f"slowest {max(o.seconds for o in outcomes):.1f}s")


async def refused_fast(cluster) -> list[tuple[int, float, dict]]:
    """A streaming and a non-streaming request with no decode worker up: each one's
    status, seconds and error body."""
    out = []
    async with httpx.AsyncClient(timeout=30) as client:
        for streaming in (True, False):
            start = time.monotonic()
            r = await client.post(cluster.router_url + "/v1/completions", json={
                "prompt": AFTER[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": streaming})
            out.append((r.status_code, time.monotonic() - start, r.json()))
    return out


def assert_refused_fast(refusals) -> None:
    for status, seconds, body in refusals:
        assert status == 503, (status, body)
        assert "no decode worker is up" in body["error"]["message"], body
        assert seconds < NO_DECODE_503_S, f"the 503 took {seconds:.2f}s"


async def wait_for(condition, timeout_s: float, every_s: float = 0.2) -> bool:
    """``wait_until`` for a coroutine: whether ``condition()`` (blocking, run in a
    thread) came true within ``timeout_s``."""
    return await asyncio.to_thread(wait_until, condition, timeout_s, every_s)


def assert_serves_again_and_holds_nothing(cluster, reference) -> None:
    """The cluster is back (health "ok"), serves new requests the colocated tokens, and
    then runs nothing and holds nothing: engines idle with every KV block free, no store
    lease, the router's gauges at zero."""
    assert wait_until(lambda: cluster_state.stores_answer(cluster) and health(cluster)["status"] == "ok",
                      RESTART_S, every_s=1.0), health(cluster)
    for prompt in AFTER:
        r = httpx.post(cluster.router_url + "/v1/completions", timeout=REQUEST_TIMEOUT_S + SLACK_S, json={
            "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == reference[tuple(prompt)]
    assert wait_until(lambda: cluster_state.idle_engines(cluster), 30), cluster_state.engine_figures(cluster)
    assert wait_until(lambda: all(v == 0 for k, v in cluster_state.store_figures(cluster).items()
                                  if k.endswith("leases")), 30), cluster_state.store_figures(cluster)
    assert wait_until(lambda: not any(cluster_state.router_gauges(cluster).values()), 30), \
        cluster_state.router_gauges(cluster)
    assert not cluster.failed


def test_the_cluster_serves_the_colocated_tokens_under_load(cluster, reference):
    async def nothing():
        return None

    outcomes, _, _ = asyncio.run(under_load(cluster, nothing))
    assert all(o.error is None and o.check(reference) is None for o in outcomes), \
        [o.check(reference) or o.error for o in outcomes]
    assert_serves_again_and_holds_nothing(cluster, reference)


def test_decode_stopped_past_the_deadline(cluster, reference):
    """Streams on the stopped worker end with a 504 at their deadline; once the health
    poll has found it down, new requests get their 503 at once; let go on, it serves."""
    async def fault():
        group_signal(cluster, "decode", signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            # three health polls in a row time out (each poll waits 2 s, then 2 s more)
            assert await wait_for(lambda: health(cluster)["status"] == "unavailable",
                                  2 * REQUEST_TIMEOUT_S), health(cluster)
            refusals = await refused_fast(cluster)
            await asyncio.sleep(max(0.0, stopped + REQUEST_TIMEOUT_S + SLACK_S - time.monotonic()))
        finally:
            group_signal(cluster, "decode", signal.SIGCONT)
        return refusals

    outcomes, ended, refusals = asyncio.run(under_load(cluster, fault))
    assert_in_flight_ok(outcomes, ended, reference)
    assert any(o.error is not None and o.error["code"] == 504 for o in outcomes)
    assert_refused_fast(refusals)
    assert_serves_again_and_holds_nothing(cluster, reference)


def test_prefill_stopped_past_the_deadline(cluster, reference):
    """A hung prefill worker costs a request its prefill deadline, no more: decode
    computes the prompt, with the colocated tokens."""
    async def fault():
        group_signal(cluster, "prefill", signal.SIGSTOP)
        try:
            await asyncio.sleep(REQUEST_TIMEOUT_S + SLACK_S)
        finally:
            group_signal(cluster, "prefill", signal.SIGCONT)

    outcomes, ended, _ = asyncio.run(under_load(cluster, fault, at="admitted"))
    assert_in_flight_ok(outcomes, ended, reference)
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes if o.error]
    assert any(not o.info["prefill_ok"] for o in outcomes), "no prefill was cut short"
    assert_serves_again_and_holds_nothing(cluster, reference)


def test_store_stopped_past_the_deadline_then_killed(cluster, reference):
    """A hung store costs each store call its deadline: workers compute what they could
    not load; the store, killed while stopped, is restarted."""
    restarted = cluster.supervisor.restarted.get("store", 0)

    async def fault():
        group_signal(cluster, "store", signal.SIGSTOP)
        await asyncio.sleep(REQUEST_TIMEOUT_S + SLACK_S)
        await asyncio.to_thread(cluster.kill, "store")

    outcomes, ended, _ = asyncio.run(under_load(cluster, fault, at="admitted"))
    assert_in_flight_ok(outcomes, ended, reference)
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes if o.error]
    assert wait_until(lambda: cluster.supervisor.restarted.get("store", 0) == restarted + 1, 60)
    assert_serves_again_and_holds_nothing(cluster, reference)


def test_decode_killed(cluster, reference):
    """Streams cut mid-way fail with a 503; those without a token yet wait for the
    replacement while their deadline allows; meanwhile new requests get a 503 at once."""
    async def fault():
        await asyncio.to_thread(cluster.kill, "decode")
        assert await wait_for(lambda: health(cluster)["status"] == "unavailable", 10), health(cluster)
        return await refused_fast(cluster)

    outcomes, ended, refusals = asyncio.run(under_load(cluster, fault))
    assert_in_flight_ok(outcomes, ended, reference)
    assert_refused_fast(refusals)
    assert_serves_again_and_holds_nothing(cluster, reference)


def test_prefill_killed(cluster, reference):
    async def fault():
        await asyncio.to_thread(cluster.kill, "prefill")

    outcomes, ended, _ = asyncio.run(under_load(cluster, fault, at="admitted"))
    assert_in_flight_ok(outcomes, ended, reference)
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes if o.error]
    assert any(not o.info["prefill_ok"] for o in outcomes), "no prefill was cut short"
    assert_serves_again_and_holds_nothing(cluster, reference)


def test_store_killed(cluster, reference):
    restarted = cluster.supervisor.restarted.get("store", 0)

    async def fault():
        await asyncio.to_thread(cluster.kill, "store")

    outcomes, ended, _ = asyncio.run(under_load(cluster, fault, at="admitted"))
    assert_in_flight_ok(outcomes, ended, reference)
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes if o.error]
    assert wait_until(lambda: cluster.supervisor.restarted.get("store", 0) == restarted + 1, 60)
    assert_serves_again_and_holds_nothing(cluster, reference)
