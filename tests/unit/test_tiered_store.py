"""The tiered store on real memory maps and real files (and a real GPU where one exists)."""

import errno
import os
import random
import threading
import time

import pytest

from kvmesh.kv_store.encoding import make_encoding
from kvmesh.kv_store.eviction import POLICIES
from kvmesh.kv_store.integrity import checksum
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.slab import adjacent_runs
from kvmesh.kv_store.tiers import DiskTier, GpuTier, HostTier
from tests.waiting import wait_until

PAGE = 64 * 1024


def block(i: int, size: int = 8192) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


def put(store, i, size=8192, parent=None):
    data = block(i, size)
    return store.put(b"k%d" % i, data, checksum(data), parent=parent)


def run_threads(worker, seeds) -> None:
    threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def assert_empty_after_drop(store) -> None:
    """Nothing leaked: once every block is dropped, every tier is back at zero."""
    store.drop()
    for tier in store.stats().tiers:
        assert tier.used_bytes == 0 and tier.held_bytes == 0 and tier.blocks == 0


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
    assert two_tier.holdings() == {k: two_tier.tier_of(k) for k in two_tier.keys()}
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


def test_disk_tier_reserves_its_capacity_up_front(tmp_path):
    tier = DiskTier(tmp_path / "slab", 4 * PAGE, page_bytes=PAGE)
    try:  # blocks held on the file system, not a sparse file that may fill up later
        assert os.stat(tmp_path / "slab").st_blocks * 512 >= 4 * PAGE
    finally:
        tier.close()


def test_disk_tier_larger_than_the_disk_fails_to_open_and_leaves_no_file(tmp_path):
    with pytest.raises(OSError, match="cannot reserve"):
        DiskTier(tmp_path / "huge", 1 << 50, page_bytes=1 << 40)  # 1 PiB: no disk here holds it
    assert list(tmp_path.iterdir()) == []


def test_stores_sharing_a_disk_directory_keep_apart_and_clean_up_after_dead_ones(tmp_path):
    """Two stores in one directory (containers of one host share a path and a pid) get
    files of their own; a slab file left by a store that died is removed when the next
    store opens there, a live store's file never."""
    from kvmesh.kv_store.tiered_store import SLAB_PREFIX, build_store

    orphan = tmp_path / f"{SLAB_PREFIX}1-dead.bin"
    orphan.write_bytes(b"\0" * 4096)  # just written: a store killed mid-write, restarted at once
    first = build_store(0, 4 * PAGE, str(tmp_path), page_bytes=PAGE)
    try:
        assert not orphan.exists()
        second = build_store(0, 4 * PAGE, str(tmp_path), page_bytes=PAGE)
        try:
            assert first.tiers[0].path != second.tiers[0].path
            assert os.path.exists(first.tiers[0].path)  # alive: kept
            assert put(first, 1) and put(second, 2)
            assert first.get_many([b"k1"]) and second.get_many([b"k2"])
        finally:
            second.close()
    finally:
        first.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_parents_outlive_their_children(policy):
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE)], policy)  # 8 blocks of 8 KiB
    parent = None
    for i in range(8):  # one chain of 8: k0 <- k1 <- ... <- k7
        assert put(store, i, parent=parent)
        parent = b"k%d" % i
    for i in range(100, 104):  # pressure: only the chain's tail may go, child before parent
        assert put(store, i)
    keys = set(store.keys())
    held = [i for i in range(8) if b"k%d" % i in keys]
    assert held == list(range(len(held)))  # what is left of the chain is a prefix of it
    assert len(keys) == 8 and store.stats().evictions == 4
    if policy == "lru":
        assert held == [0, 1, 2, 3]


def test_making_room_for_a_child_never_evicts_its_parent():
    """The parent is the oldest block when its child comes: the room is made elsewhere."""
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE)])  # 8 blocks of 8 KiB
    try:
        for i in range(8):  # k0 first: the least recently used
            assert put(store, i)
        assert put(store, 100, parent=b"k0")
        assert store.tier_of(b"k0") == "host" and store.tier_of(b"k100") == "host"
        assert store.tier_of(b"k1") is None  # the next oldest went instead
        assert not put(store, 101, size=2 * PAGE, parent=b"k2")  # too big: rejected ...
        for i in range(102, 108):  # ... and then k2 is no parent: it may go again
            assert put(store, i)
        assert store.tier_of(b"k2") is None
    finally:
        store.close()


