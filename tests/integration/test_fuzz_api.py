"""A fuzzer against the router's two APIs, on loopback, in front of stub decode workers
(``tests.router_serving``).

HTTP: 1,000 JSON bodies built from OpenAI's request shapes — each field valid, at an
edge, or junk of any JSON type; strings with lone surrogates, controls and any plane;
serialized as clients do, as raw UTF-8 with the surrogates left in (not UTF-8), or cut
short — on the API's paths with their and other methods and content types; then 200
requests of raw bytes (a request line, headers and a body of random parts, or noise).
gRPC: 200 ``Generate`` messages built from the .proto's fields (any value each type
holds) through the generated stubs, and 100 messages of raw bytes (noise, or a valid
message cut or with a byte flipped). Meanwhile a few clients stall mid-request.

Every answer must be a success or a 4xx in the API's own error shape (OpenAI's JSON over
HTTP, an error event in a stream included; a client-error status over gRPC); none may
take longer than the read timeouts allow; the stalled clients are cut off within those
timeouts; afterwards a normal request is served on both APIs, and the router counted no
request as an error. Hypothesis prints how to reproduce any failure it finds.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmesh_client
from kvmesh_proto import serving_pb2, serving_pb2_grpc
from tests.router_serving import serving

HTTP_CASES, RAW_HTTP_CASES, GRPC_CASES, RAW_GRPC_CASES = 1000, 200, 200, 100
TIMEOUT_S = 1.0             # the router's header and body timeouts here
ANSWER_WITHIN_S = 10.0      # no answer may take longer (the stubs answer at once)
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}

FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

# ---------------------------------------------------------------- strategies

surrogates = st.characters(categories=["Cs"])
texts = st.text(st.one_of(st.characters(), surrogates, st.sampled_from("\x00\n\t\\\"{}[]")),
                max_size=40)
clean_texts = st.text(max_size=40)  # what protobuf strings can carry: no surrogates
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12)
ints = st.one_of(st.integers(-3, 300), st.sampled_from([2**31 - 1, 2**31, 2**63, -2**63 - 1, 2**64]),
                 st.integers())
floats = st.one_of(st.floats(-1, 3), st.floats(), st.sampled_from([0, 1, 2, 2.0000001, -0.0]))


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A request field: mostly of its type, sometimes junk of any JSON type, or null."""
    return st.one_of(valid, valid, st.none(), junk)


stops = st.one_of(texts, st.lists(texts, max_size=18))
SAMPLING = {
    "model": field(st.sampled_from(["tiny", "", "other"]) | texts),
    "max_tokens": field(ints), "temperature": field(floats), "top_p": field(floats),
    "top_k": field(ints), "seed": field(ints), "stop": field(stops), "stream": field(st.booleans()),
    "ignore_eos": field(st.booleans()), "n": field(ints), "return_token_ids": field(st.booleans()),
    "cache_salt": field(texts), "user": field(texts),
    "stream_options": field(st.fixed_dictionaries({}, optional={
        "include_usage": field(st.booleans()), "continuous_usage_stats": field(st.booleans())})),
    "logprobs": field(st.booleans() | ints), "presence_penalty": field(floats),
    "logit_bias": field(st.dictionaries(texts, ints, max_size=3)),
    "response_format": field(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
    "tools": field(st.lists(junk, max_size=2)), "tool_choice": field(st.sampled_from(["none", "auto"])),
    "max_completion_tokens": field(ints),
}
prompts = st.one_of(texts, st.lists(ints, max_size=20), st.lists(texts, max_size=3),
                    st.lists(st.lists(ints, max_size=5), max_size=3), junk)
parts = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": field(texts)}),
                  st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", ""]),
                                         "image_url": junk}), junk)
messages = st.lists(st.fixed_dictionaries({}, optional={
    "role": field(st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"])),
    "content": field(texts | st.lists(parts, max_size=3)), "name": field(texts),
    "tool_call_id": field(texts), "tool_calls": field(st.lists(junk, max_size=2))}), max_size=4)
completions = st.fixed_dictionaries({}, optional={"prompt": field(prompts), **SAMPLING})
chats = st.fixed_dictionaries({}, optional={"messages": field(messages), **SAMPLING})
extras = st.dictionaries(texts, junk, max_size=2)


@st.composite
def http_requests(draw) -> tuple[str, str, dict, bytes]:
    """(method, path, headers, body bytes)."""
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                 "/metrics", "/v1/", "/v1/completions/x", "/%ff", "/v1/chat%2Fcompletions"]))
    body = draw(chats if "chat" in path else completions)
    body.update(draw(extras))
    as_sent = draw(st.sampled_from(["ascii", "utf8", "utf8", "surrogates", "cut", "bytes"]))
    if as_sent == "ascii":      # how json.dumps writes it: surrogates as \\u escapes
        raw = json.dumps(body).encode()
    elif as_sent == "bytes":
        raw = draw(st.binary(max_size=64))
    else:
        text = json.dumps(body, ensure_ascii=False)
        raw = text.encode("utf-8", "surrogatepass" if as_sent == "surrogates" else "replace")
        if as_sent == "cut":
            raw = raw[:draw(st.integers(0, len(raw)))]
    method = draw(st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]))
    content_type = draw(st.sampled_from(["application/json"] * 6 + [
        "application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x", "application/vnd.api+json", "", "json"]))
    headers = {"content-type": content_type} if content_type else {}
    return method, path, headers, raw


