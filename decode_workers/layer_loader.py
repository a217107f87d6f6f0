"""One engine step's KV loads, layer by layer (for the connector's load side).

``LayerLoad.start`` leases every block the step loads (one ``Locate`` call), then reads
each layer's blocks in layer order on a background thread, with the transfer backend the
worker and the store share (shared memory, NIXL or gRPC streaming; plain ``Get`` when the
store offers none, in as many calls as keep each reply within the message limit), each
layer into a region of its own of one receive buffer, and verifies each block's checksum
where it landed. Where the reader lends the store's arena itself (shared memory:
``Reader.mapped``) nothing is copied on that thread: each block's checksum is verified
where the block lies in the arena, which the lease keeps still until ``finish``.
``write_layer`` waits for one layer's bytes (until the step's deadline) and copies the
good blocks from that buffer, or from the arena, into the paged cache, one copy per run
of consecutive blocks, so the forward pass computes layer *l* while layer *l+1* is still
in flight (``write_all``: every layer, before the forward pass computes). A block is
copied only once its checksum held; one that failed is never copied.
``finish`` waits out the rest, releases the lease and says which blocks failed: a block
fails if any of its layers did, and every block after it in its request fails too (vLLM
recomputes from the first failed block). Nothing here raises on a transfer failure.

A load whose blocks another tensor-parallel split stored (its ``shard_heads`` not this
rank's) reads, per block and layer, every shard of that split that holds some of this
rank's heads (``engine_host.head_split.covering``) and builds the rank's block from them
on the way into the cache (``engine_host.paged_layout.gather_heads``): a slice of one
shard, or several gathered. A block missing any of those shards fails like a missing one.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence, TypeVar

import torch

from kvmesh.engine_host import head_split
from kvmesh.engine_host.metadata import LoadStats
from kvmesh.engine_host.paged_layout import (block_nbytes, gather_heads, head_axis, place_at, place_heads,
                                             write_blocks)
from kvmesh.kv_store.client import StoreClient, StoreError
from kvmesh.kv_store.integrity import verify
from kvmesh.kv_store.keys import KeySpace

log = logging.getLogger("kvmesh.connector")
T = TypeVar("T")


@dataclass
class _Request:
    req_id: str
    block_ids: list[int]
    hashes: list[bytes]
    keys: dict[str, list[bytes]] = field(default_factory=dict)  # per layer of its group, each block's key
    bad: set[int] = field(default_factory=set)  # indices of blocks some layer failed
    shard_heads: int = 0  # the shard size the blocks are stored in
    # per layer, per block, the other split's shards to gather: (key, part); empty when
    # the blocks are stored in this rank's own shards
    parts: dict[str, list[list[tuple[bytes, head_split.Part]]]] = field(default_factory=dict)

    def read_keys(self, name: str, i: int) -> list[bytes]:
        """The keys block ``i`` of layer ``name`` is read from."""
        if self.parts:
            return [k for k, _ in self.parts[name][i]]
        return [self.keys[name][i]]


def _present(r: _Request, keys: Iterable[bytes], got: Mapping[bytes, T]) -> tuple[list[int], list[T]]:
    """For each block of ``r`` in order, its key in ``keys``: the block ids whose key was
    read (in ``got``: its offset, or its bytes) and what ``got`` holds for them; the
    blocks whose key was not are marked bad."""
    ids, picked = [], []
    for i, key in enumerate(keys):
        row = got.get(key)
        if row is None:
            r.bad.add(i)
        else:
            ids.append(r.block_ids[i])
            picked.append(row)
    return ids, picked


class _LayerBytes(NamedTuple):
    """One layer's blocks of one size as read: ``data`` holds them, whole blocks (back to
    back in the receive buffer, ``count`` of them; or where they lie in the store's
    arena); ``rows`` maps the key of each block that arrived and verified to its byte
    offset in ``data``."""

    data: memoryview | bytearray
    count: int
    rows: dict[bytes, int]


_NOTHING = _LayerBytes(bytearray(0), 0, {})


def coalesce(extents: list) -> list:
    """``extents`` with each run of adjacent ones (the next starting where the previous
    ends) merged into one: the same bytes land in the same order, in fewer copies."""
    from kvmesh.kv_store.transfer import Extent

    out: list = []
    for e in extents:
        if out and out[-1].offset + out[-1].size == e.offset:
            out[-1] = Extent(out[-1].offset, out[-1].size + e.size)
        else:
            out.append(e)
    return out


class ReaderCache:
    """Transfer readers by store descriptor, opened on first use and kept (each sending
    the cluster ``secret`` where its backend asks for one); and the one buffer a step's
    reads land in (``scratch``), each layer in a region of its own."""

    def __init__(self, preference: Sequence[str], secret: str | None = None):
        self.preference = tuple(preference)
        self.secret = secret
        self._readers: dict[bytes, object] = {}
        self._scratch = bytearray(0)

    def scratch(self, nbytes: int) -> memoryview:
        """``nbytes`` of the receive buffer, for one step's load at a time (on the loader's
        thread, the size of the whole step each time). It is kept from load to load, and grows, never shrinks: a reader that registers
        its destinations (NIXL) registers it once, and never holds the registration of
        memory that was freed and handed out again (a fresh buffer per read would often
        land at a freed one's address). When it grows, the readers let the old one go."""
        if len(self._scratch) < nbytes:
            old, self._scratch = self._scratch, bytearray(max(nbytes, 2 * len(self._scratch)))
            for reader in self._readers.values():
                if old and hasattr(reader, "unregister"):
                    reader.unregister(old)
        return memoryview(self._scratch)[:nbytes]

    def reader_for(self, offers: dict[str, bytes]) -> tuple[str, object] | None:
        from kvmesh.kv_store.transfer import TransferError, choose_backend, open_reader, usable_backends

        try:
            backend, _ = choose_backend(usable_backends(offers), offers, self.preference)
        except ValueError:
            return None
        descriptor = offers[backend]
        if descriptor not in self._readers:
            try:
                self._readers[descriptor] = open_reader(descriptor, secret=self.secret)
            except TransferError as e:
                log.warning("cannot attach a %s reader: %s", backend, e)
                return None
        return backend, self._readers[descriptor]

    def drop(self, reader) -> None:
        for descriptor, r in list(self._readers.items()):
            if r is reader:
                del self._readers[descriptor]
                try:
                    r.close()
                except Exception:
                    pass

    def close(self) -> None:
        for reader in list(self._readers.values()):
            self.drop(reader)
        self._scratch = bytearray(0)


class LayerLoad:
    def __init__(self, store: StoreClient, readers: ReaderCache, space: KeySpace,
                 layers: dict[str, int], caches: dict[str, torch.Tensor], block_dims: dict[str, int],
                 executor: cf.Executor, timeout_s: float, groups: dict[str, int] | None = None):
        """``groups``: each layer's KV-cache group (None: one group); a transfer moves the
        layers of its group."""
        self.store, self.readers, self.space = store, readers, space
        self.groups = groups or {}
        self.layers, self.caches, self.block_dims = layers, caches, block_dims
        self.executor, self.timeout_s = executor, timeout_s
        self._own_heads = space.heads[1] - space.heads[0]
        self.requests: list[_Request] = []
        self._futures: dict[str, cf.Future] = {}
        self._written: set[str] = set()
        self._lease: bytes | None = None
        self._backend = "get"
        self._in_place = False  # blocks verified and copied where they lie in the store's arena
        self._nbytes = 0
        self._wait_s = 0.0
        self._start = 0.0
        self._done_at = 0.0   # the last layer's bytes read and verified
        self._placed_at = 0.0  # the last block copied into the paged cache
        self._deadline = 0.0
        self._spent = {"locate": 0.0, "read": 0.0, "verify": 0.0, "copy": 0.0}

    def start(self, transfers: Sequence) -> None:
        """Lease the blocks of ``transfers`` and start reading them, first layer first."""
        self._start = time.monotonic()
        self._deadline = self._start + self.timeout_s
        names = sorted(self.caches, key=self.layers.__getitem__)
        self.requests = [_Request(t.req_id, list(t.block_ids), list(t.hashes),
                                  shard_heads=getattr(t, "shard_heads", 0) or self._own_heads)
                         for t in transfers]
        for r, t in zip(self.requests, transfers):
            mine = [n for n in names if self.groups.get(n, 0) == getattr(t, "group", 0)]  # its group's layers
            r.keys = {n: [self.space.key(h, self.layers[n]) for h in r.hashes] for n in mine}
            if r.shard_heads != self._own_heads:  # another split's shards: the parts to gather
                r.parts = {n: [[(replace(self.space, heads=p.shard).key(h, self.layers[n]), p)
                                for p in head_split.covering(self.space.heads, r.shard_heads)]
                               for h in r.hashes] for n in mine}
        # blocks first, then layers (the Get path brings whole leading blocks per call)
        keys = [k for r in self.requests for i in range(len(r.hashes)) for n in names if n in r.keys
                for k in r.read_keys(n, i)]
        try:
            located = self.store.locate(keys, lease_s=2 * self.timeout_s)
        except StoreError as e:
            log.warning("store locate failed, blocks will be recomputed: %s", e)
            for r in self.requests:
                r.bad.update(range(len(r.hashes)))
            return
        finally:
            self._spent["locate"] += time.monotonic() - self._start
        self._lease = located.lease_id or None
        sizes = {n: block_nbytes(self.caches[n], self.block_dims[n]) for n in names}

        def expected(r: _Request, n: str) -> int:  # a shard of s heads is s/own of a block of this rank's
            return sizes[n] * r.shard_heads // self._own_heads

        chosen = self.readers.reader_for(located.offers) if located.offers else None
        if chosen is None:  # no shared backend: the plain Get API, all layers at once
            self._backend = "get"
            expect = {k: expected(r, n) for r in self.requests for i in range(len(r.hashes))
                      for n in r.keys for k in r.read_keys(n, i)}
            everything = self.executor.submit(self._get, keys, [expect[k] for k in keys])
            self._futures = {n: everything for n in names}
            return
        self._backend, reader = chosen
        # another split's shards are gathered from the receive buffer, where they lie back to back
        self._in_place = not any(r.parts for r in self.requests)
        # a block stored at another size (another layout) counts as missing; each layer's
        # blocks are read in runs of one size (own blocks, then each other shard size)
        runs: dict[str, dict[int, list]] = {n: {} for n in names}
        extents = located.extents
        for n in names:
            for r in self.requests:
                if n not in r.keys:
                    continue
                size = expected(r, n)
                wanted = runs[n].setdefault(size, [])
                for k in (k for parts in r.parts[n] for k, _ in parts) if r.parts else r.keys[n]:
                    if (e := extents.get(k)) is not None and e[1] == size:
                        wanted.append((k, e))
        runs = {n: {size: w for size, w in by_size.items() if w} for n, by_size in runs.items()}
        total = sum(size * len(wanted) for n in names for size, wanted in runs[n].items())
        offset = 0
        for name in names:
            self._futures[name] = self.executor.submit(self._read_runs, reader, runs[name], total, offset)
            offset += sum(size * len(wanted) for size, wanted in runs[name].items())

    def _read_runs(self, reader, runs: dict[int, list], total: int, offset: int) -> dict[int, _LayerBytes]:
        """One layer's blocks, a run per block size (``_read``), back to back from ``offset``."""
        out = {}
        for size, wanted in runs.items():
            out[size] = self._read(reader, wanted, size, total, offset)
            offset += size * len(wanted)
        return out

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def _get(self, keys: list[bytes], sizes: list[int]) -> dict[bytes, bytes]:
        """Every layer's blocks through Get: as many calls as the message limit needs
        (blocks first, then layers, so that each call brings whole leading blocks), all
        within the step's deadline. The store client verifies them."""
        began = time.monotonic()
        result = self.store.get(keys, sizes, deadline=self._deadline)
        self._nbytes += sum(len(b.data) for b in result.blocks.values())
        self._done_at = time.monotonic()
        self._spent["read"] += self._done_at - began
        return {k: b.data for k, b in result.blocks.items()}

    def _read(self, reader, wanted: list[tuple[bytes, tuple[int, int, int]]], block_bytes: int,
              total: int, offset: int) -> _LayerBytes:
        """One layer's blocks (each ``block_bytes`` long), read back to back into the
        layer's region of the step's receive buffer (``total`` bytes, the region from
        ``offset``) and verified there; or, where the reader lends the store's arena and
        the load reads in place, verified where they lie in it (the lease keeps them
        still), nothing copied. On the loader's thread, as every read and every change of
        the buffer is (a reader that registers it sees one at a time)."""
        from kvmesh.kv_store.transfer import Extent, ReaderBroken, TransferError

        extents = coalesce([Extent(off, size) for _, (off, size, _) in wanted])
        began = time.monotonic()
        data = None
        try:
            if self._in_place:
                data = reader.mapped(extents, self._remaining())  # checked; nothing moves
            if data is None:
                data = self.readers.scratch(total)[offset:offset + block_bytes * len(wanted)]
                reader.read(extents, data, deadline_s=self._remaining(), lease=self._lease or b"")
                starts = range(0, block_bytes * len(wanted), block_bytes)
            else:
                starts = [off for _, (off, _, _) in wanted]
        except TransferError as e:
            log.warning("%s transfer failed, blocks will be recomputed: %s", self._backend, e)
            if isinstance(e, ReaderBroken):  # the next load attaches a new one
                self.readers.drop(reader)
            return _NOTHING
        finally:
            read_at = time.monotonic()
            self._spent["read"] += read_at - began
        rows = {key: at for (key, (_, _, crc)), at in zip(wanted, starts)
                if verify(data[at:at + block_bytes], crc)}
        self._nbytes += block_bytes * len(wanted)
        self._done_at = time.monotonic()
        self._spent["verify"] += self._done_at - read_at
        return _LayerBytes(data, len(wanted), rows)

    def write_all(self) -> None:
        """Wait for every layer's bytes and copy them into the cache, first layer first
        (loading everything before the forward pass computes)."""
        for name in sorted(self._futures, key=self.layers.__getitem__):
            self.write_layer(name)

    def write_layer(self, name: str) -> None:
        """Wait for layer ``name``'s bytes and copy the good blocks into its cache."""
        future = self._futures.get(name)
        if future is None or name in self._written:
            return
        self._written.add(name)
        waited = time.monotonic()
        try:
            found = future.result(timeout=self._remaining())
        except (cf.TimeoutError, StoreError) as e:
            log.warning("layer %s did not arrive in time: %s", name, e)
            found = {}
        copying = time.monotonic()
        self._wait_s += copying - waited
        if self._backend == "get":
            self._write_got(name, found)
        else:
            self._place(name, found)
        self._placed_at = time.monotonic()
        self._spent["copy"] += self._placed_at - copying

    def _place(self, name: str, by_size: dict[int, _LayerBytes]) -> None:
        cache, dim = self.caches[name], self.block_dims[name]
        layer = by_size.get(block_nbytes(cache, dim), _NOTHING)
        for r in self.requests:
            if name not in r.keys:  # another group's layer
                continue
            if r.parts:
                self._place_parts(name, r, by_size)
                continue
            ids, offsets = _present(r, r.keys[name], layer.rows)
            if ids:
                place_at(cache, dim, ids, layer.data, offsets)

    def _place_parts(self, name: str, r: _Request, by_size: dict[int, _LayerBytes]) -> None:
        """Copy each block of ``r`` in layer ``name`` from another split's shards as read:
        part by part (the same parts for every block), one copy per part for all blocks
        that have it; a block missing any part fails (it is recomputed whole, so the
        parts that did land in it are overwritten)."""
        cache, dim = self.caches[name], self.block_dims[name]
        nbytes = block_nbytes(cache, dim) * r.shard_heads // self._own_heads
        got = by_size.get(nbytes, _NOTHING)
        try:
            axis = head_axis(cache, dim, self._own_heads)
        except ValueError as e:  # a layout this cannot re-slice: treat as missing
            log.warning("layer %s: %s", name, e)
            r.bad.update(range(len(r.hashes)))
            return
        shape = [n for d, n in enumerate(cache.shape) if d != dim]
        shape[axis] = r.shard_heads
        shards = (torch.frombuffer(got.data, dtype=torch.uint8)[:got.count * nbytes].view(cache.dtype)
                  .reshape(got.count, *shape)) if got.count else None
        at = 0
        for j, (_, part) in enumerate(r.parts[name][0] if r.parts[name] else []):
            ids, offsets = _present(r, (parts[j][0] for parts in r.parts[name]), got.rows)
            if ids:  # the shards were read into the buffer, back to back (never in place)
                place_heads(cache, dim, axis, ids, shards, [o // nbytes for o in offsets], part.lo, part.hi, at)
            at += part.hi - part.lo

    def _write_got(self, name: str, found: dict[bytes, bytes]) -> None:
        for r in self.requests:
            if name not in r.keys:
                continue
            if r.parts:
                self._gather(name, r, lambda key, nbytes: bytearray(found[key]) if key in found else None)
                continue
            ids, data = _present(r, r.keys[name], found)
            try:
                write_blocks(self.caches[name], self.block_dims[name], ids, data)
            except ValueError as e:  # a layout mismatch: treat as missing
                log.warning("layer %s: %s", name, e)
                r.bad.update(range(len(r.hashes)))

    def _gather(self, name: str, r: _Request, fetch) -> None:
        """Build each block of ``r`` in layer ``name`` from another split's shards (``fetch(key,
        nbytes)``: a shard's verified bytes, or None; the ``Get`` path's) and copy it into
        the cache; a block missing any shard fails."""
        cache, dim = self.caches[name], self.block_dims[name]
        nbytes = block_nbytes(cache, dim) * r.shard_heads // self._own_heads
        ids, blocks = [], []
        try:
            axis = head_axis(cache, dim, self._own_heads)
            for i, parts in enumerate(r.parts[name]):
                pieces = [(fetch(key, nbytes), part) for key, part in parts]
                if any(data is None for data, _ in pieces):
                    r.bad.add(i)
                    continue
                ids.append(r.block_ids[i])
                blocks.append(gather_heads(cache, dim, axis, r.shard_heads, pieces))
        except ValueError as e:  # a layout this cannot re-slice: treat as missing
            log.warning("layer %s: %s", name, e)
            r.bad.update(range(len(r.hashes)))
            return
        if ids:  # built on the CPU, back to back
            size = block_nbytes(cache, dim)
            place_at(cache, dim, ids, torch.stack(blocks).view(torch.uint8).numpy().reshape(-1),
                     range(0, size * len(ids), size))

    def finish(self, on_failed: Callable[[str, list[int]], None]) -> dict[str, LoadStats]:
        """Complete every layer, release the lease, report failed blocks per request."""
        self.write_all()
        if self._lease is not None:
            try:
                self.store.release(self._lease)
            except StoreError as e:  # the lease expires on its own
                log.warning("lease release failed: %s", e)
            self._lease = None
        transfer_s = max(0.0, (self._done_at or time.monotonic()) - self._start)
        placed_s = max(0.0, (self._placed_at or time.monotonic()) - self._start)
        spent = self._spent
        stats = {}
        for r in self.requests:
            if r.bad:
                on_failed(r.req_id, r.block_ids[min(r.bad):])
            stats[r.req_id] = LoadStats(self._backend, self._nbytes, transfer_s, self._wait_s, placed_s,
                                        spent["locate"], spent["read"], spent["verify"], spent["copy"])
        self.requests = []
        self._futures = {}  # the layers' bytes (a view of a lent arena among them) go now
        return stats