def test_a_put_evicts_what_may_go_when_the_victims_below_are_all_parents(tmp_path):
    """Disk full of a chain's prefix (parents: none may go), host holding its tail and a
    leaf: a victim in host RAM can neither move down nor go, so a block that may go is
    evicted instead; puts are not refused while one is left."""
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE),
                         DiskTier(tmp_path / "slab", PAGE, page_bytes=PAGE)])  # 8 + 8 blocks
    try:
        parent = None
        for i in range(15):  # k0 <- ... <- k14: k0..k6 and k7 end on disk
            assert put(store, i, parent=parent)
            parent = b"k%d" % i
        assert put(store, 99)
        assert all(store.tier_of(b"k%d" % i) == "disk" for i in range(8))
        assert [put(store, i) for i in range(200, 204)] == [True] * 4
        assert store.stats().rejected == 0
        assert all(store.tier_of(b"k%d" % i) is not None for i in range(8, 11))  # parents stay
        assert all(store.get(b"k%d" % i).data == block(i) for i in range(8))
    finally:
        store.close()


def test_expired_leases_give_their_room_to_a_put():
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE)])
    try:
        for i in range(8):
            assert put(store, i)
        lease, where = store.lease([b"k%d" % i for i in range(8)], seconds=0.05)
        assert len(where) == 8 and not put(store, 100)  # all leased: no room
        time.sleep(0.1)  # the reader died: nobody releases it, nobody takes another lease
        assert put(store, 101)
        assert store.leases == 0 and not store.release(lease)
    finally:
        store.close()


def test_a_listener_that_raises_stops_no_bookkeeping_halfway(tmp_path):
    def broken(kind, key, tier):
        raise RuntimeError("index publisher down")

    store = TieredStore([HostTier(PAGE, page_bytes=PAGE), DiskTier(tmp_path / "slab", 4 * PAGE, page_bytes=PAGE)],
                        listener=broken)
    try:
        for i in range(16):  # 8 of them move down to disk, each move telling the listener
            assert put(store, i)
        assert store.stats().tiers[0].demotions == 8
        assert all(store.get(b"k%d" % i).data == block(i) for i in range(16))
        assert_empty_after_drop(store)
    finally:
        store.close()


def test_a_key_asked_for_twice_counts_once():
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE)])
    try:
        assert put(store, 1)
        assert len(store.get_many([b"k1", b"k1", b"k2", b"k2"])) == 1
        lease, where = store.lease([b"k1", b"k1", b"k3", b"k3"], seconds=5)
        assert list(where) == [b"k1"] and store.release(lease)
        assert store.stats().misses == 2  # k2 once, k3 once
    finally:
        store.close()


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


def free_share(store, tier: int) -> float:
    a = store.tiers[tier].allocator
    return 1 - a.slot_bytes / a.capacity_bytes


def test_the_demoter_keeps_room_free_ahead_of_puts(tmp_path):
    """With ``demote_ahead``, a thread moves host victims to disk until a quarter of host
    RAM is free again; without it, a full host tier stays full until a put needs room."""
    for share in (0.0, 0.25):
        store = TieredStore([HostTier(2 * PAGE, page_bytes=PAGE),
                             DiskTier(tmp_path / f"slab-{share}", 8 * PAGE, page_bytes=PAGE)],
                            demote_ahead=share)
        try:
            for i in range(16):  # exactly fills host RAM (16 blocks of 8 KiB)
                assert put(store, i)
            if share:
                assert wait_until(lambda: free_share(store, 0) >= share)
                assert store.stats().tiers[0].demotions == store.stats().tiers[0].demotions_ahead == 4  # no more
                assert all(store.tier_of(b"k%d" % i) == "disk" for i in range(4))  # the LRU ones
            else:
                time.sleep(0.3)
                assert free_share(store, 0) == 0 and store.stats().tiers[0].demotions == 0
            assert all(store.get(b"k%d" % i).data == block(i) for i in range(16))
            assert store.stats().evictions == 0
        finally:
            store.close()
        assert store._demoter is None or not store._demoter.is_alive()


