"""Storage tiers: where a block's bytes physically live.

A tier owns one preallocated region (host RAM, a slab file on local disk, or GPU memory)
and a ``SlabAllocator`` over it; the ``TieredStore`` decides what goes where. ``write``
copies a block into a slot, ``read`` copies it out as ``bytes``; ``read_run`` and
``read_run_into`` do the same for blocks in adjacent slots, the latter into memory the
caller owns (the store moves blocks between tiers that way, straight into or out of the
host arena, without an intermediate copy). Tiers keep byte and time counters
for bandwidth metrics. Not thread-safe for the same slot: the store never reads a slot
while it writes or frees it (pins). ``OSError`` from a disk means the bytes are lost; the
store treats it like a checksum mismatch.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import threading
import time
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from kvmesh.kv_store.encoding import Encoding, NoEncoding
from kvmesh.kv_store.slab import SlabAllocator, Slot
from kvmesh.kv_store.write_behind import WriteBehind


@dataclass
class IOCounters:
    read_bytes: int = 0
    read_seconds: float = 0.0
    write_bytes: int = 0
    write_seconds: float = 0.0


class Tier(ABC):
    """``encoding``: how the store holds blocks at rest here (``kv_store.encoding``; the
    tier itself only stores the bytes it is given)."""

    name: str

    ENCODED_SLOT_STEPS = 16  # size classes per doubling where blocks are held encoded

    def __init__(self, capacity_bytes: int, page_bytes: int = 4 << 20, encoding: Encoding | None = None,
                 min_slot_bytes: int = 4096):
        """``min_slot_bytes`` (a tier that holds encoded blocks, whose sizes vary, may take
        smaller slots than 4 KiB) only matters with an ``encoding``."""
        self.encoding = encoding or NoEncoding()
        if self.encoding.code:
            self.allocator = SlabAllocator(capacity_bytes, page_bytes, min_slot_bytes, self.ENCODED_SLOT_STEPS)
        else:
            self.allocator = SlabAllocator(capacity_bytes, page_bytes)
        self.io = IOCounters()
        self._io_lock = threading.Lock()

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.capacity_bytes

    def write(self, slot: Slot, data: bytes | memoryview) -> None:
        start = time.perf_counter()
        self._write(slot, data)
        self._count_write(len(data), start)

    def write_from(self, slot: Slot, nbytes: int, src: memoryview) -> None:
        """A block of ``nbytes`` into ``slot`` out of ``src``, which holds the whole slot
        (``slot.size`` bytes, starting with the block): the disk tier then writes
        straight from it, padding included, without its bounce buffer (with O_DIRECT
        ``src`` must be aligned, as host-arena slots are; if the kernel refuses it, the
        bounce buffer serves). Other tiers, and a disk tier with write-behind (which
        stages the bytes), copy the first ``nbytes``."""
        start = time.perf_counter()
        self._write_from(slot, nbytes, src)
        self._count_write(nbytes, start)

    def write_run_from(self, items: Sequence[tuple[Slot, int, memoryview]]) -> None:
        """Each ``(slot, nbytes, src)`` as ``write_from``, slots adjacent as for
        ``read_run``. This writes them one by one; the disk tier writes the whole run in
        one request where every ``src`` holds its whole slot."""
        start = time.perf_counter()
        self._write_run_from(items)
        self._count_write(sum(n for _, n, _ in items), start)

    def _write_from(self, slot: Slot, nbytes: int, src: memoryview) -> None:
        with src[:nbytes] as data:
            self._write(slot, data)

    def _write_run_from(self, items: Sequence[tuple[Slot, int, memoryview]]) -> None:
        for slot, nbytes, src in items:
            self._write_from(slot, nbytes, src)

    def read(self, slot: Slot, nbytes: int) -> bytes:
        self._before_read([slot])
        start = time.perf_counter()
        data = self._read(slot, nbytes)
        self._count_read(nbytes, start)
        return data

    def read_run(self, items: Sequence[tuple[Slot, int]]) -> list[bytes]:
        """The first ``nbytes`` of each ``(slot, nbytes)``, in order, where each slot starts
        where the one before ends. This reads them one by one; the disk tier reads the
        whole run in one request."""
        self._before_read([slot for slot, _ in items])
        start = time.perf_counter()
        out = self._read_run(items)
        self._count_read(sum(n for _, n in items), start)
        return out

    def read_run_into(self, items: Sequence[tuple[Slot, int, memoryview]]) -> None:
        """Each ``(slot, nbytes, dest)``'s first ``nbytes`` into ``dest``, slots adjacent as
        for ``read_run``. A ``dest`` of at least ``slot.size`` bytes may get the slot's
        padding too (the disk tier then reads straight into it)."""
        self._before_read([slot for slot, _, _ in items])
        start = time.perf_counter()
        self._read_run_into(items)
        self._count_read(sum(n for _, n, _ in items), start)

    def _read_run(self, items: Sequence[tuple[Slot, int]]) -> list[bytes]:
        return [self._read(slot, nbytes) for slot, nbytes in items]

    def _before_read(self, slots: Sequence[Slot]) -> None:
        """Called before ``slots`` are read (the disk tier waits for their writes)."""

    def flush(self) -> bool:
        """Wait until every write has reached the medium; False if it timed out."""
        return True

    def _read_run_into(self, items: Sequence[tuple[Slot, int, memoryview]]) -> None:
        for slot, nbytes, dest in items:
            self._read_into(slot, nbytes, dest)

    def _count_write(self, nbytes: int, start: float) -> None:
        with self._io_lock:
            self.io.write_bytes += nbytes
            self.io.write_seconds += time.perf_counter() - start

    def _count_read(self, nbytes: int, start: float) -> None:
        with self._io_lock:
            self.io.read_bytes += nbytes
            self.io.read_seconds += time.perf_counter() - start

    @abstractmethod
    def _write(self, slot: Slot, data: bytes | memoryview) -> None: ...

    @abstractmethod
    def _read(self, slot: Slot, nbytes: int) -> bytes: ...

    @abstractmethod
    def _read_into(self, slot: Slot, nbytes: int, dest: memoryview) -> None:
        """The slot's first ``nbytes`` into ``dest[:nbytes]``."""

    def close(self) -> None:
        """Release the tier's memory or file."""


