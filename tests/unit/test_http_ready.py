"""``LocalCluster``'s readiness check of a router (``cluster.local.http_ready``) against a
real HTTP server answering what a router's ``/health`` answers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvmesh.cluster.local import http_ready


@pytest.fixture
def health():
    """A server whose ``/health`` answers ``answer["body"]`` (the router's shape) with
    ``answer["code"]``, listing the workers only to a caller with ``Bearer t0ken``."""
    answer = {"code": 200, "body": {"status": "ok", "workers": {}}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = dict(answer["body"])
            if self.headers.get("Authorization") != "Bearer t0ken":
                body.pop("workers", None)
            data = json.dumps(body).encode()
            self.send_response(answer["code"])
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health", answer
    server.shutdown()
    server.server_close()


def test_ready_only_once_every_started_worker_is_listed_ok(health):
    url, answer = health
    listed = ["prefill 127.0.0.1:1", "decode 127.0.0.1:2"]
    ready = http_ready(url, "ok", listed, "t0ken")
    answer["body"] = {"status": "ok", "workers": {"decode 127.0.0.1:2": "ok"}}  # prefill not found yet
    assert not ready()
    answer["body"]["workers"]["prefill 127.0.0.1:1"] = "starting"
    assert not ready()
    answer["body"]["workers"]["prefill 127.0.0.1:1"] = "ok"
    assert ready()
    assert not http_ready(url, "ok", listed)()  # without the token the workers are not shown
    answer["body"]["status"] = "degraded"
    assert not ready()
    answer["code"] = 503
    assert not http_ready(url)()


def test_without_a_status_any_200_is_ready_and_nothing_listening_is_not(health):
    url, answer = health
    answer["body"] = {"status": "unavailable"}
    assert http_ready(url)()
    assert not http_ready("http://127.0.0.1:1/health")()