def test_the_demoter_never_drops_a_block_it_cannot_move(tmp_path):
    """Disk full of pinned blocks: the demoter's victims stay in host RAM (a put that
    needs room may still evict; the demoter only moves)."""
    store = TieredStore([HostTier(4 * 8192, page_bytes=4 * 8192),
                         DiskTier(tmp_path / "slab", 2 * 8192, page_bytes=2 * 8192)], demote_ahead=0.5)
    try:
        for i in range(3):
            assert put(store, i)
        assert wait_until(lambda: store.tier_of(b"k0") == "disk")
        assert put(store, 3)
        assert wait_until(lambda: store.tier_of(b"k1") == "disk")  # the disk is full now
        with store.pinned([b"k0", b"k1"]):
            assert put(store, 4)  # host short of room again; nothing below may go
            time.sleep(0.5)
            assert [store.tier_of(b"k%d" % i) for i in range(5)] == ["disk"] * 2 + ["host"] * 3
        assert store.stats().evictions == 0
        assert all(store.get(b"k%d" % i).data == block(i) for i in range(5))
    finally:
        store.close()


def test_demote_ahead_outside_zero_to_one_is_refused():
    for share in (-0.1, 1.0):
        with pytest.raises(ValueError, match="demote_ahead"):
            TieredStore([HostTier(PAGE, page_bytes=PAGE)], demote_ahead=share)


@pytest.mark.parametrize("policy, write_behind, demote_ahead, encoding",
                         [("lru", 0, 0.0, "none"), ("s3fifo", 0, 0.0, "none"), ("lru", PAGE, 0.0, "none"),
                          ("s3fifo", 0, 0.5, "none"), ("arc", 0, 0.0, "none"), ("cost", 0, 0.5, "none"),
                          ("lru", 0, 0.5, "zstd"), ("arc", 0, 0.0, "lz4")])
def test_long_random_run_returns_to_baseline(tmp_path, policy, write_behind, demote_ahead, encoding):
    """Capacities far below the working set; puts, gets, drops, pins and cancelled reads
    from several threads. No wrong bytes ever; pinned blocks never lost; nothing leaked.
    With write-behind (O_DIRECT), a small staging area: writes also wait for room. With
    ``demote_ahead``, the demoter moves blocks down meanwhile."""
    store = TieredStore([HostTier(2 * PAGE, page_bytes=PAGE),
                         DiskTier(tmp_path / "slab", 2 * PAGE, page_bytes=PAGE, direct_io=bool(write_behind),
                                  write_behind_bytes=write_behind, encoding=make_encoding(encoding))],
                         policy, demote_ahead=demote_ahead)
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

    run_threads(worker, seeds=range(3))
    assert not errors, errors[:5]
    stats = store.stats()
    assert stats.evictions > 0 and stats.tiers[0].demotions > 0
    assert (stats.tiers[0].demotions_ahead > 0) == bool(demote_ahead)
    assert store.flush()
    if write_behind:
        behind = store.tiers[1]._behind
        assert behind.staged_bytes == 0 and behind.requests > 0 and behind.failed_writes == 0
    store.drop()  # the demoter may be finishing a move: its slots go when it ends
    assert wait_until(lambda: all(t.used_bytes == 0 for t in store.stats().tiers))
    assert_empty_after_drop(store)
    store.close()


def test_promotion_verifies_disk_bytes(two_tier):
    """A lease promotes a disk block into the host arena for a zero-copy read: damaged
    bytes are caught on the way up (counted, dropped), never handed out."""
    for i in range(20):
        put(two_tier, i)
    entry = two_tier._entries[b"k0"]
    assert two_tier.tier_of(b"k0") == "disk"
    os.pwrite(two_tier.tiers[1]._fd, b"\xff" * 64, entry.slot.offset)
    lease, where = two_tier.lease([b"k0", b"k1"], seconds=5)
    assert b"k0" not in where and b"k1" in where  # k1 was on disk too, intact
    assert two_tier.tier_of(b"k1") == "host" and b"k0" not in two_tier.keys()
    stats = two_tier.stats()
    assert stats.corrupt == 1 and stats.misses == 1
    offset, size, crc = where[b"k1"]
    assert two_tier.tiers[0].view(two_tier._entries[b"k1"].slot, size).tobytes() == block(1)
    assert two_tier.release(lease)


def test_unreadable_disk_is_a_counted_miss(two_tier):
    """The slab file cut short under the store (a failing disk): reads of what was there
    fail, which counts as corrupt and serves nothing; the store keeps working."""
    for i in range(20):
        put(two_tier, i)
    on_disk = [k for k in two_tier.keys() if two_tier.tier_of(k) == "disk"]
    os.ftruncate(two_tier.tiers[1]._fd, 0)
    assert two_tier.get_many(on_disk) == {}
    assert two_tier.stats().corrupt == len(on_disk) and not set(on_disk) & set(two_tier.keys())
    assert put(two_tier, 99) and two_tier.get(b"k99").data == block(99)


