"""Sessions through the router's front door: a request names its session (``kvmesh.session``
or the OpenAI ``user`` field, over HTTP; the ``session`` field over gRPC), the decode
worker is handed the session's tenant-scoped id, and a tenant reaches (looks up,
releases) only the sessions of its own cache salt, with the API token. A real store
server (in-process gRPC, a real tiered store) holds the blocks; the decode worker is the
stub (``tests.router_serving``), the one fake, standing in for a vLLM worker."""

from __future__ import annotations

import httpx
import pytest

import kvmesh_client
from kvmesh.kv_store.client import StoreClient
from kvmesh.kv_store.server import start_store_server
from kvmesh.kv_store.sessions import Sessions, session_id
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.tiers import HostTier
from tests.router_serving import serving

TOKEN = "sessions-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store():
    srv, port = start_store_server("127.0.0.1", 0, TieredStore(
        [HostTier(1 << 20, page_bytes=1 << 20)], sessions=Sessions(60.0, 16)))
    yield f"127.0.0.1:{port}"
    srv.stop(0)


@pytest.fixture(scope="module")
def router(tiny_model, store):
    with serving(tiny_model, store=(store,), api_token=TOKEN) as r:
        yield r


def complete(router, **fields) -> httpx.Response:
    return httpx.post(router.url + "/v1/completions", headers=AUTH, timeout=30,
                      json={"prompt": "hello there", "max_tokens": 2, **fields})


def test_a_request_names_its_session_scoped_by_its_tenant(router):
    stub = router.stubs[0]
    cases = [({"kvmesh": {"session": "chat"}, "cache_salt": "a"}, session_id("chat", "a")),
             ({"kvmesh": {"session": "chat"}, "cache_salt": "b"}, session_id("chat", "b")),
             ({"user": "u1"}, session_id("u1")),
             ({"user": "u1", "kvmesh": {"session": "chat"}}, session_id("chat")),  # kvmesh wins
             ({}, "")]
    for fields, expected in cases:
        assert complete(router, **fields).status_code == 200
        assert stub.sessions[-1] == expected, fields
    with kvmesh_client.Client(router.grpc_address, token=TOKEN) as client:
        client.generate("hello there", max_tokens=2, cache_salt="a", session="chat")
    assert stub.sessions[-1] == session_id("chat", "a")
    for bad in ({"kvmesh": {"session": "x" * 257}}, {"kvmesh": {"session": ""}}, {"user": "x" * 257}):
        r = complete(router, **bad)
        assert r.status_code == 400 and "error" in r.json(), bad


def test_a_tenant_reaches_only_its_own_sessions(router, store):
    with StoreClient(store) as client:  # as a worker saves a session's blocks
        assert client.put([(b"k1", b"1" * 64, None, session_id("chat", "a")),
                           (b"k2", b"2" * 64, b"k1", session_id("chat", "a"))]) == 2
    call = lambda what, **body: httpx.post(f"{router.url}/v1/sessions/{what}", json=body,
                                           headers=AUTH, timeout=10)
    found = call("lookup", session="chat", cache_salt="a")
    assert found.status_code == 200
    assert found.json()["blocks"] == {"host": 2} and found.json()["state"] == "active"
    # another tenant (another salt, or none) neither sees nor releases it
    assert call("lookup", session="chat", cache_salt="b").status_code == 404
    assert call("release", session="chat", cache_salt="b").json() == {
        "session": "chat", "released": False, "blocks": 0}
    assert call("release", session="chat").json()["released"] is False
    # nor does anyone without the token
    assert httpx.post(f"{router.url}/v1/sessions/release", json={"session": "chat", "cache_salt": "a"},
                      timeout=10).status_code == 401
    assert call("lookup", session="chat", cache_salt="a").status_code == 200
    assert call("release", session="chat", cache_salt="a").json() == {
        "session": "chat", "released": True, "blocks": 2}
    assert call("lookup", session="chat", cache_salt="a").status_code == 404
    with StoreClient(store) as client:
        assert client.lookup([[b"k1"], [b"k2"]]) == 2  # the blocks stay, as ordinary ones
    assert call("release", session="", cache_salt="a").status_code == 400
