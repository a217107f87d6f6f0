"""Write-behind on the real disk tier: staged writes reach the file in offset order,
adjacent blocks in one request; reads wait for them; a newer write of a slot wins; a
failed flush is a counted miss, never wrong bytes; no staging room means a direct write."""

import errno
import os
import threading

import pytest

from kvmesh.kv_store import write_behind
from kvmesh.kv_store.integrity import checksum
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.slab import Slot
from kvmesh.kv_store.tiers import DiskTier, HostTier

PAGE = 64 * 1024


def block(i: int, size: int = 8192) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


class GatedWrites:
    """Holds the flusher's first write request at a gate the test opens (slow disk)."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.gate, self.entered = threading.Event(), threading.Event()
        self.fail = fail
        real = os.pwritev

        def pwritev(fd, buffers, offset):
            self.entered.set()
            assert self.gate.wait(10), "the test never opened the gate"
            if self.fail:
                raise OSError(errno.EIO, "injected write failure")
            return real(fd, buffers, offset)

        monkeypatch.setattr(write_behind.os, "pwritev", pwritev)


@pytest.fixture
def disk(tmp_path):
    tier = DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE, direct_io=True, write_behind_bytes=4 * PAGE)
    yield tier
    tier.close()


def raw_bytes(tier, slot, n) -> bytes:
    fd = os.open(tier.path, os.O_RDONLY)  # not O_DIRECT: what the file holds, through the page cache
    try:
        return os.pread(fd, n, slot.offset)
    finally:
        os.close(fd)


def test_adjacent_staged_blocks_go_to_disk_in_one_request(disk, monkeypatch):
    gated = GatedWrites(monkeypatch)
    slots = [disk.allocator.alloc(8192) for _ in range(9)]
    disk.write(slots[0], block(0))  # the flusher takes it and waits at the gate
    assert gated.entered.wait(5)
    for i, slot in enumerate(slots[1:], 1):  # staged meanwhile: one batch, adjacent slots
        disk.write(slot, block(i))
    gated.gate.set()
    assert disk.flush()
    assert disk._behind.requests == 2 and disk._behind.failed_writes == 0
    assert [raw_bytes(disk, s, 8192) for s in slots] == [block(i) for i in range(9)]


def test_a_read_waits_for_its_block_and_a_newer_write_wins(disk, monkeypatch):
    gated = GatedWrites(monkeypatch)
    slot = disk.allocator.alloc(8192)
    disk.write(slot, block(1))
    assert gated.entered.wait(5)  # block(1) is being written, slowly
    disk.write(slot, block(2))  # the slot rewritten meanwhile
    got = []
    reader = threading.Thread(target=lambda: got.append(disk.read(slot, 8192)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and not got  # waits: its bytes are not on disk yet
    gated.gate.set()
    reader.join(10)
    assert got == [block(2)]
    assert disk.flush() and raw_bytes(disk, slot, 8192) == block(2)


def test_a_failed_flush_is_a_counted_miss(tmp_path, monkeypatch):
    gated = GatedWrites(monkeypatch, fail=True)
    gated.gate.set()
    store = TieredStore([DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE, direct_io=True,
                                  write_behind_bytes=4 * PAGE)])
    try:
        data = block(5)
        assert store.put(b"k", data, checksum(data))  # staged: the put succeeds
        assert store.flush()  # nothing left staged, though its write failed
        assert store.tiers[0]._behind.failed_writes == 1
        assert store.get(b"k") is None  # the file never got the bytes: a miss, not garbage
        assert store.stats().corrupt == 1
    finally:
        store.close()


def test_no_staging_room_in_time_writes_directly(disk, monkeypatch):
    gated = GatedWrites(monkeypatch)
    disk._behind.timeout_s = 0.2
    big = [disk.allocator.alloc(PAGE) for _ in range(5)]  # staging holds four pages
    for i, slot in enumerate(big[:4]):
        disk.write(slot, block(i, PAGE))
    assert gated.entered.wait(5)
    disk.write(big[4], block(4, PAGE))  # no room came free: written by the caller
    assert raw_bytes(disk, big[4], PAGE) == block(4, PAGE)
    gated.gate.set()
    assert disk.flush()
    assert [disk.read(s, PAGE) for s in big] == [block(i, PAGE) for i in range(5)]


def test_a_store_over_write_behind_serves_every_block(tmp_path):
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE),
                         DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE, direct_io=True,
                                  write_behind_bytes=2 * PAGE)])
    try:
        for i in range(40):  # 8 fit in host RAM: the rest are demoted through write-behind
            data = block(i)
            assert store.put(b"k%d" % i, data, checksum(data))
        assert all(store.get(b"k%d" % i).data == block(i) for i in range(40))
        assert store.flush() and store.tiers[1]._behind.staged_bytes == 0
    finally:
        store.close()


def test_close_with_blocks_still_staged_returns(tmp_path):
    tier = DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE, write_behind_bytes=4 * PAGE)
    for i in range(4):
        tier.write(tier.allocator.alloc(8192), block(i))
    tier.close()
    assert not tier._behind._flusher.is_alive() and not (tmp_path / "slab").exists()


def test_a_newer_block_in_an_overlapping_slot_supersedes_a_dead_one(disk, monkeypatch):
    """A page freed and cut into slots of another size: bytes still staged for a freed
    4 KiB slot must not land over the 8 KiB block now written across it."""
    gated = GatedWrites(monkeypatch)
    disk.write(Slot(PAGE, 4096, 1), block(9, 4096))  # the flusher holds this one at the gate
    assert gated.entered.wait(5)
    disk.write(Slot(4096, 4096, 0), block(1, 4096))  # an old block, its slot then freed
    disk.write(Slot(0, 8192, 0), block(2))  # the page's new 8 KiB slot, over it
    gated.gate.set()
    assert disk.read(Slot(0, 8192, 0), 8192) == block(2)
    assert disk.flush() and raw_bytes(disk, Slot(0, 8192, 0), 8192) == block(2)
    assert disk._behind.staged_bytes == 0


def test_staging_smaller_than_a_page_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one page"):
        DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE, write_behind_bytes=PAGE // 2)
    assert list(tmp_path.iterdir()) == []


def test_close_while_the_flusher_is_stuck_in_a_write(tmp_path, monkeypatch):
    gated = GatedWrites(monkeypatch)
    tier = DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE, write_behind_bytes=4 * PAGE)
    tier._behind.timeout_s = 0.3
    tier.write(tier.allocator.alloc(8192), block(1))
    assert gated.entered.wait(5)
    tier.close()  # gives up waiting: the file is unlinked, its descriptor kept for the flusher
    assert not (tmp_path / "slab").exists() and tier._behind._flusher.is_alive()
    gated.gate.set()  # the write completes on the kept descriptor; the flusher then stops
    tier._behind._flusher.join(5)
    assert not tier._behind._flusher.is_alive() and tier._behind.failed_writes == 0
    os.close(tier._fd)