@pytest.mark.parametrize("direct_io", [False, True])
def test_disk_reads_a_run_of_adjacent_slots_in_one_request(tmp_path, direct_io):
    tier = DiskTier(tmp_path / "runs", 4 * PAGE, page_bytes=PAGE, direct_io=direct_io)
    try:
        sizes = [8192, 5000, 8192, 3000]  # slots of 8, 8, 8 and 4 KiB, one after another
        slots = [tier.allocator.alloc(n) for n in sizes]
        slots.sort(key=lambda s: s.offset)
        for i, (slot, n) in enumerate(zip(slots, sizes)):
            tier.write(slot, block(i, n))
        items = list(zip(slots, sizes))
        runs = adjacent_runs(slots, PAGE)
        for run in runs:
            got = tier.read_run([items[i] for i in run])
            assert got == [block(i, sizes[i]) for i in run]
        host = HostTier(2 * PAGE, page_bytes=PAGE)  # whole host slots: read straight into them
        dests = [host.allocator.alloc(n) for n in sizes]
        for run in runs:
            tier.read_run_into([(slots[i], sizes[i], host.view(dests[i], dests[i].size)) for i in run])
        assert [host.read(d, n) for d, n in zip(dests, sizes)] == [block(i, n) for i, n in enumerate(sizes)]
        small = [bytearray(n) for n in sizes]  # smaller than their slots: one at a time
        tier.read_run_into([(s, n, memoryview(b)) for s, n, b in zip(slots, sizes, small)])
        assert [bytes(b) for b in small] == [block(i, n) for i, n in enumerate(sizes)]
        host.close()
    finally:
        tier.close()


@pytest.mark.parametrize("direct_io", [False, True])
def test_disk_writes_whole_host_slots_straight_from_the_arena(tmp_path, direct_io):
    """A demotion's write: the host slot, padding and all, goes to disk without the disk
    tier's bounce buffer; a source shorter than its slot (or unaligned) goes through it."""
    tier = DiskTier(tmp_path / "slab", 2 * PAGE, page_bytes=PAGE, direct_io=direct_io)
    host = HostTier(PAGE, page_bytes=PAGE)
    try:
        data = block(7, 5000)  # an 8 KiB slot
        src, dst = host.allocator.alloc(len(data)), tier.allocator.alloc(len(data))
        host.write(src, data)
        with host.view(src, src.size) as whole:
            tier.write_from(dst, len(data), whole)
        assert getattr(tier._local, "buf", None) is None  # no bounce buffer was needed
        assert tier.read(dst, len(data)) == data and tier.io.write_bytes == len(data)
        other = tier.allocator.alloc(len(data))
        unaligned = memoryview(bytes(1) + data)[1:]  # shorter than the slot
        tier.write_from(other, len(data), unaligned)
        assert tier.read(other, len(data)) == data
    finally:
        host.close()
        tier.close()
    disk = DiskTier(tmp_path / "store", 4 * PAGE, page_bytes=PAGE, direct_io=direct_io)
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE), disk], io_threads=1)  # demotions on this thread
    for i in range(24):
        assert put(store, i)
    assert store.stats().tiers[0].demotions == 16 and getattr(disk._local, "buf", None) is None
    assert all(store.get(b"k%d" % i).data == block(i) for i in range(24))
    store.close()


class CountedWrites:
    """Records the number of buffers of each gathered write the disk tier makes."""

    def __init__(self, monkeypatch):
        import kvmesh.kv_store.tiers as kv_store_tiers
        self.buffers: list[int] = []
        real = os.pwritev

        def pwritev(fd, buffers, offset):
            self.buffers.append(len(buffers))
            return real(fd, buffers, offset)

        monkeypatch.setattr(kv_store_tiers.os, "pwritev", pwritev)


