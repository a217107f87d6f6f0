"""Slab allocation of a tier's bytes: fixed-size slots in fixed-size pages, no per-block malloc.

The tier's capacity is cut into pages of ``page_bytes``. A page is given to one size
class (slots of ``min_slot_bytes * 2**k``, up to a page) when that class needs room and
goes back to the free pages when its last slot is freed. A block takes the smallest slot
that holds it. Offsets are multiples of the slot size, so they are aligned for direct
I/O whenever the slot size is (4 KiB and up).

With ``steps`` above 1 there are that many size classes per doubling instead of one
(between ``2**k`` and ``2**(k+1)`` times ``min_slot_bytes``, every ``2**k / steps``
rounded up to ``min_slot_bytes``): for tiers that hold encoded blocks, whose sizes vary
and rarely fall to a power of two (a block compressed to 0.55 of its size would
otherwise take a slot as large as the uncompressed one). A page then holds as many
slots as fit whole; the rest of it is unused. Offsets are then multiples of
``min_slot_bytes`` (within a page, of the slot size).

Free pages, and the free slots of a page, are handed out lowest offset first (heaps),
so a tier fills from the start of its region and consecutive blocks land in adjacent
slots whatever order earlier ones were freed in: a batched read then finds them in one
run, and a disk sees writes move forward. (Handed out last-freed first, the pages a drop
freed came back in descending order, and back-to-back 4 MiB puts to disk ran 2.4x slower
than ascending ones, measured on the development machine's disk.)

The allocator only does bookkeeping (offsets); the tier owns the memory or file behind
them. Not thread-safe: the owning store serialises calls.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import NamedTuple


class Slot(NamedTuple):
    offset: int
    size: int      # the slot's size (a power-of-two multiple of min_slot_bytes)
    page: int


@dataclass
class _Page:
    slot_size: int = 0
    free: list[int] = field(default_factory=list)  # free slot offsets, a heap
    used: int = 0


class SlabAllocator:
    def __init__(self, capacity_bytes: int, page_bytes: int = 4 << 20, min_slot_bytes: int = 4096,
                 steps: int = 1):
        if page_bytes % min_slot_bytes or page_bytes & (page_bytes - 1):
            raise ValueError("page_bytes must be a power of two and a multiple of min_slot_bytes")
        if steps < 1:
            raise ValueError("steps must be at least 1")
        self.page_bytes = page_bytes
        self.min_slot_bytes = min_slot_bytes
        self.steps = steps
        self.num_pages = capacity_bytes // page_bytes
        self.capacity_bytes = self.num_pages * page_bytes
        self._pages = [_Page() for _ in range(self.num_pages)]
        self._free_pages = list(range(self.num_pages))  # a heap
        self._partial: dict[int, set[int]] = {}  # slot size -> pages with a free slot
        self.payload_bytes = 0  # bytes of the blocks stored (not rounded up)
        self.slot_bytes = 0  # bytes of the slots handed out

    def slot_size_for(self, nbytes: int) -> int | None:
        """The slot size a block of ``nbytes`` takes, or None if no slot can hold it."""
        if nbytes <= 0 or nbytes > self.page_bytes:
            return None
        size = self.min_slot_bytes
        while size < nbytes:
            size *= 2
        if self.steps > 1 and size > self.min_slot_bytes:
            step = -(-(size // 2 // self.steps) // self.min_slot_bytes) * self.min_slot_bytes
            size = min(size, -(-nbytes // step) * step)
        return size

    def alloc(self, nbytes: int) -> Slot | None:
        """A free slot for ``nbytes``, or None when its class and the free pages are full."""
        size = self.slot_size_for(nbytes)
        if size is None:
            return None
        partial = self._partial.setdefault(size, set())
        if not partial:
            if not self._free_pages:
                return None
            index = heapq.heappop(self._free_pages)
            page = self._pages[index]
            base = index * self.page_bytes
            page.slot_size = size
            page.free = list(range(base, base + self.page_bytes - size + 1, size))  # ascending: a heap
            partial.add(index)
        index = next(iter(partial))
        page = self._pages[index]
        offset = heapq.heappop(page.free)
        page.used += 1
        if not page.free:
            partial.discard(index)
        self.payload_bytes += nbytes
        self.slot_bytes += size
        return Slot(offset, size, index)

    def free(self, slot: Slot, nbytes: int) -> None:
        """Give back a slot that held ``nbytes``; the page goes back once it is empty."""
        page = self._pages[slot.page]
        heapq.heappush(page.free, slot.offset)
        page.used -= 1
        self.payload_bytes -= nbytes
        self.slot_bytes -= slot.size
        partial = self._partial.setdefault(page.slot_size, set())
        if page.used == 0:
            partial.discard(slot.page)
            page.free = []
            heapq.heappush(self._free_pages, slot.page)
        else:
            partial.add(slot.page)

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def held_bytes(self) -> int:
        """Bytes of the pages given to a size class."""
        return (self.num_pages - len(self._free_pages)) * self.page_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.payload_bytes

    @property
    def fragmentation(self) -> float:
        """Share of the held pages not holding block bytes (rounding and free slots)."""
        held = self.held_bytes
        return 0.0 if held == 0 else 1.0 - self.payload_bytes / held


def adjacent_runs(slots: list[Slot], max_bytes: int) -> list[list[int]]:
    """Indices of ``slots`` grouped into runs of slots that follow each other in the
    region (each starts where the one before ends), in offset order, each run at most
    ``max_bytes`` long (a single slot longer than that is a run of its own)."""
    runs: list[list[int]] = []
    end = length = 0
    for i in sorted(range(len(slots)), key=lambda i: slots[i].offset):
        slot = slots[i]
        if runs and slot.offset == end and length + slot.size <= max_bytes:
            runs[-1].append(i)
            length += slot.size
        else:
            runs.append([i])
            length = slot.size
        end = slot.offset + slot.size
    return runs