@st.composite
def raw_http(draw) -> bytes:
    """Bytes for a connection: a request of random parts (method, target, version,
    headers incl. Content-Length and Transfer-Encoding, body), or noise."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    token = st.text(st.characters(codec="latin-1"), max_size=12).map(lambda t: t.encode("latin-1"))
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT"]) | token)
    target = draw(st.sampled_from([b"/v1/completions", b"/v1/chat/completions", b"/health", b"*",
                                   b"http://x/v1/completions"]) | token)
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x"]) | token)
    body = draw(st.sampled_from([b'{"prompt": "hi", "max_tokens": 2}', b"", b"{"]) | st.binary(max_size=60))
    headers = draw(st.lists(st.one_of(
        st.builds(lambda n: b"Content-Length: %d" % n, st.integers(-5, 200)),
        st.just(b"Content-Length: %d" % len(body)), st.just(b"Transfer-Encoding: chunked"),
        st.just(b"Content-Type: application/json"), st.just(b"Expect: 100-continue"),
        st.just(b"Connection: close"), st.just(b"Upgrade: websocket\r\nConnection: Upgrade"),
        st.builds(lambda n, v: n + b": " + v, token, token)), max_size=5))
    if draw(st.booleans()) and b"Transfer-Encoding: chunked" in headers:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return method + b" " + target + b" " + version + b"\r\nHost: x\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body


int32 = st.integers(-2**31, 2**31 - 1)
float32 = st.floats(width=32)
generate_requests = st.builds(
    lambda model, prompt, sampling, request_id, cache_salt: serving_pb2.GenerateRequest(
        model=model, sampling=sampling, request_id=request_id, cache_salt=cache_salt, **prompt),
    model=st.sampled_from(["", "tiny", "other"]) | clean_texts,
    prompt=st.one_of(st.builds(lambda t: {"text": t}, clean_texts),
                     st.builds(lambda ids: {"token_ids": serving_pb2.TokenIds(ids=ids)},
                               st.lists(st.one_of(st.integers(-3, 1100), int32), max_size=20)),
                     st.just({})),
    sampling=st.builds(serving_pb2.Sampling, max_tokens=st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
                       temperature=float32, top_p=float32, top_k=int32,
                       seed=st.integers(-2**63, 2**63 - 1), stop=st.lists(clean_texts, max_size=18),
                       ignore_eos=st.booleans()),
    request_id=st.one_of(st.just(""), clean_texts, st.text(max_size=200)),
    cache_salt=st.one_of(st.just(""), clean_texts, st.text(min_size=250, max_size=300)))


@st.composite
def raw_grpc(draw) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=100))
    valid = draw(generate_requests).SerializeToString()
    if not valid:
        return draw(st.binary(max_size=10))
    if draw(st.booleans()):
        return valid[:draw(st.integers(0, len(valid) - 1))]
    at = draw(st.integers(0, len(valid) - 1))
    return valid[:at] + bytes([valid[at] ^ draw(st.integers(1, 255))]) + valid[at + 1:]


# ---------------------------------------------------------------- checks

def check_http(answer: httpx.Response, method: str) -> None:
    """A success, or a 4xx in OpenAI's shape; a stream's error events 4xx too."""
    status = answer.status_code
    assert status < 500, (status, answer.text[:500])
    if status >= 400 and method != "HEAD":
        assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, error
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in answer.text.splitlines() if line]
        assert events and events[-1] == "[DONE]", events[-3:]
        for event in events[:-1]:
            data = json.loads(event)
            if "error" in data:
                assert data["error"]["code"] < 500, data


def check_raw_http(answer: bytes) -> None:
    """Whatever came back on a raw connection: nothing, or responses none of them 5xx,
    each error JSON in OpenAI's shape. Responses are read one after another by their
    Content-Length; one without (a chunked success) ends the reading."""
    rest = answer
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"a cut response head: {answer[:500]!r}"
        status_line, *lines = head.split(b"\r\n")
        assert status_line[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 "), answer[:500]
        status = int(status_line[9:12])
        assert status < 500, answer[:500]
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        if b"content-length" not in headers:
            assert status < 400, answer[:500]
            return
        body, rest = rest[:int(headers[b"content-length"])], rest[int(headers[b"content-length"]):]
        if status >= 400:
            assert headers.get(b"content-type", b"").startswith(b"application/json"), answer[:500]
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, error


def check_grpc(call) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS, (e.code(), e.details())


# ---------------------------------------------------------------- the fuzzer

@pytest.fixture(scope="module")
def router(tiny_model):
    with serving(tiny_model, max_model_len=256, header_timeout=TIMEOUT_S, body_timeout=TIMEOUT_S) as r:
        yield r


@pytest.fixture(scope="module")
def stalled(router):
    """Clients that stall mid-request while the fuzzer runs; yields a function that says,
    for each, how long after it began the router cut it off (None: not yet)."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    starts = [head[:20], head, head + b"Content-Length: 50\r\n\r\n{\"prompt\"", b""]
    host, port = router.url.removeprefix("http://").split(":")
    cut_after: list[float | None] = [None] * len(starts)

    def stall(i: int, data: bytes) -> None:
        began = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(data)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
        cut_after[i] = time.monotonic() - began

    threads = [threading.Thread(target=stall, args=(i, data), daemon=True) for i, data in enumerate(starts)]
    for t in threads:
        t.start()
    yield lambda: list(cut_after)
    for t in threads:
        t.join(30)


