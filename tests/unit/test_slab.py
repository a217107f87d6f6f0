import random

import pytest

from kvmesh.kv_store.slab import SlabAllocator, Slot, adjacent_runs


def test_slots_are_aligned_and_pages_come_back():
    a = SlabAllocator(capacity_bytes=4 * 65536, page_bytes=65536, min_slot_bytes=4096)
    slots = [a.alloc(5000) for _ in range(8)]  # 8 KiB slots, 8 per page
    assert all(s.size == 8192 and s.offset % 8192 == 0 for s in slots)
    assert len({s.offset for s in slots}) == 8 and a.free_pages == 3
    for s in slots:
        a.free(s, 5000)
    assert a.free_pages == 4 and a.payload_bytes == 0 and a.fragmentation == 0.0


def test_freed_pages_and_slots_come_back_lowest_offset_first():
    a = SlabAllocator(capacity_bytes=4 * 65536, page_bytes=65536, min_slot_bytes=4096)
    pages = [a.alloc(65536) for _ in range(4)]
    for s in pages:  # freed in ascending order: a stack would hand them back descending
        a.free(s, 65536)
    assert [a.alloc(65536).offset for _ in range(4)] == [0, 65536, 2 * 65536, 3 * 65536]
    a = SlabAllocator(capacity_bytes=65536, page_bytes=65536, min_slot_bytes=4096)
    slots = [a.alloc(4096) for _ in range(16)]
    assert [s.offset for s in slots] == list(range(0, 65536, 4096))
    for s in slots[2:8]:
        a.free(s, 4096)
    assert [a.alloc(4096).offset for _ in range(6)] == [s.offset for s in slots[2:8]]


def test_full_allocator_says_none_and_sizes_are_bounded():
    a = SlabAllocator(capacity_bytes=65536, page_bytes=65536, min_slot_bytes=4096)
    assert a.alloc(0) is None and a.alloc(65537) is None
    big = a.alloc(65536)
    assert big is not None and a.alloc(1) is None
    a.free(big, 65536)
    assert a.alloc(1) is not None


def test_fragmentation_counts_rounding():
    a = SlabAllocator(capacity_bytes=65536, page_bytes=65536, min_slot_bytes=4096)
    a.alloc(4096 + 1)  # takes an 8 KiB slot in a 64 KiB page
    assert a.fragmentation == pytest.approx(1 - 4097 / 65536)


def test_page_size_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        SlabAllocator(1 << 20, page_bytes=3 * 4096)


def test_adjacent_runs_follow_offsets_and_respect_the_cap():
    S = lambda offset, size=4096: Slot(offset, size, 0)  # noqa: E731
    slots = [S(8192), S(0), S(4096), S(20480), S(24576, 8192), S(65536)]
    assert adjacent_runs(slots, 1 << 20) == [[1, 2, 0], [3, 4], [5]]
    assert adjacent_runs(slots, 8192) == [[1, 2], [0], [3], [4], [5]]
    assert adjacent_runs([S(0, 16384)], 4096) == [[0]]  # longer than the cap: alone
    assert adjacent_runs([], 4096) == []


def test_finer_size_classes_fit_odd_sizes_and_keep_slots_apart():
    a = SlabAllocator(8 << 20, 1 << 20, min_slot_bytes=512, steps=16)
    rng = random.Random(4)
    held = []
    for _ in range(400):
        n = rng.randrange(1, 300_000)
        size = a.slot_size_for(n)
        assert n <= size <= max(512, n * (1 + 1 / 16) + 512) and size % 512 == 0
        slot = a.alloc(n)
        if slot is None:
            break
        assert slot.offset % 512 == 0 and slot.offset + slot.size <= (slot.page + 1) * (1 << 20)
        held.append((slot, n))
    spans = sorted((s.offset, s.offset + s.size) for s, _ in held)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
    for slot, n in held:
        a.free(slot, n)
    assert a.payload_bytes == 0 and a.free_pages == a.num_pages
