import random

import pytest

from kv_store.block_store import HostLRUStore


def test_capacity_is_never_exceeded_and_lru_goes_first():
    store = HostLRUStore(capacity_bytes=300)
    for i in range(3):
        assert store.put(bytes([i]), b"x" * 100, i)
    assert store.get(b"\x00") is not None  # 0 is now the most recently used
    assert store.put(b"\x03", b"y" * 100, 3)
    assert store.get(b"\x01") is None  # the least recently used was evicted
    assert store.get(b"\x00").data == b"x" * 100
    stats = store.stats()
    assert stats.used_bytes == 300 and stats.blocks == 3 and stats.evictions == 1


def test_oversized_block_is_rejected_and_replace_keeps_accounting():
    store = HostLRUStore(capacity_bytes=100)
    assert not store.put(b"big", b"z" * 101, 0)
    assert store.put(b"k", b"a" * 60, 1)
    assert store.put(b"k", b"b" * 40, 2)
    assert store.stats().used_bytes == 40 and store.stats().rejected == 1
    assert store.get(b"k").checksum == 2


def test_lookup_counts_leading_complete_groups():
    store = HostLRUStore(capacity_bytes=1000)
    for key in (b"a0", b"a1", b"b0", b"c0", b"c1"):
        store.put(key, b".", 0)
    assert store.lookup([[b"a0", b"a1"], [b"b0", b"b1"], [b"c0", b"c1"]]) == 1
    assert store.lookup([[b"a0"], [b"c0", b"c1"]]) == 2
    assert store.lookup([]) == 0


def test_random_workload_keeps_bytes_and_accounting_exact():
    rng = random.Random(0)
    store = HostLRUStore(capacity_bytes=4096)
    truth: dict[bytes, bytes] = {}
    for _ in range(5000):
        key = bytes([rng.randrange(64)])
        op = rng.random()
        if op < 0.5:
            data = bytes([rng.randrange(256)]) * rng.randrange(1, 300)
            store.put(key, data, len(data))
            truth[key] = data
        elif op < 0.9:
            block = store.get(key)
            if block is not None:
                assert block.data == truth[key]
        else:
            store.drop([key])
    used = sum(len(store.get(k).data) for k in store.keys())
    assert used == store.stats().used_bytes <= 4096
    store.drop()
    assert store.stats().used_bytes == 0 and store.keys() == []


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        HostLRUStore(capacity_bytes=0)