@pytest.mark.parametrize("direct_io", [False, True])
def test_disk_writes_a_run_of_whole_host_slots_in_one_request(tmp_path, direct_io, monkeypatch):
    counted = CountedWrites(monkeypatch)
    tier = DiskTier(tmp_path / "slab", 2 * PAGE, page_bytes=PAGE, direct_io=direct_io)
    host = HostTier(PAGE, page_bytes=PAGE)
    try:
        sizes = [8192, 5000, 8000]  # three 8 KiB slots, one after another on both sides
        srcs = [host.allocator.alloc(n) for n in sizes]
        dsts = [tier.allocator.alloc(n) for n in sizes]
        for i, (src, n) in enumerate(zip(srcs, sizes)):
            host.write(src, block(i, n))
        views = [host.view(s, s.size) for s in srcs]
        tier.write_run_from([(d, n, v) for d, n, v in zip(dsts, sizes, views)])
        assert counted.buffers == [3] and tier.io.write_bytes == sum(sizes)
        assert [tier.read(d, n) for d, n in zip(dsts, sizes)] == [block(i, n) for i, n in enumerate(sizes)]
        short = [memoryview(block(9 + i, n)) for i, n in enumerate(sizes)]  # shorter than their slots
        tier.write_run_from([(d, n, v) for d, n, v in zip(dsts, sizes, short)])
        assert counted.buffers == [3]  # one at a time, through the usual path
        assert [tier.read(d, n) for d, n in zip(dsts, sizes)] == [block(9 + i, n) for i, n in enumerate(sizes)]
        for view in views:
            view.release()
    finally:
        host.close()
        tier.close()


def test_the_demoter_writes_adjacent_victims_to_disk_in_one_request(tmp_path, monkeypatch):
    counted = CountedWrites(monkeypatch)
    store = TieredStore([HostTier(2 * PAGE, page_bytes=PAGE),
                         DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE)])
    try:
        for i in range(16):  # fills host RAM; then the demoter frees half, eight blocks at once
            assert put(store, i)
        store.demote_ahead = 0.5
        assert wait_until(lambda: store.stats().tiers[0].demotions_ahead == 8)
        assert counted.buffers == [8]
        assert all(store.get(b"k%d" % i).data == block(i) for i in range(16))
    finally:
        store.close()


def test_a_failed_run_write_leaves_the_demoters_victims_in_host_ram(tmp_path, monkeypatch):
    import kvmesh.kv_store.tiers as kv_store_tiers
    def failing(fd, buffers, offset):
        raise OSError(errno.EIO, "injected write failure")

    monkeypatch.setattr(kv_store_tiers.os, "pwritev", failing)
    store = TieredStore([HostTier(2 * PAGE, page_bytes=PAGE),
                         DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE)])
    try:
        for i in range(16):
            assert put(store, i)
        store.demote_ahead = 0.5
        time.sleep(0.3)
        stats = store.stats()
        assert stats.tiers[0].demotions == 0 and stats.evictions == 0 and stats.tiers[1].used_bytes == 0
        assert all(store.tier_of(b"k%d" % i) == "host" for i in range(16))
        assert all(store.get(b"k%d" % i).data == block(i) for i in range(16))
    finally:
        store.close()


def test_the_demoter_backs_off_from_a_disk_that_fails_and_resumes_once_it_heals(tmp_path, monkeypatch):
    """A disk that fails every write: however many puts wake the demoter meanwhile, it
    tries again only after resting 1 s, then 2 s, ... (the puts themselves evict what
    they cannot move); once the disk writes again, so does the demoter."""
    import kvmesh.kv_store.tiers as kv_store_tiers
    healed = threading.Event()
    demoter_writes: list[float] = []  # when the demoter's thread tried the disk

    def failing(real):
        def write(fd, data, offset):
            if healed.is_set():
                return real(fd, data, offset)
            if threading.current_thread().name == "kvmesh-demoter":
                demoter_writes.append(time.monotonic())
            raise OSError(errno.EIO, "injected write failure")
        return write

    def tries() -> list[list[float]]:  # writes less than 0.1 s apart belong to one try
        out: list[list[float]] = []
        for t in list(demoter_writes):
            if out and t - out[-1][-1] < 0.1:
                out[-1].append(t)
            else:
                out.append([t])
        return out

    monkeypatch.setattr(kv_store_tiers.os, "pwritev", failing(os.pwritev))
    monkeypatch.setattr(kv_store_tiers.os, "pwrite", failing(os.pwrite))
    store = TieredStore([HostTier(2 * PAGE, page_bytes=PAGE),  # one I/O thread: moves run on the mover's
                         DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE)], io_threads=1)
    try:
        for i in range(16):  # fills host RAM
            assert put(store, i)
        store.demote_ahead = 0.5
        assert wait_until(lambda: len(tries()) == 1)
        end = time.monotonic() + 2.5
        i = 16
        while time.monotonic() < end:  # each put finds host RAM short and wakes the demoter
            assert put(store, i)
            i += 1
            time.sleep(0.02)
        assert i > 60
        spans = [(round(t[0] - demoter_writes[0], 2), round(t[-1] - t[0], 2)) for t in tries()]
        assert 2 <= len(spans) <= 4 and all(span < 0.2 for _, span in spans), \
            f"the demoter's tries at (start s, lasting s): {spans}"
        healed.set()
        assert wait_until(lambda: store.stats().tiers[0].demotions_ahead > 0, timeout_s=10)
        assert all(store.get(key).data == block(int(key[1:])) for key in store.keys())
    finally:
        store.close()


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_batched_get_pairs_each_key_with_its_own_bytes_in_any_order(tmp_path, on_disk):
    """Adjacent slots are read as one run in slot order; the keys may be asked in another."""
    tier = DiskTier(tmp_path / "slab", 4 * PAGE, page_bytes=PAGE) if on_disk else HostTier(PAGE, page_bytes=PAGE)
    store = TieredStore([tier])
    try:
        for i in range(6):
            assert put(store, i)
        keys = [b"k%d" % i for i in (5, 3, 4, 0, 2, 1)]
        assert len(adjacent_runs([store._entries[k].slot for k in keys], 4 << 20)) == 1
        got = store.get_many(keys)
        assert sorted(got) == sorted(keys)
        assert all(got[b"k%d" % i].data == block(i) for i in range(6))
    finally:
        store.close()


