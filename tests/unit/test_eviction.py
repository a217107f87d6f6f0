import random

import pytest

from kvmesh.kv_store.eviction import LRUPolicy, S3FIFOPolicy, make_policy


@pytest.fixture(params=["lru", "s3fifo"])
def policy(request):
    return make_policy(request.param)


def test_victims_are_tracked_keys_and_leave_tracking(policy):
    for i in range(10):
        policy.insert(bytes([i]))
    seen = set()
    while (v := policy.pop_victim(lambda k: True)) is not None:
        assert v not in seen
        seen.add(v)
    assert seen == {bytes([i]) for i in range(10)} and len(policy) == 0


def test_can_evict_is_respected_and_skipped_keys_stay(policy):
    for i in range(5):
        policy.insert(bytes([i]))
    assert policy.pop_victim(lambda k: False) is None
    assert len(policy) == 5
    assert policy.pop_victim(lambda k: k == b"\x03") == b"\x03"
    assert len(policy) == 4


def test_remove_is_idempotent(policy):
    policy.insert(b"a")
    policy.remove(b"a")
    policy.remove(b"a")
    policy.remove(b"never")
    assert len(policy) == 0 and policy.pop_victim(lambda k: True) is None


def test_lru_order():
    p = LRUPolicy()
    for k in (b"a", b"b", b"c"):
        p.insert(k)
    p.access(b"a")
    assert [p.pop_victim(lambda k: True) for _ in range(3)] == [b"b", b"c", b"a"]


def test_s3fifo_keeps_reused_keys_through_a_scan():
    p = S3FIFOPolicy()
    hot = [b"hot%d" % i for i in range(10)]
    for k in hot:
        p.insert(k)
        p.access(k)
    evicted = []
    for i in range(200):  # a scan of one-hit keys, with a capacity of ~20 keys
        p.insert(b"scan%d" % i)
        if len(p) > 20:
            evicted.append(p.pop_victim(lambda k: True))
    assert not set(hot) & set(evicted)

    lru = LRUPolicy()
    for k in hot:
        lru.insert(k)
    lru_evicted = []
    for i in range(200):
        lru.insert(b"scan%d" % i)
        if len(lru) > 20:
            lru_evicted.append(lru.pop_victim(lambda k: True))
    assert set(hot) <= set(lru_evicted)  # the contrast: LRU flushes them


def test_random_operations_keep_policy_consistent(policy):
    rng = random.Random(3)
    tracked = set()
    for _ in range(3000):
        k = bytes([rng.randrange(50)])
        r = rng.random()
        if r < 0.4:
            policy.insert(k)
            tracked.add(k)
        elif r < 0.6:
            policy.access(k)
        elif r < 0.75:
            policy.remove(k)
            tracked.discard(k)
        else:
            banned = bytes([rng.randrange(50)])
            v = policy.pop_victim(lambda key: key != banned)
            if v is not None:
                assert v in tracked and v != banned
                tracked.discard(v)
        assert len(policy) == len(tracked)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="lru"):
        make_policy("fifo9000")
