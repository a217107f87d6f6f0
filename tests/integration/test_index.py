"""The block index: one behavioural suite run on both implementations, then Redis-only tests.

The Redis tests start their own ``redis-server`` (on a free loopback port, for the session);
a missing binary fails them rather than skipping them.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import redis

from kvmesh.kv_store.index import EmbeddedBlockIndex, IndexEvent, RedisBlockIndex
from kvmesh.kv_store.index.base import MAX_GROUP_KEYS, MAX_GROUPS
from kvmesh.kv_store.index.redis_index import CHUNK_KEYS, REAP_KEYS
from kvmesh.kv_store.store_node import IndexPublisher

TIMEOUT = 10.0
T0 = 1_700_000_000.25
REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def key(*parts: object) -> bytes:
    """A 32-byte key holding NUL and ':' bytes, like the real ones may."""
    return b"\x00:" + hashlib.blake2b(repr(parts).encode(), digest_size=30).digest()


def chain(name: str, blocks: int, per_block: int) -> list[list[bytes]]:
    return [[key(name, b, layer) for layer in range(per_block)] for b in range(blocks)]


def flat(groups: list[list[bytes]]) -> list[bytes]:
    return [k for group in groups for k in group]


def drain(sub, timeout_s: float = 0.3) -> list[IndexEvent]:
    """Events until none comes within ``timeout_s``."""
    events = []
    while (event := sub.get(timeout_s)) is not None:
        events.append(event)
    return events


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    client.flushall()
    yield client
    client.close()


def scan_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{prefix}:*", count=1000))


# Both implementations.


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["embedded", "redis"])
def make_index(request, clock):
    """Builds indexes of the parametrized kind on the shared fake clock; closes them after."""
    made = []
    client = request.getfixturevalue("redis_client") if request.param == "redis" else None

    def make(prefix: str = "kvmesh", clock=clock, **kwargs):
        if client is None:
            index = EmbeddedBlockIndex(heartbeat_timeout_s=TIMEOUT, clock=clock, **kwargs)
        else:
            index = RedisBlockIndex(client, prefix=prefix, heartbeat_timeout_s=TIMEOUT,
                                    clock=clock, **kwargs)
        made.append(index)
        return index

    yield make
    for index in made:
        index.close()


@pytest.fixture
def index(make_index):
    return make_index()


def test_register_heartbeat_and_live_nodes(index, clock):
    index.register_node("a", "10.0.0.1:7000")
    clock.advance(3)
    index.register_node("b", "10.0.0.2:7000")
    clock.advance(3)
    index.heartbeat("a")
    nodes = index.live_nodes()
    assert set(nodes) == {"a", "b"}
    assert nodes["a"].address == "10.0.0.1:7000" and nodes["a"].last_seen == T0 + 6
    assert nodes["b"].last_seen == T0 + 3
    index.register_node("b", "10.0.0.2:7001")  # re-registering a live node moves it
    assert index.live_nodes()["b"].address == "10.0.0.2:7001"


def test_heartbeat_refuses_unknown_and_timed_out_nodes(index, clock):
    with pytest.raises(KeyError):
        index.heartbeat("never")
    index.register_node("a", "x")
    clock.advance(TIMEOUT + 0.5)
    with pytest.raises(KeyError):  # timed out, not yet cleaned up
        index.heartbeat("a")
    assert index.expire_dead_nodes() == ["a"]
    with pytest.raises(KeyError):
        index.heartbeat("a")


def test_longest_prefix_counts_leading_complete_groups_per_node(index):
    groups = chain("c", 4, 3)
    for node in "abcd":
        index.register_node(node, node)
    index.add("a", "gpu", flat(groups[:2]) + groups[2][:2])  # group 2 incomplete
    index.add("b", "host", flat(groups[:1]))
    index.add("c", "disk", flat(groups[1:]))  # no group 0: holds no prefix
    index.add("d", "gpu", flat(groups))
    index.add("d", "host", groups[1][1:])  # tiers do not matter to the prefix
    assert index.longest_prefix(groups) == {"a": 2, "b": 1, "d": 4}
    assert index.longest_prefix(groups[:1]) == {"a": 1, "b": 1, "d": 1}
    assert index.longest_prefix([[key("nowhere")]] + groups) == {}
    assert index.longest_prefix([]) == {}


def test_readd_moves_tier_and_locate_omits_missing(index):
    index.register_node("a", "x")
    index.register_node("b", "y")
    k1, k2, absent = key(1), key(2), key(3)
    index.add("a", "gpu", [k1, k2])
    index.add("b", "disk", [k1])
    index.add("a", "host", [k1])
    assert index.locate([k1, k2, absent]) == {k1: {"a": "host", "b": "disk"}, k2: {"a": "gpu"}}


def test_keys_are_arbitrary_bytes(index):
    index.register_node("a", "x")
    odd = [b"\x00", b":", b"a:b\x00c", b"\x00" * 32, b"\xff:\x00:" * 8, b""]
    index.add("a", "gpu", odd)
    assert index.locate(odd) == {k: {"a": "gpu"} for k in odd}
    assert index.longest_prefix([[k] for k in odd]) == {"a": len(odd)}
    index.remove("a", odd[:3])
    assert set(index.locate(odd)) == set(odd[3:])


def test_remove_announces_only_held_keys(index):
    index.register_node("a", "x")
    index.register_node("b", "y")
    k1, k2 = key(1), key(2)
    index.add("a", "gpu", [k1])
    index.add("b", "gpu", [k2])
    with index.subscribe() as sub:
        index.remove("a", [k1, k2, k1])
        index.remove("a", [k2])  # held by b only: no change, no event
        index.remove("nobody", [k1])
        assert drain(sub) == [IndexEvent("removed", "a", None, (k1,))]
    assert index.locate([k1, k2]) == {k2: {"b": "gpu"}}


def test_dead_node_vanishes_at_once_and_expire_drops_its_entries(index, clock):
    groups = chain("d", 2, 2)
    index.register_node("a", "x")
    index.register_node("b", "y")
    index.add("a", "gpu", flat(groups))
    index.add("b", "gpu", flat(groups))
    clock.advance(TIMEOUT / 2)
    index.heartbeat("b")
    clock.advance(TIMEOUT / 2)  # a's heartbeat is exactly TIMEOUT old: still live
    assert index.longest_prefix(groups) == {"a": 2, "b": 2}
    assert index.expire_dead_nodes() == []
    clock.advance(0.001)
    assert index.longest_prefix(groups) == {"b": 2}
    assert index.locate(groups[0]) == {k: {"b": "gpu"} for k in groups[0]}
    assert set(index.live_nodes()) == {"b"}
    with index.subscribe() as sub:
        assert index.expire_dead_nodes() == ["a"]
        assert index.expire_dead_nodes() == []
        assert drain(sub) == [IndexEvent("node_expired", "a", None, ())]
    clock.advance(-TIMEOUT)  # a clock turned back cannot revive what expire dropped
    assert index.longest_prefix(groups) == {"b": 2}
    assert set(index.live_nodes()) == {"b"}


def test_reregistering_a_dead_node_starts_it_empty(index, clock):
    k1 = key(1)
    index.register_node("a", "x")
    index.add("a", "gpu", [k1])
    clock.advance(TIMEOUT + 1)
    with index.subscribe() as sub:
        index.register_node("a", "x2")
        assert drain(sub) == [IndexEvent("node_expired", "a", None, ())]
    assert index.locate([k1]) == {}
    assert index.live_nodes()["a"].address == "x2"
    assert index.expire_dead_nodes() == []


def test_unregister_drops_entries_and_announces(index):
    k1 = key(1)
    index.register_node("a", "x")
    index.add("a", "disk", [k1])
    with index.subscribe() as sub:
        index.unregister_node("a")
        index.unregister_node("a")
        index.unregister_node("never")
        assert drain(sub) == [IndexEvent("node_expired", "a", None, ())]
    assert index.locate([k1]) == {} and index.live_nodes() == {}
    with pytest.raises(KeyError):
        index.heartbeat("a")
    index.register_node("a", "x")
    assert index.locate([k1]) == {}


def test_add_refuses_nodes_that_are_not_live_and_unknown_tiers(index, clock):
    with pytest.raises(KeyError):
        index.add("never", "gpu", [key(1)])
    index.register_node("a", "x")
    with pytest.raises(ValueError):
        index.add("a", "nvme", [key(1)])
    index.add("a", "gpu", [])
    clock.advance(TIMEOUT + 1)
    with pytest.raises(KeyError):
        index.add("a", "gpu", [key(1)])
    with pytest.raises(KeyError):
        index.add("a", "gpu", [])
    assert index.locate([key(1)]) == {}


def test_longest_prefix_bounds(index):
    index.register_node("a", "x")
    with pytest.raises(ValueError):
        index.longest_prefix([[key(i)] for i in range(MAX_GROUPS + 1)])
    with pytest.raises(ValueError):
        index.longest_prefix([[key(i) for i in range(MAX_GROUP_KEYS + 1)]])
    with pytest.raises(ValueError):
        index.longest_prefix([[key(1)], []])
    big = [key(i) for i in range(MAX_GROUP_KEYS)]
    index.add("a", "host", big)
    assert index.longest_prefix([big]) == {"a": 1}


def test_events_arrive_in_order_and_only_after_subscribing(index, clock):
    k1, k2 = key(1), key(2)
    index.register_node("a", "x")
    index.add("a", "gpu", [k1])  # before anyone listens
    sub1 = index.subscribe()
    index.add("a", "host", [k1, k2, k1])
    sub2 = index.subscribe()
    index.remove("a", [k1])
    index.add("a", "disk", [k1])
    clock.advance(TIMEOUT + 1)
    index.expire_dead_nodes()
    tail = [
        IndexEvent("removed", "a", None, (k1,)),
        IndexEvent("stored", "a", "disk", (k1,)),
        IndexEvent("node_expired", "a", None, ()),
    ]
    assert drain(sub1) == [IndexEvent("stored", "a", "host", (k1, k2))] + tail
    assert drain(sub2) == tail


def test_get_times_out_and_closed_subscriptions_refuse(index):
    sub = index.subscribe()
    start = time.monotonic()
    assert sub.get(0.2) is None
    assert 0.15 <= time.monotonic() - start < 1.0
    assert sub.get(0) is None
    sub.close()
    sub.close()
    with pytest.raises(ValueError):
        sub.get(0.1)
    other = index.subscribe()
    index.close()  # closes the subscriptions opened on it
    with pytest.raises(ValueError):
        other.get(0.1)


def test_concurrent_writers_lose_nothing(index):
    nodes = [f"n{i}" for i in range(4)]
    for node in nodes:
        index.register_node(node, node)
    groups = {node: chain(node, 20, 4) for node in nodes}

    def write(node: str) -> None:
        for group in groups[node]:
            index.add(node, "gpu", group)

    threads = [threading.Thread(target=write, args=(node,)) for node in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    for node in nodes:
        assert index.longest_prefix(groups[node]) == {node: 20}


def test_heartbeat_timeout_must_be_positive():
    with pytest.raises(ValueError):
        EmbeddedBlockIndex(heartbeat_timeout_s=0)


def test_embedded_subscription_drops_what_it_cannot_hold():
    index = EmbeddedBlockIndex(heartbeat_timeout_s=TIMEOUT, clock=FakeClock(), max_pending=2)
    index.register_node("a", "x")
    sub = index.subscribe()
    for i in range(3):
        index.add("a", "gpu", [key(i)])
    assert [e.keys for e in drain(sub, 0)] == [(key(0),), (key(1),)]
    assert sub.dropped == 1
    index.add("a", "gpu", [key(3)])
    assert sub.get(0).keys == (key(3),)


# Redis only.


def test_expire_and_unregister_leave_no_key_of_the_node(redis_client, clock):
    index = RedisBlockIndex(redis_client, prefix="leak", heartbeat_timeout_s=TIMEOUT, clock=clock)
    many = [key("many", i) for i in range(REAP_KEYS + 1000)]  # reaped in several steps
    index.register_node("a", "x")
    index.register_node("b", "y")
    index.register_node("c", "z")
    index.add("a", "gpu", many)
    index.add("b", "host", many[:10])
    index.add("c", "disk", many[:5])
    with index.subscribe() as sub:
        index.unregister_node("c")
        clock.advance(TIMEOUT / 2)
        index.heartbeat("b")
        clock.advance(TIMEOUT / 2 + 1)
        assert index.expire_dead_nodes() == ["a"]
        assert [e.node_id for e in drain(sub)] == ["c", "a"]
    assert scan_keys(redis_client, "leak") == sorted(
        [b"leak:nodes", b"leak:addr", b"leak:nodekeys:b"] + [b"leak:blk:" + k for k in many[:10]]
    )
    assert redis_client.zrange("leak:nodes", 0, -1) == [b"b"]
    assert set(redis_client.hkeys("leak:addr")) == {b"b"}
    assert all(redis_client.hkeys(b"leak:blk:" + k) == [b"b"] for k in many[:10])
    index.unregister_node("b")
    assert scan_keys(redis_client, "leak") == []


def test_expiry_is_announced_once_among_racing_indexes(redis_client, clock):
    first, second = (RedisBlockIndex(redis_client, heartbeat_timeout_s=TIMEOUT, clock=clock)
                     for _ in range(2))
    for node in ("a", "b", "c"):
        first.register_node(node, node)
        first.add(node, "gpu", [key(node, i) for i in range(3000)])
    clock.advance(TIMEOUT + 1)
    with first.subscribe() as sub:
        results: list[list[str]] = []
        threads = [threading.Thread(target=lambda ix=ix: results.append(ix.expire_dead_nodes()))
                   for ix in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert sorted(results[0] + results[1]) == ["a", "b", "c"]
        assert sorted(e.node_id for e in drain(sub)) == ["a", "b", "c"]
    assert scan_keys(redis_client, "kvmesh") == []


def test_large_add_and_remove_go_in_ordered_chunks(redis_client, clock):
    index = RedisBlockIndex(redis_client, heartbeat_timeout_s=TIMEOUT, clock=clock)
    keys = [key("big", i) for i in range(2 * CHUNK_KEYS + 7)]
    index.register_node("a", "x")
    with index.subscribe() as sub:
        index.add("a", "disk", keys)
        index.remove("a", keys)
        events = drain(sub)
    assert [e.kind for e in events] == ["stored"] * 3 + ["removed"] * 3
    assert [k for e in events[:3] for k in e.keys] == keys
    assert [k for e in events[3:] for k in e.keys] == keys
    assert scan_keys(redis_client, "kvmesh") == [b"kvmesh:addr", b"kvmesh:nodes"]


def test_prefixes_keep_clusters_apart(redis_client, clock):
    one = RedisBlockIndex(redis_client, prefix="one", heartbeat_timeout_s=TIMEOUT, clock=clock)
    two = RedisBlockIndex(redis_client, prefix="two", heartbeat_timeout_s=TIMEOUT, clock=clock)
    one.register_node("a", "x")
    one.add("a", "gpu", [key(1)])
    with two.subscribe() as sub:
        one.remove("a", [key(1)])
        one.add("a", "gpu", [key(1)])
        assert sub.get(0.3) is None
    assert two.live_nodes() == {} and two.locate([key(1)]) == {}
    assert two.expire_dead_nodes() == []
    assert all(k.startswith(b"one:") for k in redis_client.keys("*"))
    for bad in ("", "a:b"):
        with pytest.raises(ValueError):
            RedisBlockIndex(redis_client, prefix=bad)


def test_decoding_clients_are_refused(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ValueError):
        RedisBlockIndex(client)
    client.close()


def test_events_on_the_wire_are_documented_msgpack(redis_client, clock):
    index = RedisBlockIndex(redis_client, heartbeat_timeout_s=TIMEOUT, clock=clock)
    index.register_node("a", "x")
    raw = redis_client.pubsub()
    raw.subscribe("kvmesh:events")
    assert raw.get_message(timeout=5)["type"] == "subscribe"
    index.add("a", "gpu", [b"\x00:k"])
    index.unregister_node("a")
    payloads = [raw.get_message(timeout=5)["data"] for _ in range(2)]
    raw.close()
    assert [msgpack.unpackb(p, raw=True) for p in payloads] == [
        [b"stored", b"a", b"gpu", [b"\x00:k"]],
        [b"node_expired", b"a", b"", []],
    ]


def test_liveness_is_shared_across_processes(redis_client, redis_url):
    program = (
        "import sys\n"
        "from kvmesh.kv_store.index.redis_index import RedisBlockIndex\n"
        "index = RedisBlockIndex.from_url(sys.argv[1], prefix='shared', heartbeat_timeout_s=5)\n"
        "index.register_node('remote', '10.0.0.9:7000')\n"
        "index.add('remote', 'disk', [b'\\x00:remote'])\n"
        "index.close()\n"
    )
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    subprocess.run([sys.executable, "-c", program, redis_url], env=env, check=True, timeout=60)
    here = RedisBlockIndex(redis_client, prefix="shared", heartbeat_timeout_s=5)
    assert set(here.live_nodes()) == {"remote"}
    assert here.longest_prefix([[b"\x00:remote"]]) == {"remote": 1}
    later = RedisBlockIndex(redis_client, prefix="shared", heartbeat_timeout_s=5,
                            clock=lambda: time.time() + 6)
    assert later.longest_prefix([[b"\x00:remote"]]) == {}
    assert later.expire_dead_nodes() == ["remote"]
    assert scan_keys(redis_client, "shared") == []


def test_longest_prefix_of_a_long_chain_is_one_call(redis_client, clock, monkeypatch):
    index = RedisBlockIndex(redis_client, heartbeat_timeout_s=TIMEOUT, clock=clock)
    groups = chain("long", 1000, 8)
    for node in ("a", "b", "c"):
        index.register_node(node, node)
    index.add("a", "gpu", flat(groups))
    index.add("b", "host", flat(groups[:500]))
    index.add("c", "disk", flat(groups[1:]))
    index.longest_prefix(groups[:1])  # Redis caches the script on first use
    calls = []
    real = redis_client.execute_command
    monkeypatch.setattr(redis_client, "execute_command",
                        lambda *args, **kw: calls.append(args[0]) or real(*args, **kw))
    monkeypatch.setattr(redis_client, "pipeline", None)  # a pipeline would be a call too
    assert index.longest_prefix(groups) == {"a": 1000, "b": 500}
    assert calls == ["EVALSHA"]


def test_redis_matches_embedded_on_a_random_workload(redis_client, clock):
    rng = random.Random(7)
    real = RedisBlockIndex(redis_client, heartbeat_timeout_s=TIMEOUT, clock=clock)
    model = EmbeddedBlockIndex(heartbeat_timeout_s=TIMEOUT, clock=clock)
    subs = [real.subscribe(), model.subscribe()]
    pool = [key("pool", i) for i in range(24)] + [b"\x00", b":"]
    nodes = ["n0", "n1", "n2", "n3"]

    def both(method: str, *args):
        outcomes = []
        for ix in (real, model):
            try:
                outcomes.append(("ok", getattr(ix, method)(*args)))
            except KeyError:
                outcomes.append(("KeyError", None))
        assert outcomes[0] == outcomes[1], (method, args)

    for _ in range(400):
        op = rng.random()
        node = rng.choice(nodes)
        if op < 0.1:
            both("register_node", node, f"addr-{node}")
        elif op < 0.2:
            both("heartbeat", node)
        elif op < 0.5:
            tier = rng.choice(["gpu", "host", "disk"])
            both("add", node, tier, rng.sample(pool, rng.randrange(1, 6)))
        elif op < 0.65:
            both("remove", node, rng.sample(pool, rng.randrange(1, 6)))
        elif op < 0.7:
            clock.advance(rng.uniform(0, TIMEOUT / 2))
        elif op < 0.74:
            assert sorted(real.expire_dead_nodes()) == sorted(model.expire_dead_nodes())
        elif op < 0.76:
            both("unregister_node", node)
        groups = [rng.sample(pool, rng.randrange(1, 3)) for _ in range(rng.randrange(1, 6))]
        assert real.longest_prefix(groups) == model.longest_prefix(groups)
        assert real.locate(pool) == model.locate(pool)
        assert real.live_nodes() == model.live_nodes()
    real_events, model_events = (drain(sub, 0.2) for sub in subs)
    assert Counter(real_events) == Counter(model_events) and len(model_events) > 50


# A store node's publisher, over a Redis that goes down and comes back: a real outage (the
# server shut down, connections refused), not a mock. The background thread is left idle
# (a flush every hour) so that the test decides when each flush happens.


def publisher_over(redis_url: str, **kwargs) -> tuple[RedisBlockIndex, IndexPublisher]:
    index = RedisBlockIndex.from_url(redis_url, socket_timeout_s=2.0)
    return index, IndexPublisher(index, "n1", "addr-1", flush_s=3600, **kwargs)


def outage_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvmesh.store"]


def test_changes_a_failed_flush_kept_reach_the_index_once_it_is_back(own_redis, caplog):
    k1, k2, k3, k4 = (key("kept", i) for i in range(4))
    index, publisher = publisher_over(own_redis.url)
    publisher.start()
    try:
        for k in (k1, k2):
            publisher.on_change("stored", k, "host")
        assert publisher.flush()
        own_redis.stop(save=True)
        publisher.on_change("removed", k1, None)  # evicted: must leave the index
        publisher.on_change("stored", k3, "disk")
        publisher.on_change("stored", k4, "host")
        assert not publisher.flush()
        publisher.on_change("removed", k4, None)  # stored, then removed: never listed
        publisher.on_change("stored", k2, "disk")  # moved
        assert not publisher.flush()
        own_redis.start()  # with the data it saved: n1 is still registered
        assert publisher.flush()
        assert index.locate([k1, k2, k3, k4]) == {k2: {"n1": "disk"}, k3: {"n1": "disk"}}
        assert publisher.flush()  # nothing left over
        logs = outage_logs(caplog)
        assert len(logs) == 2  # two failed flushes, one outage
        assert logs[0].startswith("block index unavailable") and "available again" in logs[1]
    finally:
        publisher.stop()
        index.close()


def test_past_max_pending_the_node_reannounces_what_it_holds(own_redis, caplog):
    k1, k2, k3, k4 = (key("over", i) for i in range(4))
    held = {}
    index, publisher = publisher_over(own_redis.url, max_pending=2)
    publisher.start(lambda: dict(held))
    try:
        for k in (k1, k2):
            held[k] = "host"
            publisher.on_change("stored", k, "host")
        assert publisher.flush()
        own_redis.stop(save=True)
        del held[k1]
        publisher.on_change("removed", k1, None)
        for k, tier in ((k3, "host"), (k4, "disk")):
            held[k] = tier
            publisher.on_change("stored", k, tier)
        assert not publisher.flush()  # three changes: over the bound, so dropped
        own_redis.start()  # n1 is still registered there, still listing k1
        assert publisher.flush()
        assert index.locate([k1, k2, k3, k4]) == {k2: {"n1": "host"}, k3: {"n1": "host"},
                                                  k4: {"n1": "disk"}}
        assert sum("more than 2 block changes" in m for m in outage_logs(caplog)) == 1
    finally:
        publisher.stop()
        index.close()


def test_a_node_the_index_forgot_comes_back_with_what_it_holds(own_redis):
    k1, k2 = key("forgot", 1), key("forgot", 2)
    held = {k1: "host"}
    index, publisher = publisher_over(own_redis.url)
    publisher.start(lambda: dict(held))
    try:
        publisher.on_change("stored", k1, "host")
        assert publisher.flush()
        own_redis.stop(save=False)  # killed: it comes back empty
        held[k2] = "host"
        publisher.on_change("stored", k2, "host")
        assert not publisher.flush()
        own_redis.start()
        assert publisher.flush()  # the add is refused (n1 unknown): register, announce all
        assert set(index.live_nodes()) == {"n1"}
        assert index.locate([k1, k2]) == {k1: {"n1": "host"}, k2: {"n1": "host"}}
    finally:
        publisher.stop()
        index.close()


def test_announcer_stop_without_a_start_does_nothing(redis_client, redis_url):
    """A worker whose startup failed before it announced (a port in use, Redis down)
    stops its announcer on the way out: that must neither raise nor withdraw."""
    from kvmesh.kv_store.index.services import Announcer, ServiceRegistry

    registry = ServiceRegistry(redis_url)
    try:
        other = Announcer(registry, "prefill", "10.0.0.1:1")
        other.start()
        Announcer(registry, "prefill", "10.0.0.2:2").stop()
        assert registry.members("prefill") == ["10.0.0.1:1"]
        other.stop()
        assert registry.members("prefill") == []
    finally:
        registry.close()