def anonymous_arena(nbytes: int, populate: bool = True, huge_pages: bool = True) -> mmap.mmap:
    """An anonymous private map of ``nbytes`` (``populate``: every page resident), on
    transparent huge pages where the kernel allows them (``enabled`` = ``always`` or
    ``madvise``).

    NIXL (UCX) reads between processes of one host with ``process_vm_readv``, and the
    kernel pins the source's pages one by one: on huge pages that measured 2-2.6x faster
    than on 4 KiB pages. The advice must come before the pages are touched, so this
    faults them in itself instead of using ``MAP_POPULATE`` (which makes 4 KiB pages)."""
    size = max(int(nbytes), mmap.PAGESIZE)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if not populate:
        return mmap.mmap(-1, size, flags=flags)
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


class HostTier(Tier):
    """Host RAM: one memory map, page-aligned and (``populate``) made resident up front,
    so no block write pays for page faults.

    By default the map is anonymous. With ``shm_name`` it is a named shared-memory
    segment instead (``/dev/shm/<shm_name>``, created exclusively, mode 0600, its pages
    reserved up front so a full ``/dev/shm`` fails here rather than with SIGBUS later), so
    that readers in other processes on this host can map it (``kv_store.transfer``). The
    tier holds a shared ``flock`` on the segment while it is open: readers tell a live
    owner from a dead one by it. ``close`` unlinks the name.

    Where CUDA is present the region is registered as pinned memory, so copies to and
    from the GPU run at full speed.

    With an ``encoding`` the store holds its blocks encoded here (slots from 512 bytes,
    as encoded sizes vary); readers of the region then read decoded copies that the
    store makes in it for the length of their lease (``TieredStore.lease``).
    """

    name = "host"

    def __init__(self, capacity_bytes: int, page_bytes: int = 4 << 20, populate: bool = True,
                 shm_name: str | None = None, encoding: Encoding | None = None):
        super().__init__(capacity_bytes, page_bytes, encoding, 512)
        size = max(self.capacity_bytes, mmap.PAGESIZE)
        self.shm_name = shm_name
        self._shm_fd: int | None = None
        if shm_name is None:
            self._map = anonymous_arena(size, populate)
        else:
            self._shm_fd, self._map = _create_shared_map(shm_name, size, populate)
        self._view = memoryview(self._map)
        self._pinned = _pin_host_memory(self._map)
        self._closed = False

    @property
    def shm_path(self) -> str | None:
        """Where the shared segment lives (None for an anonymous map)."""
        return None if self.shm_name is None else shm_path(self.shm_name)

    def _write(self, slot: Slot, data: bytes | memoryview) -> None:
        self._view[slot.offset:slot.offset + len(data)] = data

    def _read(self, slot: Slot, nbytes: int) -> bytes:
        return self._view[slot.offset:slot.offset + nbytes].tobytes()

    def _read_into(self, slot: Slot, nbytes: int, dest: memoryview) -> None:
        dest[:nbytes] = self._view[slot.offset:slot.offset + nbytes]

    def view(self, slot: Slot, nbytes: int) -> memoryview:
        """The slot's first ``nbytes`` in place (no copy). The caller releases the view
        before the tier closes and must not use it once the slot is freed."""
        return self._view[slot.offset:slot.offset + nbytes]

    def buffer(self) -> memoryview:
        """The whole region (for registering with a transfer engine)."""
        return self._view

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._view.release()
        if self._pinned is not None:
            self._pinned()
        self._map.close()
        if self._shm_fd is not None:
            unlink_shm_if_same(self.shm_name, self._shm_fd)
            os.close(self._shm_fd)  # drops the liveness lock
            self._shm_fd = None


