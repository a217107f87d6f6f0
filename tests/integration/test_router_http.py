"""The router's front doors for real — its HTTP API under uvicorn and its gRPC API, started
as ``kvmesh router`` starts them, with the tiny model's tokenizer — in front of stub decode
workers (``tests.router_serving``; ``bench.stub_worker``: the worker gRPC API with no
engine behind it). The stub is the one fake: it stands in for a vLLM worker, and it tells
what the router asked of it (calls running, calls completed).

Covered: a client that leaves a non-streaming request cancels it; auth and the body limit
(on the bytes received, never read past); out-of-range sampling values; a worker that
leaves the service registry finishes its calls before its channel closes; a channel
closed under a call is a worker failure that is retried, never a 500; with no decode
worker up a request is a 503 at once, saying why, and one whose worker went down under it
waits for it only while it may come back within the request's deadline; chat's default
``max_tokens`` (the rest of the context); OpenAI requests as clients send them (nulls,
content parts, roles, a prompt list of one); unimplemented fields refused, naming them;
``stream_options.include_usage``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import grpc
import httpx
import pytest

import kvmesh_client
from kvmesh_proto import serving_pb2, serving_pb2_grpc
from kvmesh.router.core import ApiError, Prepared, Sampling, Trace
from tests.router_serving import raw_request, serving
from tests.waiting import wait_until


def test_a_client_that_leaves_before_a_non_streaming_answer_cancels_it(tiny_model):
    """The request is cancelled everywhere within a second or so: the stub's call, the
    worker's in-flight count, the admission slot; counted as cancelled."""
    with serving(tiny_model, token_delay_s=0.05) as r:
        body = json.dumps({"prompt": "hello there", "max_tokens": 400}).encode()  # 20 s
        sock = raw_request(r.url, "/v1/completions", body)
        assert wait_until(lambda: r.stubs[0].running == 1)
        sock.close()
        worker = r.core.routing.decode[0]
        assert wait_until(lambda: r.stubs[0].running == 0 and worker.inflight == 0
                          and r.core.admission.inflight == 0, 5), "the request still runs"
        assert r.stubs[0].completed == 0
        assert wait_until(lambda: r.metric("kvmesh_router_requests_total", '{outcome="cancelled"}') == 1)
        # and one that stays gets its answer
        ok = httpx.post(r.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_stream_whose_client_stopped_reading_and_left_is_freed_at_once(tiny_model):
    """A streaming client that stops reading (the router's write blocks) and then goes:
    the request is closed down to the worker at once, not when a garbage collection runs
    (the slot, the worker's call and its KV stay held until then)."""
    with serving(tiny_model, token_delay_s=0.05) as r:
        body = json.dumps({"prompt": "hello there", "max_tokens": 400, "stream": True}).encode()

        async def client_that_stops_reading():
            incoming = [{"type": "http.request", "body": body, "more_body": False}]
            gone, blocked = asyncio.Event(), asyncio.Event()

            async def receive():
                if incoming:
                    return incoming.pop()
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                if message["type"] == "http.response.body" and message.get("body"):
                    blocked.set()
                    await asyncio.Event().wait()  # never drained

            scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                     "http_version": "1.1", "method": "POST", "scheme": "http",
                     "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "",
                     "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                     "headers": [(b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())]}
            served = asyncio.ensure_future(r.app(scope, receive, send))
            await asyncio.wait_for(blocked.wait(), 10)
            gone.set()
            await asyncio.wait_for(served, 10)

        r.call(client_that_stops_reading())
        worker = r.core.routing.decode[0]
        assert wait_until(lambda: r.stubs[0].running == 0 and worker.inflight == 0
                          and r.core.admission.inflight == 0, 5), "the request still runs"
        assert r.stubs[0].completed == 0


def test_auth_and_the_body_limit(tiny_model):
    """Auth on /v1/ only (401), compared as the whole ``Bearer <token>``; the body limit on
    Content-Length and on the bytes received (413), a chunked body too, answered as soon
    as the limit is passed — the rest of the body is never waited for."""
    with serving(tiny_model, api_token="s3cret", max_request_bytes=1000) as r:
        good = {"authorization": "Bearer s3cret"}
        small = {"prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"authorization": "Bearer s3cre"}, {"authorization": "s3cret"}):
            answer = httpx.post(r.url + "/v1/completions", json=small, headers=headers, timeout=30)
            assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"
        assert httpx.get(r.url + "/health", timeout=30).status_code == 200
        assert httpx.post(r.url + "/v1/completions", json=small, headers=good, timeout=30).status_code == 200

        big = json.dumps({"prompt": "a" * 5000, "max_tokens": 1}).encode()
        answer = httpx.post(r.url + "/v1/completions", content=big, headers=good, timeout=30)
        assert answer.status_code == 413 and answer.json()["error"]["message"]

        def chunks():
            for i in range(0, len(big), 500):
                yield big[i:i + 500]

        answer = httpx.post(r.url + "/v1/completions", content=chunks(), headers=good, timeout=30)
        assert answer.request.headers.get("transfer-encoding") == "chunked"
        assert answer.status_code == 413, answer.text

        # A chunked body that goes past the limit and then stalls: refused at once.
        host, port = r.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n" % 2000 + big[:2000] + b"\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 413 "), "the router waits for the rest of the body"

        with kvmesh_client.Client(r.grpc_address) as client:
            with pytest.raises(kvmesh_client.Unauthenticated):
                client.generate("hi", max_tokens=2)
        with kvmesh_client.Client(r.grpc_address, token="s3cret") as client:
            assert client.generate("hi", max_tokens=2).finish_reason == "length"


def test_an_empty_api_token_means_no_auth_on_both_apis(tiny_model):
    with serving(tiny_model, api_token="") as r:
        answer = httpx.post(r.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert answer.status_code == 200
        with kvmesh_client.Client(r.grpc_address) as client:
            assert client.generate("hi", max_tokens=2).finish_reason == "length"
            # max_tokens has no presence in proto3: 0 is "not set", the documented default
            assert len(client.generate("hi", max_tokens=0).token_ids) == 16


def test_sampling_values_out_of_range_are_refused_and_a_bug_is_an_error(tiny_model):
    """top_k beyond int32 and seed beyond int64 (the worker protocol's fields) are a 400,
    streaming or not, counted as invalid; the edges are served. A failure in the router
    that is no ``ApiError`` is counted as an error and raised as ``ApiError(500)``."""
    with serving(tiny_model) as r:
        for extra in ({"top_k": 2**31}, {"top_k": -2}, {"seed": 2**63}, {"seed": -2**63 - 1},
                      {"top_k": 2**40, "stream": True}):
            answer = httpx.post(r.url + "/v1/completions", json={"prompt": "hi", **extra}, timeout=30)
            assert answer.status_code == 400, (extra, answer.text)
        assert r.metric("kvmesh_router_requests_total", '{outcome="invalid"}') == 5
        for extra in ({"top_k": 2**31 - 1, "seed": 2**63 - 1}, {"top_k": 0, "seed": -2**63},
                      {"top_k": -1}):
            answer = httpx.post(r.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra},
                                timeout=30)
            assert answer.status_code == 200, (extra, answer.text)
        assert r.metric("kvmesh_router_requests_total", '{outcome="cancelled"}') == 0

        async def unchecked():  # what prepare() would have refused, straight to generate()
            p = Prepared("bug", [5, 6, 7], Sampling(max_tokens=2, top_k=2**40), "")
            return [c async for c in r.core.generate(p, Trace())]

        with pytest.raises(ApiError) as refused:
            r.call(unchecked())
        assert refused.value.status == 500
        assert r.metric("kvmesh_router_requests_total", '{outcome="error"}') == 1
        assert r.metric("kvmesh_router_requests_total", '{outcome="cancelled"}') == 0


def test_a_worker_that_leaves_the_registry_finishes_its_requests(tiny_model, redis_url):
    """Dropped from the pool, the worker gets no new request, but the one it runs ends
    normally; its channel is closed once it is idle. Back in the registry, it serves."""
    from kvmesh.kv_store.index.services import Announcer, ServiceRegistry

    with serving(tiny_model, token_delay_s=0.05, discover=True, index=redis_url,
                 health_interval=0.1) as r:
        registry = ServiceRegistry(redis_url)
        announcer = Announcer(registry, "decode", r.stub_addresses[0])
        announcer.start()
        assert wait_until(lambda: len(r.core.routing.decode) == 1)
        worker = r.core.routing.decode[0]
        answers = []
        body = {"prompt": "hello there", "max_tokens": 40}  # 2 s
        t = threading.Thread(target=lambda: answers.append(
            httpx.post(r.url + "/v1/completions", json=body, timeout=60)))
        t.start()
        assert wait_until(lambda: r.stubs[0].running == 1)
        announcer.stop()  # withdraws it
        assert wait_until(lambda: r.core.routing.decode == [], 5)
        t.join(30)
        assert answers[0].status_code == 200, answers[0].text
        assert answers[0].json()["usage"]["completion_tokens"] == 40 and r.stubs[0].completed == 1
        assert wait_until(lambda: worker.client.closed, 5), "the departed worker's channel stays open"

        announcer = Announcer(registry, "decode", r.stub_addresses[0])
        announcer.start()
        assert wait_until(lambda: len(r.core.routing.decode) == 1)
        answer = httpx.post(r.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert answer.status_code == 200
        announcer.stop()
        registry.close()


def test_a_channel_closed_under_a_call_is_retried_not_a_500(tiny_model):
    """Closing a worker's channel cuts its calls with a bare ``CancelledError`` in gRPC; the
    router reads that as the worker being unavailable: before the first token the
    request moves to the other worker and is served."""
    with serving(tiny_model, stubs=2, token_delay_s=0.5) as r:
        first = r.core.routing.decode[0]
        answers = []
        body = {"prompt": "hello there", "max_tokens": 3}
        t = threading.Thread(target=lambda: answers.append(
            httpx.post(r.url + "/v1/completions", json=body, timeout=60)))
        t.start()
        assert wait_until(lambda: first.inflight == 1)
        r.call(first.client.close())
        t.join(30)
        assert answers[0].status_code == 200, answers[0].text
        assert answers[0].json()["usage"]["completion_tokens"] == 3
        assert r.metric("kvmesh_router_decode_retries_total") == 1
        assert sum(s.completed for s in r.stubs) == 1


def test_with_no_decode_worker_up_a_request_is_a_503_at_once_saying_why(tiny_model):
    """Once the health poll has found the only decode worker down, a request — streaming
    or not, over HTTP or gRPC — is refused within a second (not after the request's or the
    retry's timeout), in the API's own shape, naming the worker and what was found; the
    worker is never called. When it is back, requests are served again."""
    with serving(tiny_model, health_interval=0.2, request_timeout=30, unavailable_retry=30) as r:
        body = {"prompt": "hello there", "max_tokens": 2}
        assert httpx.post(r.url + "/v1/completions", json=body, timeout=30).status_code == 200
        r.stop_stub(0)
        assert wait_until(lambda: httpx.get(r.url + "/health", timeout=10).status_code == 503, 10)
        calls = r.stubs[0].calls
        with httpx.Client(base_url=r.url, timeout=30) as http:
            for stream in (False, True):
                began = time.monotonic()
                answer = http.post("/v1/completions", json={**body, "stream": stream})
                took = time.monotonic() - began
                assert answer.status_code == 503, (stream, answer.text[:300])
                error = answer.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["code"] == 503
                assert "no decode worker is up" in error["message"]
                assert r.stub_addresses[0] in error["message"] and "unavailable" in error["message"]
                assert took < 1.0, (stream, took)
        with grpc.insecure_channel(r.grpc_address) as channel:  # no client retries
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                request = serving_pb2.GenerateRequest(text="hello there", sampling={"max_tokens": 2})
                list(serving_pb2_grpc.KVMeshStub(channel).Generate(request, timeout=30))
            assert time.monotonic() - began < 1.0
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no decode worker is up" in refused.value.details()
        assert r.stubs[0].calls == calls
        assert r.metric("kvmesh_router_requests_total", '{outcome="unavailable"}') == 3

        r.restart_stub(0)
        assert wait_until(lambda: httpx.get(r.url + "/health", timeout=10).status_code == 200, 10)
        answer = httpx.post(r.url + "/v1/completions", json=body, timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2


def test_a_request_whose_worker_went_down_waits_only_while_it_may_come_back(tiny_model):
    """The only decode worker stops before the health poll notices, so a request is sent
    to it and finds it unavailable. Back within the request's deadline: the request is
    served, and the worker is up again. Not back: the request is a 503 at its deadline
    (2 s), not after the retry bound (120 s). Meanwhile, either way, the failed call has
    marked the worker down, so a new request is a 503 at once."""
    with serving(tiny_model, health_interval=3600, request_timeout=2, unavailable_retry=120) as r:
        body = {"prompt": "hello there", "max_tokens": 2}
        assert httpx.post(r.url + "/v1/completions", json=body, timeout=30).status_code == 200
        for comes_back in (True, False):
            r.stop_stub(0)
            answers = []
            began = time.monotonic()
            t = threading.Thread(target=lambda: answers.append(
                (httpx.post(r.url + "/v1/completions", json=body, timeout=30), time.monotonic())))
            t.start()
            assert wait_until(lambda: not r.core.routing.decode[0].healthy, 5), "the call never failed"
            meanwhile = httpx.post(r.url + "/v1/completions", json=body, timeout=30)
            assert meanwhile.status_code == 503 and time.monotonic() - began < 1.5
            assert "no decode worker is up" in meanwhile.json()["error"]["message"]
            if comes_back:
                time.sleep(0.3)
                r.restart_stub(0)
            t.join(30)
            answer, ended = answers[0]
            if comes_back:
                assert answer.status_code == 200, answer.text
                assert answer.json()["usage"]["completion_tokens"] == 2
                assert r.core.readiness()[0] == "ok", "a worker that served is still down"
            else:
                assert answer.status_code == 503, answer.text
                assert "decode worker" in answer.json()["error"]["message"]
                assert 1.5 < ended - began < 4.0, ended - began
        assert r.metric("kvmesh_router_decode_retries_total") >= 2


def test_a_hung_prefill_worker_never_holds_a_request_past_its_deadline(tiny_model):
    """A prefill call gets ``--prefill-timeout`` but never more than the request has left:
    with a prefill worker that never answers, the request is decoded (the stub decode
    worker computes the prompt) once its own deadline is near, not after the longer
    prefill timeout."""
    with serving(tiny_model, prefill_delay_s=3600, request_timeout=3, prefill_timeout=120,
                 max_local_prefill_tokens=0, max_decode_prefill_tokens=0) as r:
        start = time.monotonic()
        reply = httpx.post(r.url + "/v1/completions", timeout=60, json={
            "prompt": list(range(10, 60)), "max_tokens": 2, "temperature": 0})
        elapsed = time.monotonic() - start
    assert reply.status_code == 200, reply.text
    assert not reply.json()["kvmesh"]["prefill_ok"]
    assert 2.5 < elapsed < 10, elapsed


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(tiny_model):
    """No ``max_tokens`` (nor ``max_completion_tokens``) on a chat request: the worker is
    asked for what the prompt leaves of the context, as OpenAI and vLLM do, never 16;
    completions keep OpenAI's default of 16. A prompt that fills the context is a 400."""
    with serving(tiny_model) as r:
        chat = {"messages": [{"role": "user", "content": "hello there"}]}
        answer = httpx.post(r.url + "/v1/chat/completions", json=chat, timeout=60)
        assert answer.status_code == 200, answer.text
        used = answer.json()["usage"]
        assert used["completion_tokens"] == 4096 - used["prompt_tokens"] > 16
        answer = httpx.post(r.url + "/v1/chat/completions", json={**chat, "max_completion_tokens": 3},
                            timeout=30)
        assert answer.json()["usage"]["completion_tokens"] == 3
        answer = httpx.post(r.url + "/v1/completions", json={"prompt": "hello there"}, timeout=30)
        assert answer.json()["usage"]["completion_tokens"] == 16

        full = {"messages": [{"role": "user", "content": "hello " * 5000}]}
        answer = httpx.post(r.url + "/v1/chat/completions", json=full, timeout=30)
        assert answer.status_code == 400 and "no room left" in answer.json()["error"]["message"]
        with pytest.raises(ApiError) as refused:
            r.call(r.core.prepare([7] * 4096, Sampling(max_tokens=None)))
        assert refused.value.status == 400
        left = r.call(r.core.prepare([7] * 4000, Sampling(max_tokens=None)))
        assert left.sampling.max_tokens == 96


def test_valid_openai_requests_are_served(tiny_model):
    """What OpenAI clients send: nulls for optional fields (the defaults), text content
    parts, a ``developer`` message (rendered as ``system``), an assistant message with
    null content, a ``tool`` message, a prompt in a list of one. Image parts and several
    prompts in one request are a clear 400."""
    with serving(tiny_model) as r:
        nulls = dict.fromkeys(["temperature", "top_p", "n", "seed", "stop", "stream", "user"])

        def prompt_ids(path: str, body: dict) -> list[int]:
            answer = httpx.post(r.url + path, json={**nulls, "return_token_ids": True, **body}, timeout=30)
            assert answer.status_code == 200, (body, answer.text)
            return answer.json()["choices"][0]["prompt_token_ids"]

        plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one\ntwo"},
                 {"role": "assistant", "content": ""}, {"role": "tool", "content": "42"}]
        as_sent = [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                   {"role": "user", "content": [{"type": "text", "text": "one"},
                                                {"type": "text", "text": "two"}]},
                   {"role": "assistant", "content": None},
                   {"role": "tool", "content": "42", "tool_call_id": "c"}]
        chat = "/v1/chat/completions"
        assert prompt_ids(chat, {"messages": as_sent, "max_tokens": None, "max_completion_tokens": 2}) \
            == prompt_ids(chat, {"messages": plain, "max_tokens": 2})
        completions = "/v1/completions"
        assert prompt_ids(completions, {"prompt": ["hello there"], "max_tokens": None}) \
            == prompt_ids(completions, {"prompt": "hello there"})
        ids = prompt_ids(completions, {"prompt": "hello there"})
        assert prompt_ids(completions, {"prompt": [ids]}) == ids

        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        answer = httpx.post(r.url + chat, json={"messages": [{"role": "user", "content": [image]}]},
                            timeout=30)
        assert answer.status_code == 400 and "only text content parts" in answer.json()["error"]["message"]
        answer = httpx.post(r.url + completions, json={"prompt": ["a", "b"]}, timeout=30)
        assert answer.status_code == 400
        assert "only one prompt per request" in answer.json()["error"]["message"]


def test_unimplemented_fields_are_a_400_naming_them_unless_neutral(tiny_model):
    """A field kvmesh does not implement is a 400 in OpenAI's shape with ``param`` set
    (other validation errors name their field too), never silently ignored; at a value
    that asks for nothing it is served. ``stream_options.include_usage`` streams the usage
    in a last chunk of its own with no choices; without it the usage stays on the last
    token's chunk."""
    with serving(tiny_model) as r:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        refused = [("chat", "logprobs", True), ("chat", "presence_penalty", 0.5),
                   ("chat", "tools", [{"type": "function"}]), ("completions", "logprobs", 1),
                   ("completions", "temperature", 3)]
        for endpoint, param, value in refused:
            path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            body = {**(chat if endpoint == "chat" else {"prompt": "hi"}), param: value}
            answer = httpx.post(r.url + path, json=body, timeout=30)
            assert answer.status_code == 400, (body, answer.text)
            error = answer.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error", error
            assert param in error["message"] and error["code"] == 400
        answer = httpx.post(r.url + "/v1/completions", content=b"{not json", timeout=30,
                            headers={"content-type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] is None
        neutral = {"logprobs": False, "presence_penalty": 0, "response_format": {"type": "text"},
                   "tools": [], "tool_choice": None, "frequency_penalty": None}
        answer = httpx.post(r.url + "/v1/chat/completions", json={**chat, **neutral}, timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2

        def events(path: str, body: dict) -> list[dict]:
            with httpx.stream("POST", r.url + path, json={**body, "stream": True}, timeout=30) as answer:
                assert answer.status_code == 200
                lines = [line.removeprefix("data: ") for line in answer.iter_lines() if line]
            assert lines[-1] == "[DONE]"
            return [json.loads(line) for line in lines[:-1]]

        for path, body in (("/v1/chat/completions", chat),
                           ("/v1/completions", {"prompt": "hi", "max_tokens": 2})):
            chunks = events(path, {**body, "stream_options": {"include_usage": True}})
            *tokens, last = chunks
            assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2
            assert last["id"] == tokens[0]["id"] and last["object"] == tokens[0]["object"]
            assert all("usage" not in c for c in tokens) and tokens[-1]["choices"][0]["finish_reason"]
            chunks = events(path, {**body, "stream_options": {"include_usage": False}})
            assert chunks[-1]["usage"]["completion_tokens"] == 2 and chunks[-1]["choices"]