def test_batched_get_and_lease_of_adjacent_disk_blocks(tmp_path):
    """Blocks demoted one after another sit in adjacent disk slots and come back in runs:
    a damaged one among them is dropped alone, the others are served (and promoted)."""
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE),
                         DiskTier(tmp_path / "slab", 4 * PAGE, page_bytes=PAGE, direct_io=True)])
    for i in range(24):  # 8 fit in host: k0..k15 go to disk, in order
        assert put(store, i)
    on_disk = [b"k%d" % i for i in range(16)]
    assert all(store.tier_of(k) == "disk" for k in on_disk)
    runs = adjacent_runs([store._entries[k].slot for k in on_disk], 4 << 20)
    assert len(runs) < len(on_disk)  # some really are adjacent
    fd = os.open(store.tiers[1].path, os.O_WRONLY)  # the tier's own fd is O_DIRECT
    os.pwrite(fd, b"\xff" * 64, store._entries[b"k3"].slot.offset)
    os.fsync(fd)
    os.close(fd)
    got = store.get_many(on_disk[:8])
    assert sorted(got) == sorted(k for k in on_disk[:8] if k != b"k3")
    assert all(got[b"k%d" % i].data == block(i) for i in range(8) if i != 3)
    assert store.stats().corrupt == 1
    lease, where = store.lease(on_disk[8:], seconds=5)  # promoted into host in runs
    host = store.tiers[0]
    assert set(where) == set(on_disk[8:])
    for key, (offset, size, _) in where.items():
        assert bytes(host.buffer()[offset:offset + size]) == block(int(key[1:]))
    assert store.release(lease)
    assert_empty_after_drop(store)
    store.close()


