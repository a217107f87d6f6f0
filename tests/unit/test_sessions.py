"""Sessions in the tiered store, on real memory maps and real files: an idle session's
blocks move down to disk instead of being evicted while one-off blocks come and go; an
active session's stay in host RAM; a released or forgotten session's blocks are
ordinary again. The clock is the test's own, so TTLs pass without sleeping."""

import pytest

from kvmesh.kv_store.integrity import checksum
from kvmesh.kv_store.sessions import ACTIVE, IDLE, Sessions, session_id
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.tiers import DiskTier, HostTier
from tests.unit.test_tiered_store import PAGE, block

TTL = 10.0


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def make_store(tmp_path, clock, max_sessions=8):
    """16 blocks fit in host RAM, 32 on disk (8 KiB blocks)."""
    sessions = Sessions(TTL, max_sessions, priority=1.0, clock=clock)
    return TieredStore([HostTier(2 * PAGE, page_bytes=PAGE),
                        DiskTier(tmp_path / "slab", 4 * PAGE, page_bytes=PAGE)], sessions=sessions)


@pytest.fixture
def store(tmp_path, clock):
    s = make_store(tmp_path, clock)
    yield s
    s.close()


def put(store, name: str, i: int, session=None) -> None:
    data = block(i)
    assert store.put(name.encode(), data, checksum(data), session=session)


def one_offs(store, start: int, count: int) -> None:
    for i in range(start, start + count):
        put(store, f"one-off{i}", i)


def test_idle_session_moves_to_disk_and_outlives_one_off_traffic(store, clock):
    for i in range(4):
        put(store, f"s{i}", i, session="chat")
        put(store, f"plain{i}", 100 + i)  # the same blocks without a session
    clock.now += TTL + 1  # the session goes idle
    one_offs(store, 1000, 80)  # far more than both tiers hold
    for i in range(4):
        assert store.tier_of(f"s{i}".encode()) == "disk"  # moved down, kept
        assert store.tier_of(f"plain{i}".encode()) is None  # evicted
    disk_hits = store.stats().tiers[1].hits
    assert store.lookup([[b"s0", b"s1", b"s2", b"s3"]], session="chat") == 1
    got = store.get_many([f"s{i}".encode() for i in range(4)])
    assert [got[f"s{i}".encode()].data for i in range(4)] == [block(i) for i in range(4)]
    assert store.stats().tiers[1].hits == disk_hits + 4  # resumed from disk


def test_active_session_stays_in_host_while_one_offs_pass(store, clock):
    for i in range(4):
        put(store, f"s{i}", i, session="chat")
    for start in range(1000, 1040, 10):
        clock.now += TTL / 4
        store.lookup([[b"s0", b"s1", b"s2", b"s3"]], session="chat")  # used: stays active
        one_offs(store, start, 10)
    assert all(store.tier_of(f"s{i}".encode()) == "host" for i in range(4))
    [occupancy] = store.session_occupancy("chat")
    assert occupancy.state == ACTIVE and occupancy.blocks == {"host": 4}


def test_idle_sessions_go_down_first(store, clock):
    put(store, "old", 1, session="idle-one")
    clock.now += TTL + 1
    for i in range(15):  # host RAM is full; the idle session's block is the newest but goes
        put(store, f"fill{i}", 10 + i)
    put(store, "next", 99)
    assert store.tier_of(b"old") == "disk" and store.tier_of(b"fill0") == "host"
    assert store.session_occupancy("idle-one")[0].state == IDLE
    assert store.sessions_resident() == {"host": 0, "disk": 1}


def test_released_session_is_evicted_like_any_block(store, clock):
    for i in range(4):
        put(store, f"s{i}", i, session="chat")
    assert store.release_session("chat") == 4
    assert store.release_session("chat") == -1  # unknown now
    one_offs(store, 1000, 80)
    assert all(store.tier_of(f"s{i}".encode()) is None for i in range(4))
    assert store.session_occupancy() == [] and store.sessions_resident() == {"host": 0, "disk": 0}