SHM_DIR = "/dev/shm"
_SHM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,200}")


def shm_path(name: str) -> str:
    """The file of the shared-memory segment ``name``; refuses names that are not one
    plain file name (no slashes, no leading dot)."""
    if not isinstance(name, str) or not _SHM_NAME.fullmatch(name):
        raise ValueError(f"invalid shared-memory name {name!r}: use letters, digits, '.', '_', '-'")
    return os.path.join(SHM_DIR, name)


def _create_shared_map(name: str, size: int, populate: bool) -> tuple[int, mmap.mmap]:
    path = shm_path(name)
    if not os.path.isdir(SHM_DIR):
        raise OSError(f"{SHM_DIR} is missing: shared-memory host tiers need Linux POSIX shm")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # "the owner is alive", for readers and reapers
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            raise OSError(e.errno, f"cannot reserve {size} bytes of shared memory in {SHM_DIR} "
                                   f"for {name!r}: {e.strerror}") from None
        flags = mmap.MAP_SHARED
        if populate:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        region = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd, region


def reap_orphaned_segments(prefix: str, min_age_s: float = 60.0) -> list[str]:
    """Unlink the shared-memory segments named ``prefix...`` whose owner is gone (a host
    tier killed before it could unlink its own: its lock went with it); see
    ``reap_orphaned_files``."""
    return reap_orphaned_files(SHM_DIR, prefix, min_age_s)


def reap_orphaned_files(directory: str, prefix: str, min_age_s: float = 60.0) -> list[str]:
    """Unlink the files in ``directory`` named ``prefix...`` that no process holds a
    ``flock`` on (their owner, a host tier's segment or a disk tier's slab file, died
    before it could unlink its own: its lock went with it) and that are at least
    ``min_age_s`` old (a file being created is locked at once; the age leaves a margin).
    Returns the names unlinked. Files of live owners are untouched."""
    reaped = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return reaped
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < min_age_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # an owner holds it (or a reader is checking): alive
                continue
            if unlink_if_same(path, fd):
                reaped.append(name)
        finally:
            os.close(fd)
    return reaped


