"""Input that never gets a 5xx, and clients that cannot stall the others, against a real
router in front of stub decode workers (``tests.router_serving``).

Covered: malformed bodies and fields (an empty stop string, lone surrogates, bodies that
are not UTF-8 or nest deep, numbers Python refuses) are 400s in OpenAI's shape and reach
no worker, as are FastAPI's own errors (unknown path, wrong method) and malformed HTTP;
over gRPC they are INVALID_ARGUMENT, a message that does not parse included. A client
that sends its headers or body too slowly, or fewer bytes than its Content-Length, gets a
408 (or its connection closed) within the timeout while other clients are served. A long
prompt being tokenized does not hold up a normal request.
"""

from __future__ import annotations

import json
import select
import socket
import statistics
import threading
import time

import grpc
import httpx
import pytest

import kvmesh_client
from tests.router_serving import serving

SHAPE = {"message", "type", "param", "code"}


def error_of(answer: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of a response that must have ``status``."""
    assert answer.status_code == status, (answer.status_code, answer.text[:300])
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    error = answer.json()["error"]
    assert set(error) == SHAPE and error["code"] == status and error["message"], error
    return error


def raw_answer(url: str, request: bytes, timeout_s: float = 10.0) -> bytes:
    """Send ``request`` bytes as they are and read the answer until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def json_error_in(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), raw[:300]
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert set(error) == SHAPE and error["code"] == status
    return error


MALFORMED = [  # (path, body bytes, what the error message says)
    ("/v1/completions", b'{"prompt": "hi", "stop": [""]}', "stop string must not be empty"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ""}', "stop string must not be empty"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}',
     "stop string must not be empty"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', "lone surrogate"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["\\udfff"]}', "lone surrogate"),
    ("/v1/completions", b'{"prompt": "hi", "model": "\\ud800"}', "lone surrogate"),
    ("/v1/completions", b'{"prompt": "hi", "cache_salt": "a\\udbffb"}', "lone surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", '
                             b'"text": "\\ud800"}]}]}', "lone surrogate"),
    ("/v1/completions", b'{"prompt": "\xff\xfe hi"}', "not valid UTF-8"),
    ("/v1/completions", '{"prompt": "caf\u00e9"}'.encode("latin-1"), "not valid UTF-8"),
    ("/v1/completions", '{"prompt": "hi"}'.encode("utf-16"), "not valid UTF-8"),
    ("/v1/completions", b'{"prompt": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper"),
    ("/v1/completions", b'{"prompt": "hi", "x": ' + b'{"a":' * 70 + b"1" + b"}" * 70 + b"}", "nested deeper"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ("/v1/completions", b'{"prompt": "hi"', "not valid JSON"),
    ("/v1/completions", b"[]", "must be a JSON object"),
    ("/v1/completions", b"null", "must be a JSON object"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": Infinity}', "top_p"),
    ("/v1/completions", b'{"prompt": [1, 2, 99999999999999999999]}', "outside the vocabulary"),
]


def test_malformed_input_is_a_4xx_in_the_apis_own_shape(tiny_model):
    """Each malformed body is a 400 in OpenAI's shape, streaming or not, and no worker is
    asked; FastAPI's own errors and malformed HTTP are JSON in the same shape; over gRPC
    the same mistakes, and a message that does not parse, are INVALID_ARGUMENT. A normal
    request is served afterwards."""
    with serving(tiny_model) as r:
        with httpx.Client(base_url=r.url, timeout=30) as http:
            for path, body, says in MALFORMED:
                error = error_of(http.post(path, content=body, headers={"content-type": "application/json"}), 400)
                assert says in error["message"], (body[:80], error)
            streamed = http.post("/v1/completions", json={"prompt": "hi", "stop": [""], "stream": True})
            assert "stop string" in error_of(streamed, 400)["message"]
            for headers in ({"content-type": "text/plain"}, {}):  # JSON, but not said to be
                error = error_of(http.post("/v1/completions", content=b'{"prompt": "hi"}', headers=headers), 400)
                assert "content-type: application/json" in error["message"]
            assert error_of(http.get("/v1/nowhere"), 404)["type"] == "not_found_error"
            error_of(http.get("/v1/completions"), 405)
            error_of(http.post("/health", json={}), 405)
            assert r.stubs[0].calls == 0, "a malformed request reached a worker"

        error = json_error_in(raw_answer(r.url, b"NOT HTTP AT ALL\r\n\r\n"), 400)
        assert "malformed" in error["message"]
        json_error_in(raw_answer(r.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: abc\r\n\r\n"), 400)
        huge = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Junk: " + b"a" * 100_000 + b"\r\n\r\n"
        json_error_in(raw_answer(r.url, huge), 431)

        with kvmesh_client.Client(r.grpc_address) as client:
            for stop in ([""], ["a", ""]):
                with pytest.raises(kvmesh_client.InvalidArgument, match="stop string"):
                    client.generate("hi", max_tokens=2, stop=stop)
        with grpc.insecure_channel(r.grpc_address) as channel:
            generate = channel.unary_stream("/kvmesh.serving.v1.KVMesh/Generate")
            for junk in (b"\x12\x02\xed\xa0", b"\xff\xff\xff\xff", b"\x0a\x05ab"):
                with pytest.raises(grpc.RpcError) as refused:
                    list(generate(junk, timeout=10))
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
            list_models = channel.unary_unary("/kvmesh.serving.v1.KVMesh/ListModels")
            with pytest.raises(grpc.RpcError) as refused:
                list_models(b"\xff\xff", timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert r.stubs[0].calls == 0
        assert r.metric("kvmesh_router_requests_total", '{outcome="error"}') == 0

        ok = httpx.post(r.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def answer_and_close(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (monotonic)."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer, time.monotonic()


def test_slow_or_short_requests_are_timed_out_and_others_are_served(tiny_model):
    """With 1 s header and body timeouts: a body shorter than its Content-Length, headers
    sent a byte at a time, a body sent a byte at a time, a connection that sends nothing,
    and a body dribbled after its answer (a path that never reads it) each have their
    connection closed about a second after they began — with a 408 in OpenAI's shape
    where a request had begun and was not answered — while other clients are served."""
    timeout_s = 1.0
    with serving(tiny_model, header_timeout=timeout_s, body_timeout=timeout_s) as r:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        start = time.monotonic()
        short, slow_head, slow_body, idle, after_answer = (connect(r.url) for _ in range(5))
        short.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"prompt": "hi"')
        slow_body.sendall(head + b"Content-Length: 1000\r\n\r\n")
        after_answer.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        dribbled = {slow_head: head, slow_body: b"x" * 1000, after_answer: b"y" * 1000}
        stop = threading.Event()

        def dribble():  # a byte every 0.1 s, never the whole
            for i in range(100):
                for sock, data in dribbled.items():
                    try:
                        sock.send(data[i:i + 1])
                    except OSError:
                        pass
                if stop.wait(0.1):
                    return

        dribbler = threading.Thread(target=dribble, daemon=True)
        dribbler.start()
        try:
            # Others are served meanwhile, all the time.
            with httpx.Client(base_url=r.url, timeout=30) as http:
                for _ in range(5):
                    ok = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                    assert ok.status_code == 200
            closed = {}
            for name, sock in (("short", short), ("slow_head", slow_head), ("slow_body", slow_body),
                               ("idle", idle), ("after_answer", after_answer)):
                closed[name] = answer_and_close(sock)
        finally:
            stop.set()
            dribbler.join(5)
            for sock in (short, slow_head, slow_body, idle, after_answer):
                sock.close()
        for name in ("short", "slow_head", "slow_body"):
            answer, when = closed[name]
            error = json_error_in(answer, 408)
            assert "did not arrive within 1 s" in error["message"], (name, error)
            assert 0.9 * timeout_s < when - start < timeout_s + 3, (name, when - start)
        assert closed["idle"][0] == b"" and closed["idle"][1] - start < timeout_s + 3
        answer, when = closed["after_answer"]
        assert answer.startswith(b"HTTP/1.1 405 ") and answer.count(b"HTTP/1.1") == 1, answer
        assert when - start < timeout_s + 3
        assert r.stubs[0].calls == 5


def test_a_long_prompt_being_tokenized_does_not_hold_up_a_normal_request(tiny_model):
    """Four 3.8 MB prompts sent at once (each too long for the context, so a 400 once
    tokenized): while they are being tokenized, a normal request's latency is within 2x
    of its latency without them (medians, measured in the same run)."""
    words = ("hello", "world", "the", "quick", "brown", "fox", "lorem", "ipsum", "été", "42")
    text = " ".join(words[(i * 7919) % len(words)] for i in range(700_000))[:3_800_000]
    heavy = json.dumps({"prompt": text, "max_tokens": 4}, ensure_ascii=False).encode()
    assert len(heavy) < 4 << 20  # within the body limit
    with serving(tiny_model) as r:
        with httpx.Client(base_url=r.url, timeout=60) as http:
            def latencies(n: int) -> list[float]:
                seen = []
                for _ in range(n):
                    began = time.perf_counter()
                    answer = http.post("/v1/completions", json={"prompt": "hello there", "max_tokens": 2})
                    seen.append(time.perf_counter() - began)
                    assert answer.status_code == 200
                return seen

            latencies(5)  # warm up
            alone = latencies(30)
            socks = []
            for _ in range(4):
                sock = connect(r.url)
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(heavy) + heavy)
                socks.append(sock)
            time.sleep(0.2)  # the router has the bodies
            loaded = latencies(30)
            readable, _, _ = select.select(socks, [], [], 0)
            assert not readable, "a long prompt was done before the measurement ended"
        for sock in socks:
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
            sock.close()
    ratio = statistics.median(loaded) / statistics.median(alone)
    mean_ratio = statistics.mean(loaded) / statistics.mean(alone)
    print(f"normal request: {statistics.median(alone) * 1e3:.1f} ms alone, "
          f"{statistics.median(loaded) * 1e3:.1f} ms beside four 3.8 MB prompts (x{ratio:.2f}; "
          f"means x{mean_ratio:.2f}, slowest {max(loaded) * 1e3:.1f} ms)")
    assert ratio <= 2.0, (alone, loaded)
