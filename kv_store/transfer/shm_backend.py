"""Same-host transfer through named shared memory: the reader maps the store's arena.

The store's host tier is created with ``HostTier(..., shm_name=NAME)``: its arena is the
file ``/dev/shm/NAME``. The descriptor names that file and identifies it (device, inode,
size, the host's boot id), so a reader never maps a different segment that took the
name later, nor one on another host. The reader maps it read-only, with its page tables
populated up front, and a read is plain memory copies (memoryview slices) cut into
pieces of at most ``piece_bytes``, with the deadline checked between pieces; or no copy
at all (``mapped``: the reader lends the mapping, read in place).

Liveness: the tier holds a shared ``flock`` on the segment while it is open. Before and
after copying, the reader tries an exclusive non-blocking lock: if it gets it, no owner
is alive (the store process exited or was killed) and the read fails with
``TransferError``: bytes of a dead store are not served, whatever the mapping still
shows.

The source's ``close`` unlinks the name (no new reader can attach); readers already
attached keep their mapping until they close, as with any shared memory.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from typing import Sequence

from kvmesh.kv_store.tiers import HostTier, shm_path, unlink_shm_if_same
from kvmesh.kv_store.transfer.base import (
    Deadline, Extent, Reader, ReaderBroken, SourceRegion, TransferError, check_dest, check_extents,
    decode_descriptor, encode_descriptor,
)

NAME = "shm"
PIECE_BYTES = 8 << 20  # copied between deadline checks: ~1-2 ms at memory speed


def boot_id() -> str:
    """Identifies this host's running kernel: equal on both sides means the same host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class ShmSource(SourceRegion):
    """Exposes a shared-memory host tier (``HostTier(..., shm_name=...)``) to readers on
    this host. Close it before the tier."""

    name = NAME

    def __init__(self, tier: HostTier):
        if getattr(tier, "shm_name", None) is None:
            raise ValueError("the shm backend needs a host tier created with shm_name=...")
        self.shm_name = tier.shm_name
        self.path = shm_path(self.shm_name)
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        self.region_bytes = len(tier.buffer())
        self._descriptor = encode_descriptor(
            NAME, name=self.shm_name, size=self.region_bytes, dev=st.st_dev, ino=st.st_ino,
            boot=boot_id())
        self._lock = threading.Lock()

    def descriptor(self) -> bytes:
        return self._descriptor

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            unlink_shm_if_same(self.shm_name, self._fd)
            os.close(self._fd)
            self._fd = None


class ShmReader(Reader):
    """Maps a ``ShmSource``'s segment read-only and copies extents out of it."""

    name = NAME

    def __init__(self, descriptor: bytes | dict, populate: bool = True,
                 piece_bytes: int = PIECE_BYTES):
        d = descriptor if isinstance(descriptor, dict) else decode_descriptor(descriptor)
        if d.get("backend") != NAME:
            raise ValueError(f"not a shm descriptor: {d.get('backend')!r}")
        if d.get("boot") and d["boot"] != boot_id():
            raise TransferError(f"shm segment {d['name']!r} is on another host")
        self.shm_name = d["name"]
        self.region_bytes = int(d["size"])
        self.piece_bytes = int(piece_bytes)
        try:
            path = shm_path(self.shm_name)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise TransferError(f"shm segment {self.shm_name!r}: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (d["dev"], d["ino"]) or st.st_size < self.region_bytes:
                raise TransferError(f"shm segment {self.shm_name!r} is not the one described "
                                    "(it was replaced)")
            flags = mmap.MAP_SHARED
            if populate:
                flags |= getattr(mmap, "MAP_POPULATE", 0)
            self._map = mmap.mmap(fd, self.region_bytes, flags=flags, prot=mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._view = memoryview(self._map)
        self._close_lock = threading.Lock()
        try:
            self._check_owner()
        except TransferError:
            self.close()
            raise

    def _check_owner(self) -> None:
        fd = self._fd
        if fd is None:
            raise ReaderBroken("shm reader is closed")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # an owner (or another reader checking) holds it: alive
        except OSError as e:
            raise TransferError(f"shm segment {self.shm_name!r}: {e}") from None
        fcntl.flock(fd, fcntl.LOCK_UN)
        raise ReaderBroken(f"shm segment {self.shm_name!r}: its owner process is gone")

    def read(self, extents: Sequence[Extent], dest, deadline_s: float, lease: bytes = b"") -> None:
        pairs, total = check_extents(extents, self.region_bytes)
        out = check_dest(dest, total)
        deadline = Deadline(deadline_s)
        if self._fd is None:
            raise ReaderBroken("shm reader is closed")
        if total == 0:
            return
        deadline.check("shm read")
        self._check_owner()
        src = self._view
        piece = self.piece_bytes
        pos = since = 0
        try:
            for offset, size in pairs:
                while size:
                    take = size if size <= piece else piece
                    out[pos:pos + take] = src[offset:offset + take]
                    pos += take
                    offset += take
                    size -= take
                    since += take
                    if since >= piece:
                        deadline.check("shm read")
                        since = 0
        except ValueError as e:  # the view was released by a concurrent close
            raise ReaderBroken(f"shm read: {e}") from None
        deadline.check("shm read")
        self._check_owner()

    def mapped(self, extents: Sequence[Extent], deadline_s: float) -> memoryview:
        """The mapped segment (read-only), after the checks ``read`` makes before it copies:
        the extents lie within it, the deadline has not passed, its owner is alive."""
        check_extents(extents, self.region_bytes)
        Deadline(deadline_s).check("shm read")
        self._check_owner()
        return self._view

    def close(self) -> None:
        with self._close_lock:
            if self._fd is None:
                return
            try:
                self._view.release()
                self._map.close()
            except BufferError:  # a view lent by ``mapped`` is still held: its last user unmaps
                pass
            os.close(self._fd)
            self._fd = None