def unlink_shm_if_same(name: str, fd: int) -> bool:
    """Unlink the segment ``name`` if it is still the one open as ``fd``; see ``unlink_if_same``."""
    return unlink_if_same(shm_path(name), fd)


def unlink_if_same(path: str, fd: int) -> bool:
    """Unlink ``path`` if it is still the file open as ``fd`` (not a newer one that took
    the name after an earlier unlink); True if it was unlinked."""
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _pin_host_memory(region: mmap.mmap):
    """Page-lock ``region`` for CUDA if a GPU is usable; returns the undo, or None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        import ctypes

        address = ctypes.addressof(ctypes.c_char.from_buffer(region))
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(address, len(region), 0)) != 0:  # 0: cudaSuccess
            return None
        return lambda: cudart.cudaHostUnregister(address)
    except Exception:  # no torch, or registration refused: plain pageable memory
        return None


class DiskTier(Tier):
    """A slab file on local disk, preallocated to the tier's capacity: its blocks are
    reserved on the file system when the tier opens (``posix_fallocate``), so a disk
    without room for the capacity fails here, with ``OSError``, and never a block write
    later.

    The tier holds a shared ``flock`` on its file while it is open (from before the file
    has its name), so that ``reap_orphaned_files`` tells the file of a store that died,
    and left its reserved space behind, from a live one at once.

    Slots are 4 KiB-aligned. With ``direct_io`` the file is opened ``O_DIRECT`` (no page
    cache) and every transfer goes through an aligned bounce buffer, padded to the slot
    size; without it, plain ``pread``/``pwrite``. The file is removed on ``close``, and
    when opening fails.

    With ``write_behind_bytes`` a write returns once the block is staged in that much
    RAM, and a thread writes the staged blocks in offset order, adjacent ones in one
    request (``kv_store.write_behind``); a read of a block waits for its write. The
    write counters then count the time writes took to stage; ``flush`` waits for the
    disk.
    """

    name = "disk"

    def __init__(self, path: str | os.PathLike, capacity_bytes: int, page_bytes: int = 4 << 20,
                 direct_io: bool = False, write_behind_bytes: int = 0, encoding: Encoding | None = None):
        # encoded blocks in 512-byte steps (a sector); with O_DIRECT in whole 4 KiB pages
        super().__init__(capacity_bytes, page_bytes, encoding, 4096 if direct_io else 512)
        self.path = os.fspath(path)
        self._behind: WriteBehind | None = None
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        if direct_io:
            flags |= getattr(os, "O_DIRECT", 0)
        self.direct_io = direct_io
        # Made under a name of its own and locked ("the owner is alive") before it takes
        # its name, so that reap_orphaned_files never sees it unlocked.
        making = os.path.join(os.path.dirname(self.path) or ".", f".{os.path.basename(self.path)}.new")
        self._fd = os.open(making, flags | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            os.rename(making, self.path)
        except BaseException:
            os.close(self._fd)
            os.unlink(making)
            raise
        try:
            os.posix_fallocate(self._fd, 0, max(self.capacity_bytes, 1))
        except OSError as e:
            self.close()
            raise OSError(e.errno, f"cannot reserve {self.capacity_bytes} bytes for the disk tier "
                                   f"in {self.path}: {e.strerror}") from None
        self._local = threading.local()
        if write_behind_bytes > 0:
            try:  # ValueError: less than a page of staging
                self._behind = WriteBehind(self._fd, self.path, write_behind_bytes, page_bytes)
            except BaseException:
                self.close()
                raise

    def _staged(self, slot: Slot, data: bytes | memoryview) -> bool:
        """Whether write-behind took the block; if it had no room in time, the caller
        writes it (once no older bytes of the slot are still to be written)."""
        if self._behind is None:
            return False
        if self._behind.stage(slot, data):
            return True
        self._behind.wait_written([slot])
        return False

    def _before_read(self, slots: Sequence[Slot]) -> None:
        if self._behind is not None:
            self._behind.wait_written(slots)

    def flush(self) -> bool:
        return self._behind is None or self._behind.flush()

    def _bounce(self, size: int) -> mmap.mmap:
        """A page-aligned buffer of at least ``size`` bytes, one per thread."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = mmap.mmap(-1, size)
            self._local.buf = buf
        return buf

    def _write(self, slot: Slot, data: bytes | memoryview) -> None:
        if self._staged(slot, data):
            return
        if not self.direct_io:
            os.pwrite(self._fd, data, slot.offset)
            return
        buf = self._bounce(slot.size)
        view = memoryview(buf)
        view[:len(data)] = data
        os.pwrite(self._fd, view[:slot.size], slot.offset)
        view.release()

    def _write_from(self, slot: Slot, nbytes: int, src: memoryview) -> None:
        if len(src) < slot.size or self._behind is not None:
            return super()._write_from(slot, nbytes, src)
        try:
            with src[:slot.size] as whole:
                written = os.pwrite(self._fd, whole, slot.offset)
        except OSError as e:
            if not self.direct_io or e.errno != errno.EINVAL:
                raise
            return super()._write_from(slot, nbytes, src)
        if written < slot.size:
            raise OSError(f"short write to {self.path}: {written} of {slot.size} bytes")

    def _write_run_from(self, items: Sequence[tuple[Slot, int, memoryview]]) -> None:
        """One gathered write of the whole run straight out of the sources where each
        holds its whole slot (and no write-behind stages them); otherwise, or if the
        kernel refuses them, one slot at a time."""
        if len(items) > 1 and self._behind is None and all(len(src) >= slot.size for slot, _, src in items):
            span = sum(slot.size for slot, _, _ in items)
            views = [src[:slot.size] for slot, _, src in items]
            try:
                written = os.pwritev(self._fd, views, items[0][0].offset)
            except OSError as e:
                if not self.direct_io or e.errno != errno.EINVAL:
                    raise
            else:
                if written < span:
                    raise OSError(f"short write to {self.path}: {written} of {span} bytes")
                return
            finally:
                for view in views:
                    view.release()
        super()._write_run_from(items)

    def _read(self, slot: Slot, nbytes: int) -> bytes:
        if not self.direct_io:
            data = os.pread(self._fd, nbytes, slot.offset)
            _check_length(len(data), nbytes, self.path)
            return data
        with self._read_span(slot.offset, slot.size) as view:
            return view[:nbytes].tobytes()

    def _read_into(self, slot: Slot, nbytes: int, dest: memoryview) -> None:
        if not self.direct_io:
            with memoryview(dest) as out:
                _check_length(os.preadv(self._fd, [out[:nbytes]], slot.offset), nbytes, self.path)
            return
        with self._read_span(slot.offset, slot.size) as view:
            dest[:nbytes] = view[:nbytes]

    def _read_run(self, items: Sequence[tuple[Slot, int]]) -> list[bytes]:
        if len(items) == 1:
            return [self._read(*items[0])]
        first, (last, _) = items[0][0], items[-1]
        with self._read_span(first.offset, last.offset + last.size - first.offset) as view:
            return [view[s.offset - first.offset:s.offset - first.offset + n].tobytes()
                    for s, n in items]

    def _read_run_into(self, items: Sequence[tuple[Slot, int, memoryview]]) -> None:
        """One scattered read of the whole run straight into the destinations where each
        holds its whole slot (with O_DIRECT they must be aligned, as host-arena slots
        are); otherwise, or if the kernel refuses them, one slot at a time."""
        if len(items) > 1 and all(len(dest) >= slot.size for slot, _, dest in items):
            span = sum(slot.size for slot, _, _ in items)
            try:
                got = os.preadv(self._fd, [memoryview(d)[:s.size] for s, _, d in items], items[0][0].offset)
            except OSError as e:
                if not self.direct_io or e.errno != errno.EINVAL:
                    raise
            else:
                _check_length(got, span, self.path)
                return
        for slot, nbytes, dest in items:
            self._read_into(slot, nbytes, dest)

    @contextmanager
    def _read_span(self, offset: int, length: int) -> Iterator[memoryview]:
        """``length`` bytes of the file from ``offset`` (whole slots, so aligned): one
        ``pread``, or with O_DIRECT one read into this thread's bounce buffer."""
        if not self.direct_io:
            data = os.pread(self._fd, length, offset)
            _check_length(len(data), length, self.path)
            with memoryview(data) as view:
                yield view
            return
        with memoryview(self._bounce(length)) as view:
            _check_length(os.preadv(self._fd, [view[:length]], offset), length, self.path)
            with view[:length] as data:
                yield data

    def close(self) -> None:
        if self._behind is None or self._behind.close():  # before the file: its thread writes to it
            os.close(self._fd)  # (a flusher stuck in a write keeps it: the number must not be reused)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _check_length(got: int, wanted: int, path: str) -> None:
    if got < wanted:
        raise OSError(f"short read from {path}: {got} of {wanted} bytes")


