"""Host memory for regions that other processes read through NIXL.

NIXL (UCX) reads between processes of one host with ``process_vm_readv`` (UCX's ``cma``
transport), and the kernel pins the source's pages one by one: on 4 KiB pages that costs
more than the copy. Backing the region with transparent huge pages (``madvise
MADV_HUGEPAGE`` before the pages are touched) measured 2-2.6x faster here (4 MiB reads:
4.9 → 12.8 GB/s at the median; 64 MiB: 3.5 → 7.4 GB/s). ``HostTier`` populates its map at
creation with ``MAP_POPULATE``, which makes 4 KiB pages: a store that serves NIXL
readers should create its arena like ``anonymous_arena`` does.

Shared-memory (``/dev/shm``) arenas get huge pages only where the kernel's
``shmem_enabled`` allows them; the shm backend copies with ``memcpy`` and does not need
them.
"""

from __future__ import annotations

import mmap


def anonymous_arena(nbytes: int, huge_pages: bool = True) -> mmap.mmap:
    """An anonymous private map of ``nbytes``, every page resident, on transparent huge
    pages where the kernel allows them (``enabled`` = ``always`` or ``madvise``)."""
    size = max(int(nbytes), mmap.PAGESIZE)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if not huge_pages or advice is None:
        return mmap.mmap(-1, size, flags=flags | getattr(mmap, "MAP_POPULATE", 0))
    region = mmap.mmap(-1, size, flags=flags)
    try:
        region.madvise(advice)
    except OSError:  # THP disabled: plain pages
        pass
    view = memoryview(region)
    try:
        view[::mmap.PAGESIZE] = bytes(len(range(0, size, mmap.PAGESIZE)))  # fault every page in
    finally:
        view.release()
    return region