class Gated:
    """A real tier with its writes (and scattered reads) held at a gate the test opens:
    slow I/O, on demand."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def _wait(self) -> None:
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"

    def _write(self, slot, data):
        self._wait()
        super()._write(slot, data)

    def _write_from(self, slot, nbytes, src):
        self._wait()
        super()._write_from(slot, nbytes, src)

    def _read_run_into(self, items):
        self._wait()
        super()._read_run_into(items)


class GatedDisk(Gated, DiskTier):
    pass


class GatedGpu(Gated, GpuTier):
    pass


class FailingDisk(DiskTier):
    """The real disk tier on a disk that fails every write (EIO)."""

    def _write(self, slot, data):
        raise OSError(errno.EIO, "injected write failure")

    def _write_from(self, slot, nbytes, src):
        raise OSError(errno.EIO, "injected write failure")


def test_host_hits_do_not_wait_behind_disk_io(tmp_path):
    """While one request promotes a block from disk (its disk I/O stalled), another
    request's host-RAM hit, a lookup and the stats are served: the store's lock is not
    held across the copy."""
    disk = GatedDisk(tmp_path / "slab", 4 * PAGE, page_bytes=PAGE)
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE), disk])
    for i in range(16):  # k0..k7 on disk, k8..k15 in host RAM
        assert put(store, i)
    assert store.tier_of(b"k0") == "disk" and store.tier_of(b"k15") == "host"
    disk.gate.clear()
    disk.entered.clear()
    leased = {}
    promoter = threading.Thread(target=lambda: leased.update(lease=store.lease([b"k0"], seconds=5)))
    promoter.start()
    assert disk.entered.wait(5)  # the lease is inside the disk's I/O now
    served = {}
    reader = threading.Thread(target=lambda: served.update(
        got=store.get_many([b"k15"]), lookup=store.lookup([[b"k14"], [b"k13"]]), stats=store.stats()))
    reader.start()
    reader.join(5)
    stalled = reader.is_alive()
    disk.gate.set()  # let everything finish before asserting
    reader.join(5)
    promoter.join(5)
    assert not stalled, "a host hit waited behind another request's disk I/O"
    assert served["got"][b"k15"].data == block(15) and served["lookup"] == 2
    lease, where = leased["lease"]
    offset, size, _ = where[b"k0"]
    assert bytes(store.tiers[0].buffer()[offset:offset + size]) == block(0)
    assert store.release(lease)
    assert_empty_after_drop(store)
    store.close()


def test_a_disk_that_fails_writes_evicts_instead_of_failing_puts(tmp_path):
    """Demotions onto a disk that cannot write fall back to evicting the victim: puts
    still succeed, nothing is lost track of and nothing leaks."""
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE), FailingDisk(tmp_path / "slab", 4 * PAGE, page_bytes=PAGE)])
    for i in range(16):  # 8 fit in host RAM; the rest can only push the oldest out
        assert put(store, i)
    host, disk = store.stats().tiers
    assert host.evictions == 8 and host.demotions == 0 and disk.blocks == 0 and disk.used_bytes == 0
    assert sorted(store.keys()) == sorted(b"k%d" % i for i in range(8, 16))
    assert store.get(b"k15").data == block(15)
    assert_empty_after_drop(store)
    store.close()


def test_two_leases_of_one_gpu_block_both_get_it():
    """Two requests lease the same block while it is copied from the GPU tier (its code on
    a CPU tensor) into host RAM: both get it there (one move serves both), neither misses."""
    gpu = GatedGpu(PAGE, page_bytes=PAGE, device="cpu")
    store = TieredStore([gpu, HostTier(4 * PAGE, page_bytes=PAGE)])
    host = store.tiers[1]
    assert put(store, 1) and store.tier_of(b"k1") == "gpu"
    gpu.gate.clear()
    results = []
    leasers = [threading.Thread(target=lambda: results.append(store.lease([b"k1"], seconds=5)))
               for _ in range(2)]
    for t in leasers:
        gpu.entered.clear()
        t.start()
        assert gpu.entered.wait(5)  # this one is inside its copy into host RAM
    gpu.gate.set()
    for t in leasers:
        t.join(5)
    assert len(results) == 2 and all(b"k1" in where for _, where in results)
    for lease, where in results:
        offset, size, _ = where[b"k1"]
        assert bytes(host.buffer()[offset:offset + size]) == block(1)
        assert store.release(lease)
    assert store.tier_of(b"k1") == "host" and store.stats().misses == 0
    assert_empty_after_drop(store)
    store.close()


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


# The GPU tier runs its own code on a CPU tensor where no GPU exists (device "cpu" stands
# in for CUDA: same slicing, staging and copies, without the PCIe transfers); on a GPU the
# same tests run on the device.
GPU_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_gpu_tier_on_top(device):
    store = TieredStore([GpuTier(2 * PAGE, page_bytes=PAGE, device=device),
                         HostTier(4 * PAGE, page_bytes=PAGE)])
    for i in range(24):
        assert put(store, i)
    assert store.tier_of(b"k23") == "gpu" and store.tier_of(b"k0") == "host"
    assert store.get(b"k0").data == block(0)
    assert store.tier_of(b"k0") == "gpu"  # a hit in host RAM promotes
    for i in range(24):
        assert store.get(b"k%d" % i).data == block(i)
    gpu, host = store.stats().tiers
    assert gpu.promotions > 0 and gpu.demotions > 0 and gpu.read_bytes > 0 and host.read_bytes > 0
    store.drop()
    assert store.stats().used_bytes == 0
    store.close()


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_corrupt_gpu_bytes_are_not_demoted(device):
    """Bytes damaged in device memory are caught when pressure moves them to host RAM."""
    store = TieredStore([GpuTier(PAGE, page_bytes=PAGE, device=device),
                         HostTier(4 * PAGE, page_bytes=PAGE)])
    for i in range(8):  # the GPU tier is full
        assert put(store, i)
    gpu = store.tiers[0]
    offset = store._entries[b"k0"].slot.offset
    gpu._arena[offset:offset + 64] = 0xFF
    for i in range(8, 12):  # the oldest (k0 first) move down
        assert put(store, i)
    assert b"k0" not in store.keys() and store.stats().corrupt == 1
    assert store.tier_of(b"k1") == "host" and store.get(b"k1").data == block(1)
    store.close()


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_gpu_host_disk_random_run_returns_to_baseline(tmp_path, device):
    """GPU ▸ host ▸ disk (O_DIRECT), capacities far below the working set, several
    threads, gets and leases of several keys at a time (their reads and promotions run
    on the I/O pool): every byte returned or leased is one that was put, and every tier
    ends empty."""
    store = TieredStore([GpuTier(PAGE, page_bytes=PAGE, device=device),
                         HostTier(2 * PAGE, page_bytes=PAGE),
                         DiskTier(tmp_path / "slab", 2 * PAGE, page_bytes=PAGE, direct_io=True)],
                        "s3fifo")
    errors: list[str] = []
    host = store.tiers[1]

    def check(key: bytes, data: bytes) -> None:
        if not block(int(key[1:])).startswith(data):  # sizes 3000 or 8192
            errors.append(f"wrong bytes for {key!r}")

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(800):
            i = rng.randrange(120)
            keys = [b"k%d" % j for j in (i, rng.randrange(120), rng.randrange(120))]
            op = rng.random()
            if op < 0.5:
                put(store, i, size=rng.choice([3000, 8192]) if i % 2 else 8192)
            elif op < 0.8:
                for key, got in store.get_many(keys).items():
                    check(key, got.data)
            elif op < 0.9:
                store.drop([b"k%d" % i])
            else:
                lease, where = store.lease(keys, seconds=5)
                for j in range(3):  # pressure while leased: leased bytes must stay put
                    put(store, rng.randrange(120))
                for key, (offset, size, _) in where.items():
                    check(key, bytes(host.buffer()[offset:offset + size]))
                store.release(lease)

    run_threads(worker, seeds=range(3))
    assert not errors, errors[:5]
    gpu, host, disk = store.stats().tiers
    assert gpu.demotions > 0 and gpu.promotions > 0 and host.demotions > 0 and disk.evictions > 0
    assert store.stats().corrupt == 0 and store.leases == 0
    assert_empty_after_drop(store)
    store.close()


def test_lease_ids_are_random_and_cover_only_their_blocks():
    """A lease id is 16 random bytes; it covers the bytes of the blocks it pins (adjacent
    ones as one span), and nothing once released, expired, or under another id."""
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE)])
    try:
        for i in range(4):
            assert put(store, i)
        lease, where = store.lease([b"k0", b"k1"], seconds=5)
        other, elsewhere = store.lease([b"k3"], seconds=5)
        assert len(lease) == 16 and lease != other
        assert len({store.lease([b"k2"], seconds=5)[0] for _ in range(50)}) == 50
        (o0, n0, _), (o1, n1, _) = where[b"k0"], where[b"k1"]
        assert store.lease_covers(lease, [(o0, n0), (o1, n1), (o0 + 1, n0 - 2)])
        if o0 + n0 == o1:  # adjacent slots: one extent may span both blocks
            assert store.lease_covers(lease, [(o0, n0 + n1)])
        o3, n3, _ = elsewhere[b"k3"]
        assert not store.lease_covers(lease, [(o3, n3)])            # another reader's block
        assert not store.lease_covers(lease, [(o0, n0), (o3, 1)])   # one extent outside spoils all
        assert not store.lease_covers(bytes(16), [(o0, n0)])        # a guessed id
        assert not store.release(bytes(16)) and store.lease_covers(lease, [(o0, n0)])
        assert store.release(lease) and not store.lease_covers(lease, [(o0, n0)])
        short, _ = store.lease([b"k0"], seconds=0.01)
        time.sleep(0.05)
        assert not store.lease_covers(short, [(o0, n0)])            # past its deadline
    finally:
        store.close()