counts = {"http": 0, "raw_http": 0, "grpc": 0, "raw_grpc": 0}


def test_fuzz_http_json(router, stalled):
    began = time.monotonic()
    with httpx.Client(base_url=router.url, timeout=ANSWER_WITHIN_S) as http:
        @settings(FUZZ, max_examples=HTTP_CASES)
        @given(http_requests())
        def case(request):
            method, path, headers, body = request
            counts["http"] += 1
            check_http(http.request(method, path, headers=headers,
                                    content=body if method not in ("GET", "HEAD") else None), method)

        case()
    assert counts["http"] >= HTTP_CASES
    print(f"{counts['http']} HTTP cases in {time.monotonic() - began:.1f} s")
    cut = stalled()
    assert all(c is not None and c < TIMEOUT_S + 3 for c in cut), f"stalled clients not cut off: {cut}"


def test_fuzz_http_raw(router):
    began = time.monotonic()
    host, port = router.url.removeprefix("http://").split(":")

    @settings(FUZZ, max_examples=RAW_HTTP_CASES)
    @given(raw_http())
    def case(data):
        counts["raw_http"] += 1
        with socket.create_connection((host, int(port)), timeout=ANSWER_WITHIN_S) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # nothing more comes: answer or close now
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        check_raw_http(answer)

    case()
    assert counts["raw_http"] >= RAW_HTTP_CASES
    print(f"{counts['raw_http']} raw HTTP cases in {time.monotonic() - began:.1f} s")


def test_fuzz_grpc(router):
    began = time.monotonic()
    with grpc.insecure_channel(router.grpc_address) as channel:
        stub = serving_pb2_grpc.KVMeshStub(channel)
        raw = channel.unary_stream("/kvmesh.serving.v1.KVMesh/Generate")

        @settings(FUZZ, max_examples=GRPC_CASES)
        @given(generate_requests)
        def case(request):
            counts["grpc"] += 1
            check_grpc(stub.Generate(request, timeout=ANSWER_WITHIN_S))

        @settings(FUZZ, max_examples=RAW_GRPC_CASES)
        @given(raw_grpc())
        def raw_case(data):
            counts["raw_grpc"] += 1
            check_grpc(raw(data, timeout=ANSWER_WITHIN_S))

        case()
        raw_case()
    assert counts["grpc"] >= GRPC_CASES and counts["raw_grpc"] >= RAW_GRPC_CASES
    print(f"{counts['grpc']} + {counts['raw_grpc']} raw gRPC cases in {time.monotonic() - began:.1f} s")


def test_after_the_fuzz_a_normal_request_is_served(router):
    answer = httpx.post(router.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=30)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    with kvmesh_client.Client(router.grpc_address) as client:
        assert len(client.generate("hello", max_tokens=3).token_ids) == 3
    assert router.metric("kvmesh_router_requests_total", '{outcome="error"}') == 0
    assert router.core.admission.inflight == 0 and all(s.running == 0 for s in router.stubs)
