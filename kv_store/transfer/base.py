"""The transfer interface: a store exposes one memory region, a reader copies ranges of it.

A ``SourceRegion`` lives in the store process and exposes one region (the host tier's
arena) to readers; its ``descriptor()`` is a few hundred bytes of msgpack that tell a
reader in another process how to attach. A ``Reader`` lives in the worker process,
attached to one source region, and copies lists of ``Extent`` s (offset, size ranges of
that region) back to back into its own memory, within a deadline.

Contract of ``Reader.read(extents, dest, deadline_s, lease=b"")``:

* ``deadline_s`` is a duration in seconds from the call (not an absolute time). A value
  that is not positive fails at once.
* ``lease`` is the id of the store's lease (``Locate``) that pins the blocks the extents
  cover. A source that checks leases (``grpc`` in a store) refuses a read any of whose
  extents no live lease of that id covers (``TransferError`` naming
  ``PERMISSION_DENIED``). ``shm`` and ``nixl`` read memory directly and check none: what
  protects them is the host's file permissions and UCX, not the lease (see the README).
* Extents are checked before anything moves: a negative offset or size, or a range past
  the end of the region, or more bytes than ``dest`` holds, raise ``ValueError``.
  Zero-size extents are allowed and move nothing; an empty list returns at once.
* Any failure of the transport (peer gone, refused, disconnected) and the deadline
  passing raise ``TransferError``, never later than the deadline plus the time of one
  bounded piece of work (each backend cuts large reads into pieces for that). After it,
  nothing of that call is still in flight or newly registered; ``dest`` holds
  unspecified bytes.
* When the reader itself is done for (the source went away, or it was closed) the error
  is ``ReaderBroken``; every later read raises it too.
* ``close`` is idempotent; a read after close raises ``ReaderBroken``.

A reader whose source is memory mapped into its own process (``shm``) may also lend that
memory (``Reader.mapped``): the caller then reads the extents in place, with no copy.
"""

from __future__ import annotations

import operator
import time
from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Sequence

import msgpack

DESCRIPTOR_VERSION = 1


class Extent(NamedTuple):
    """A byte range of the source region."""

    offset: int
    size: int


class TransferError(RuntimeError):
    """The transfer failed: peer gone, refused, disconnected, or the deadline passed."""


class ReaderBroken(TransferError):
    """The reader cannot be used again (its source is gone, or it was closed): the caller
    closes it and opens a new one from a fresh descriptor. Other ``TransferError`` s
    concern one call only; the same reader may be tried again."""


class SourceRegion(ABC):
    """The store side: exposes one memory region to readers in other processes."""

    name: str  # backend name: "nixl" | "shm" | "grpc"

    @abstractmethod
    def descriptor(self) -> bytes:
        """What a reader needs to attach (msgpack; ``open_reader`` takes it)."""

    @abstractmethod
    def close(self) -> None:
        """Stop exposing the region (deregister, unlink, stop serving); idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Reader(ABC):
    """The worker side: attached to one source region."""

    name: str
    region_bytes: int  # length of the source region

    @abstractmethod
    def read(self, extents: Sequence[Extent], dest: memoryview, deadline_s: float,
             lease: bytes = b"") -> None:
        """Copy ``extents`` back to back into ``dest`` (see the module's contract)."""

    @abstractmethod
    def close(self) -> None:
        """Detach; idempotent."""

    def mapped(self, extents: Sequence[Extent], deadline_s: float) -> memoryview | None:
        """The source region itself, read-only and mapped into this process, for reading
        ``extents`` where they lie (each at its own offset) instead of copying them out:
        ``None`` where the backend cannot lend it (the default; use ``read``). Checks what
        ``read`` checks before anything moves (``ValueError`` for bad extents,
        ``TransferError`` for a passed deadline, ``ReaderBroken`` for a source gone).
        The bytes hold still only while a lease pins them: the caller verifies their
        checksums before using them, and drops the view, and every array made from it,
        before the reader closes (one still held keeps the mapping alive after ``close``)."""
        return None

    def stats(self) -> dict[str, int]:
        """Bookkeeping for tests and metrics: at least ``registered`` (memory regions this
        reader has registered with a transfer engine) and ``in_flight`` (transfers not
        yet completed or released)."""
        return {"registered": 0, "in_flight": 0}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ helpers for backends


def encode_descriptor(backend: str, **fields: Any) -> bytes:
    return msgpack.packb({"backend": backend, "v": DESCRIPTOR_VERSION, **fields},
                         use_bin_type=True)


_REQUIRED = {"shm": ("name", "size", "dev", "ino"), "nixl": ("md", "base", "size"),
             "grpc": ("address", "size")}


def decode_descriptor(descriptor: bytes) -> dict[str, Any]:
    """The descriptor's fields; ``ValueError`` if it is not a transfer descriptor (or
    lacks a field its backend needs)."""
    try:
        fields = msgpack.unpackb(descriptor, raw=False)
    except Exception as e:
        raise ValueError(f"not a transfer descriptor: {e}") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("backend"), str):
        raise ValueError("not a transfer descriptor: no backend field")
    if fields.get("v") != DESCRIPTOR_VERSION:
        raise ValueError(f"transfer descriptor version {fields.get('v')!r} is not supported "
                         f"(this side speaks {DESCRIPTOR_VERSION})")
    missing = [k for k in _REQUIRED.get(fields["backend"], ()) if k not in fields]
    if missing:
        raise ValueError(f"{fields['backend']} transfer descriptor lacks {', '.join(missing)}")
    return fields