class GpuTier(Tier):
    """GPU memory: one device tensor of the tier's capacity.

    Blocks cross PCIe by DMA: ``read`` goes through a page-locked staging buffer (one per
    thread, grown to the largest block read), ``read_run_into`` and ``write`` copy straight
    from or to the caller's memory, which is DMA speed when that memory is page-locked
    (the host tier's arena is, where CUDA exists) and CUDA's own staging otherwise. Every
    copy has finished when the call returns.

    ``device`` is a torch device; ``"cpu"`` puts the arena in host memory with the same
    code path, which stands in for a GPU where none exists (tests of the tier's logic).
    Raises ``RuntimeError`` for a CUDA device where no GPU is usable.
    """

    name = "gpu"

    def __init__(self, capacity_bytes: int, page_bytes: int = 4 << 20, device: str = "cuda"):
        import torch

        self._torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the GPU tier needs CUDA, and no GPU is usable here")
        super().__init__(capacity_bytes, page_bytes)
        self._arena = torch.empty(max(self.capacity_bytes, 1), dtype=torch.uint8, device=self.device)
        self._pin = self.device.type == "cuda"
        self._local = threading.local()

    def _host(self, buffer, nbytes: int):
        """A uint8 tensor over the first ``nbytes`` of a host buffer (no copy)."""
        with warnings.catch_warnings():  # read-only bytes: torch warns, but only reads them
            warnings.simplefilter("ignore", UserWarning)
            return self._torch.frombuffer(buffer, dtype=self._torch.uint8, count=nbytes)

    def _staging(self, nbytes: int):
        buf = getattr(self._local, "staging", None)
        if buf is None or buf.numel() < nbytes:
            size = max(nbytes, self.allocator.min_slot_bytes)
            buf = self._torch.empty(size, dtype=self._torch.uint8, pin_memory=self._pin)
            self._local.staging = buf
        return buf[:nbytes]

    def _write(self, slot: Slot, data: bytes | memoryview) -> None:
        n = len(data)
        if n:
            self._arena[slot.offset:slot.offset + n].copy_(self._host(data, n))

    def _read(self, slot: Slot, nbytes: int) -> bytes:
        staging = self._staging(nbytes)
        staging.copy_(self._arena[slot.offset:slot.offset + nbytes])
        return staging.numpy().tobytes()

    def _read_into(self, slot: Slot, nbytes: int, dest: memoryview) -> None:
        if nbytes:
            self._host(dest, nbytes).copy_(self._arena[slot.offset:slot.offset + nbytes])

    def close(self) -> None:
        self._arena = None
        self._local = threading.local()
