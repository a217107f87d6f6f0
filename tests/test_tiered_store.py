"""The tiered store on real memory maps and real files (and a real GPU where one exists)."""

import os
import random
import threading

import pytest

from kv_store.integrity import checksum
from kv_store.tiered_store import TieredStore
from kv_store.tiers import DiskTier, GpuTier, HostTier

PAGE = 64 * 1024


def block(i: int, size: int = 8192) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


def put(store, i, size=8192, parent=None):
    data = block(i, size)
    return store.put(b"k%d" % i, data, checksum(data), parent=parent)


@pytest.fixture
def two_tier(tmp_path):
    store = TieredStore([HostTier(2 * PAGE, page_bytes=PAGE),
                         DiskTier(tmp_path / "slab", 4 * PAGE, page_bytes=PAGE)])
    yield store
    store.close()


def test_pressure_demotes_to_disk_and_hits_promote(two_tier):
    for i in range(24):  # 16 fit in host, the rest pushes the oldest to disk
        assert put(two_tier, i)
    assert two_tier.tier_of(b"k0") == "disk" and two_tier.tier_of(b"k23") == "host"
    assert two_tier.get(b"k0").data == block(0)
    assert two_tier.tier_of(b"k0") == "host"
    stats = two_tier.stats()
    host, disk = stats.tiers
    assert host.demotions >= 9 and host.promotions == 1 and disk.hits == 1
    assert stats.blocks == 24 and stats.used_bytes == 24 * 8192


def test_last_tier_evicts_and_misses_are_counted(two_tier):
    for i in range(60):  # 48 fit in both tiers together
        assert put(two_tier, i)
    stats = two_tier.stats()
    assert stats.blocks == 48 and stats.tiers[1].evictions == 12
    assert two_tier.get(b"k0") is None and two_tier.stats().misses == 1


def test_corrupt_disk_block_is_a_counted_miss(two_tier):
    for i in range(20):
        put(two_tier, i)
    assert two_tier.tier_of(b"k0") == "disk"
    disk = two_tier.tiers[1]
    entry = two_tier._entries[b"k0"]
    os.pwrite(disk._fd, b"\xff" * 64, entry.slot.offset)  # damage the bytes on disk
    assert two_tier.get(b"k0") is None
    assert two_tier.stats().corrupt == 1 and b"k0" not in two_tier.keys()


def test_direct_io_round_trip(tmp_path):
    tier = DiskTier(tmp_path / "direct", 4 * PAGE, page_bytes=PAGE, direct_io=True)
    try:
        store = TieredStore([tier])
        data = os.urandom(5000)
        assert store.put(b"d", data, checksum(data))
        assert store.get(b"d").data == data
    finally:
        tier.close()
    assert not (tmp_path / "direct").exists()


def test_parents_outlive_their_children():
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE)])  # 8 blocks of 8 KiB
    parent = None
    for i in range(8):  # one chain of 8: k0 <- k1 <- ... <- k7
        assert put(store, i, parent=parent)
        parent = b"k%d" % i
    for i in range(100, 104):  # pressure: only the chain's tail may go, child before parent
        assert put(store, i)
    keys = set(store.keys())
    assert {b"k0", b"k1", b"k2", b"k3"} <= keys
    assert not {b"k4", b"k5", b"k6", b"k7"} & keys


def test_pinned_blocks_survive_pressure_and_drop_waits_for_unpin():
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE)])
    for i in range(8):
        put(store, i)
    with store.pinned([b"k0", b"k1"]):
        for i in range(10, 20):
            put(store, i)
        assert {b"k0", b"k1"} <= set(store.keys())
        store.drop([b"k0"])
        assert b"k0" not in store.keys()
        assert store.stats().used_bytes == 8 * 8192  # k0's slot still held by the pin
    assert store.stats().used_bytes == 7 * 8192


def test_all_pinned_means_rejected_not_overfilled():
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE)])
    for i in range(8):
        put(store, i)
    with store.pinned(store.keys()):
        assert not put(store, 99)
    assert store.stats().rejected == 1 and store.stats().used_bytes == 8 * 8192


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_long_random_run_returns_to_baseline(tmp_path, policy):
    """Capacities far below the working set; puts, gets, drops, pins and cancelled reads
    from several threads. No wrong bytes ever; pinned blocks never lost; nothing leaked."""
    store = TieredStore([HostTier(2 * PAGE, page_bytes=PAGE),
                         DiskTier(tmp_path / "slab", 2 * PAGE, page_bytes=PAGE)], policy)
    versions: dict[bytes, set[bytes]] = {}  # every payload ever put under a key
    lock = threading.Lock()
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(1500):
            key = b"k%d" % rng.randrange(200)
            op = rng.random()
            if op < 0.45:
                size = rng.choice([3000, 8192, 16000])
                data = os.urandom(size)
                with lock:
                    versions.setdefault(key, set()).add(data)
                parent = b"k%d" % rng.randrange(200) if rng.random() < 0.3 else None
                store.put(key, data, checksum(data), parent=parent)
            elif op < 0.8:
                for k, b in store.get_many([key, b"k%d" % rng.randrange(200)]).items():
                    if b.data not in versions.get(k, ()):
                        errors.append(f"wrong bytes for {k!r}")
            elif op < 0.9:
                store.drop([key])
            else:  # a read that pins, then is cancelled half-way
                try:
                    with store.pinned([key]) as held:
                        for _ in range(5):
                            store.put(b"p%d" % rng.randrange(50), b"x" * 8192, checksum(b"x" * 8192))
                        if held and key not in store.keys() and held[key].dead is False:
                            errors.append(f"pinned {key!r} lost")
                        raise TimeoutError("client went away")
                except TimeoutError:
                    pass

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    stats = store.stats()
    assert stats.evictions > 0 and stats.tiers[0].demotions > 0
    store.drop()
    for tier in store.stats().tiers:
        assert tier.used_bytes == 0 and tier.held_bytes == 0 and tier.blocks == 0
    store.close()


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_tier_on_top():
    store = TieredStore([GpuTier(2 * PAGE, page_bytes=PAGE), HostTier(4 * PAGE, page_bytes=PAGE)])
    for i in range(24):
        assert put(store, i)
    assert store.tier_of(b"k23") == "gpu" and store.tier_of(b"k0") == "host"
    for i in range(24):
        assert store.get(b"k%d" % i).data == block(i)
    assert store.tier_of(b"k0") == "gpu"
    store.drop()
    assert store.stats().used_bytes == 0
    store.close()