def test_sessions_never_make_a_put_fail(store, clock):
    for i in range(48):  # both tiers full of one session's blocks
        put(store, f"s{i}", i, session="big")
    one_offs(store, 1000, 10)  # each one stored (``put`` asserts it): session blocks go
    assert store.tier_of(b"one-off1009") == "host"
    held = sum(store.session_occupancy("big")[0].blocks.values())
    assert 48 - 10 <= held < 48 and store.stats().blocks == 48


def test_past_max_sessions_the_least_recently_used_is_forgotten(tmp_path, clock):
    store = make_store(tmp_path, clock, max_sessions=2)
    try:
        for n, name in enumerate(("a", "b", "c")):
            clock.now += 1
            put(store, name, n, session=name)
        assert [o.session for o in store.session_occupancy()] in (["b", "c"], ["c", "b"])
        assert store._sessions.forgotten == 1
    finally:
        store.close()


def test_dropped_blocks_leave_their_sessions(store):
    put(store, "s0", 0, session="chat")
    put(store, "s1", 1, session="chat")
    store.drop([b"s0"])
    assert store.session_occupancy("chat")[0].blocks == {"host": 1}
    assert store.session_occupancy(limit=1)[0].session == "chat"


def test_sessions_resident_per_tier_are_metrics(store, clock):
    from prometheus_client import CollectorRegistry

    from kvmesh.kv_store.store_metrics import StoreCollector
    from tests.unit.test_store_metrics import scrape

    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    put(store, "a0", 0, session="a")
    clock.now += TTL + 1
    put(store, "b0", 1, session="b")
    one_offs(store, 1000, 15)  # host RAM full: the idle session "a" goes down first
    m = scrape(registry)
    assert m[("kvmesh_store_sessions_resident", (("tier", "disk"),))] == 1
    assert m[("kvmesh_store_sessions_resident", (("tier", "host"),))] == 1
    assert m[("kvmesh_store_sessions", ())] == 2
    assert [t.sessions for t in store.stats().tiers] == [1, 1]


def test_session_ids_are_scoped_by_tenant():
    assert session_id("chat", "tenant-a") == session_id("chat", "tenant-a")
    assert session_id("chat", "tenant-a") != session_id("chat", "tenant-b")
    assert session_id("chat") != session_id("chat", "tenant-a")
    assert "chat" not in session_id("chat") and len(session_id("chat")) == 32


def test_any_idle_looks_only_at_idle_sessions(clock):
    sessions = Sessions(TTL, 8, clock=clock)
    sessions.touch("empty")  # idle soon, but holds nothing
    clock.now += TTL + 1
    sessions.touch("busy", [b"k1"])
    assert not sessions.any_idle()
    clock.now += TTL + 1
    assert sessions.any_idle()
    sessions.touch("busy")
    assert not sessions.any_idle()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Sessions(0, 4)
    with pytest.raises(ValueError):
        Sessions(1.0, 0)


def test_the_session_id_travels_with_the_blocks_a_worker_saves():
    """From vLLM's request (``kv_transfer_params``, set by the worker) to each block the
    save side puts: ``session_of``, and ``skip_null_blocks`` keeping the session."""
    from types import SimpleNamespace

    from kvmesh.engine_host.metadata import SESSION_PARAM, BlockTransfer, session_of, skip_null_blocks

    assert session_of(SimpleNamespace(kv_transfer_params={SESSION_PARAM: "abc"})) == "abc"
    assert session_of(SimpleNamespace(kv_transfer_params=None)) is None
    assert session_of(SimpleNamespace()) is None
    kept = skip_null_blocks(BlockTransfer("r", [0, 5, 6], [b"h0", b"h1", b"h2"], None, session="abc"))
    assert (kept.block_ids, kept.parent, kept.session) == ([5, 6], b"h0", "abc")