def check_extents(extents: Sequence[Extent], region_bytes: int) -> tuple[list[tuple[int, int]], int]:
    """Validate ``extents`` against a region of ``region_bytes``: the non-empty ones as
    ``(offset, size)`` pairs (adjacent ones merged), and the total size. ``ValueError`` for a negative or
    out-of-range extent or anything that is not a pair of integers."""
    out: list[tuple[int, int]] = []
    total = 0
    for i, extent in enumerate(extents):
        try:
            offset, size = extent
            offset, size = operator.index(offset), operator.index(size)
        except (TypeError, ValueError):
            raise ValueError(f"extent {i}: {extent!r} is not an (offset, size) pair of integers") from None
        if offset < 0 or size < 0:
            raise ValueError(f"extent {i}: negative offset or size ({offset}, {size})")
        if offset + size > region_bytes:
            raise ValueError(f"extent {i}: ({offset}, {size}) goes past the end of the "
                             f"{region_bytes}-byte source region")
        total += size
        if size:
            out.append((offset, size))
    return coalesce(out), total


def check_dest(dest, total: int) -> memoryview:
    """``dest`` as a writable, contiguous byte memoryview of at least ``total`` bytes."""
    view = dest if isinstance(dest, memoryview) else memoryview(dest)
    if view.readonly:
        raise ValueError("dest is read-only")
    if not view.c_contiguous:
        raise ValueError("dest is not C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.nbytes < total:
        raise ValueError(f"dest holds {view.nbytes} bytes; the extents need {total}")
    return view


class Deadline:
    """A monotonic deadline ``seconds`` from now."""

    __slots__ = ("at", "seconds")

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.at = time.monotonic() + self.seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def check(self, what: str) -> float:
        """The seconds left; ``TransferError`` if none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TransferError(f"{what}: deadline of {self.seconds * 1e3:.1f} ms passed")
        return left


def coalesce(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge extents that continue one another in the source (their destinations are
    back to back anyway): blocks written one after the other often sit side by side in
    the arena, and one long copy beats many short ones on every backend."""
    if len(extents) < 2:
        return extents
    out = [extents[0]]
    for offset, size in extents[1:]:
        last_offset, last_size = out[-1]
        if last_offset + last_size == offset:
            out[-1] = (last_offset, last_size + size)
        else:
            out.append((offset, size))
    return out


def split_pieces(extents: list[tuple[int, int]], max_bytes: int):
    """Group extents (cutting large ones) into pieces of at most ``max_bytes`` each.

    Yields lists of ``(source offset, dest offset, size)``; dest offsets run back to back
    from 0 across the whole sequence."""
    piece: list[tuple[int, int, int]] = []
    piece_bytes = 0
    pos = 0
    for offset, size in extents:
        while size:
            take = min(size, max_bytes - piece_bytes)
            piece.append((offset, pos, take))
            piece_bytes += take
            offset += take
            pos += take
            size -= take
            if piece_bytes == max_bytes:
                yield piece
                piece, piece_bytes = [], 0
    if piece:
        yield piece
