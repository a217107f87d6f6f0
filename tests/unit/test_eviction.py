import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.kv_store.eviction import (
    POLICIES, ARCPolicy, BlockHint, CostAwarePolicy, LRUPolicy, S3FIFOPolicy, make_policy,
)


@pytest.fixture(params=sorted(POLICIES))
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


# One operation on a policy: (kind, key, argument).
_OPS = st.lists(st.tuples(st.sampled_from(["insert", "access", "remove", "pop"]),
                          st.integers(0, 30), st.integers(0, 30)), max_size=300)


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=150, deadline=None)
@given(ops=_OPS, position=st.integers(0, 64), priority=st.floats(0, 4))
def test_any_sequence_keeps_the_contract(name, ops, position, priority):
    """Victims are tracked keys that ``can_evict`` accepts (a chain's parents and pinned
    keys never go), skipped keys stay tracked, and ``len`` counts the tracked keys."""
    policy = make_policy(name)
    tracked: set[bytes] = set()
    pinned = {bytes([k]) for k in range(0, 31, 7)}
    for kind, k, arg in ops:
        key = bytes([k])
        if kind == "insert":
            policy.insert(key, BlockHint(position + arg, priority, bytes([k - 1]) if k else None))
            tracked.add(key)
        elif kind == "access":
            policy.access(key)
        elif kind == "remove":
            policy.remove(key)
            tracked.discard(key)
        else:
            # a chain 0 <- 1 <- ... : a key is a parent while the next key is tracked
            def can_evict(c: bytes) -> bool:
                return c not in pinned and bytes([c[0] + 1]) not in tracked
            before = set(tracked)
            victim = policy.pop_victim(can_evict)
            if victim is None:
                assert not any(can_evict(c) for c in before)
            else:
                assert victim in before and can_evict(victim)
                tracked.discard(victim)
        assert len(policy) == len(tracked)
    while (victim := policy.pop_victim(lambda c: True)) is not None:  # everything left, once
        assert victim in tracked
        tracked.discard(victim)
    assert not tracked and len(policy) == 0


def test_arc_keeps_a_reused_set_through_a_scan():
    p = ARCPolicy()
    hot = [b"hot%d" % i for i in range(10)]
    for k in hot:
        p.insert(k)
        p.access(k)  # seen twice: in the frequency list
    evicted = []
    for i in range(200):
        p.insert(b"scan%d" % i)
        if len(p) > 20:
            evicted.append(p.pop_victim(lambda k: True))
    assert not set(hot) & set(evicted)


def test_arc_ghost_hit_in_recency_list_raises_its_target():
    p = ARCPolicy()
    for i in range(4):
        p.insert(b"%d" % i)
    assert p.pop_victim(lambda k: True) == b"0"  # oldest of T1, remembered as a ghost
    assert p.p == 0
    p.insert(b"0")  # it came back: T1 was too short
    assert p.p > 0
    p.access(b"1")  # 1 moves to T2; T1 = {2, 3}; T2 = {0, 1}
    assert p.pop_victim(lambda k: True) == b"2"  # T1 longer than p (1): from T1


def test_cost_aware_keeps_deep_and_prioritised_blocks():
    p = CostAwarePolicy()
    p.insert(b"shallow", BlockHint(position=0))
    p.insert(b"deep", BlockHint(position=40))
    p.insert(b"session", BlockHint(position=0, priority=2.0))
    assert p.pop_victim(lambda k: True) == b"shallow"
    assert p.pop_victim(lambda k: True) == b"session"  # 1 x 3 < 1 + 40/8
    assert p.pop_victim(lambda k: True) == b"deep"


def test_cost_aware_reuse_outweighs_position_and_ages():
    p = CostAwarePolicy()
    p.insert(b"hit", BlockHint(position=0))
    for _ in range(10):
        p.access(b"hit")  # value 11
    p.insert(b"deep", BlockHint(position=8))  # value 2
    assert p.pop_victim(lambda k: True) == b"deep"
    # the clock is now 2: new blocks (value clock + 1) go before "hit" (11) until the
    # clock, lifted by each victim, passes it: ageing lets an old favourite go
    victims = []
    for i in range(20):
        p.insert(b"new%d" % i, BlockHint(position=0))
        victims.append(p.pop_victim(lambda k: True))
    assert victims[:8] == [b"new%d" % i for i in range(8)]
    assert victims[8] == b"hit"  # new8's value ties with it (11): the older goes


def test_cost_aware_remembers_the_reuse_of_a_key_that_comes_back():
    p = CostAwarePolicy()
    p.insert(b"a")
    for _ in range(5):
        p.access(b"a")
    p.insert(b"b")
    assert p.pop_victim(lambda k: k == b"a") == b"a"  # evicted with 6 uses
    p.insert(b"a")  # back: it starts from 6 + 1, above a new key
    p.insert(b"c")
    assert p.pop_victim(lambda k: True) in (b"b", b"c")
    assert p.pop_victim(lambda k: True) in (b"b", b"c")
    assert p.pop_victim(lambda k: True) == b"a"


def test_cost_aware_takes_a_chain_from_its_tail_without_walking_its_parents():
    """Deeper blocks cost more to recompute, but a block is worth no more than its
    parent: the store refuses parents, so a chain must go tail first, and each eviction
    asks about one key, not about every parent of every chain."""
    p = CostAwarePolicy()
    tracked = set()
    for chain in range(20):
        parent = None
        for pos in range(30):
            key = b"%d-%d" % (chain, pos)
            p.insert(key, BlockHint(pos, 0.0, parent))
            tracked.add(key)
            parent = key
    asked = []

    def leaf_only(key):  # what the store allows: no key whose child is still held
        asked.append(key)
        chain, pos = key.split(b"-")
        return b"%s-%d" % (chain, int(pos) + 1) not in tracked

    for _ in range(100):
        victim = p.pop_victim(leaf_only)
        assert leaf_only(victim)
        tracked.discard(victim)
    assert len(asked) <= 2 * 100  # one refusal at most per eviction, plus the checks above
