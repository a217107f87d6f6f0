"""One engine step's KV loads, layer by layer (for the connector's load side).

``LayerLoad.start`` leases every block the step loads (one ``Locate`` call), then reads
each layer's blocks in layer order on a background thread, with the transfer backend the
worker and the store share (shared memory, NIXL or gRPC streaming; plain ``Get`` when the
store offers none, in as many calls as keep each reply within the message limit).
``write_layer`` waits for one layer's bytes (until the step's deadline), verifies each
block's checksum and copies the good ones into the paged cache, so the forward pass
computes layer *l* while layer *l+1* is still in flight.
``finish`` waits out the rest, releases the lease and says which blocks failed: a block
fails if any of its layers did, and every block after it in its request fails too (vLLM
recomputes from the first failed block). Nothing here raises on a transfer failure.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kvmesh.engine_host.metadata import LoadStats
from kvmesh.engine_host.paged_layout import block_nbytes, write_blocks
from kvmesh.kv_store.client import StoreClient, StoreError
from kvmesh.kv_store.integrity import verify
from kvmesh.kv_store.keys import KeySpace

log = logging.getLogger("kvmesh.connector")


@dataclass
class _Request:
    req_id: str
    block_ids: list[int]
    hashes: list[bytes]
    bad: set[int] = field(default_factory=set)  # indices of blocks some layer failed


class ReaderCache:
    """Transfer readers by store descriptor, opened on first use and kept (each sending
    the cluster ``secret`` where its backend asks for one); and the one buffer reads land
    in (``scratch``)."""

    def __init__(self, preference: Sequence[str], secret: str | None = None):
        self.preference = tuple(preference)
        self.secret = secret
        self._readers: dict[bytes, object] = {}
        self._scratch = bytearray(0)

    def scratch(self, nbytes: int) -> memoryview:
        """``nbytes`` of the receive buffer, for one read at a time (the loader's thread).
        It is kept from load to load, and grows, never shrinks: a reader that registers
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
                 executor: cf.Executor, timeout_s: float):
        self.store, self.readers, self.space = store, readers, space
        self.layers, self.caches, self.block_dims = layers, caches, block_dims
        self.executor, self.timeout_s = executor, timeout_s
        self.requests: list[_Request] = []
        self._futures: dict[str, cf.Future] = {}
        self._written: set[str] = set()
        self._lease: bytes | None = None
        self._backend = "get"
        self._nbytes = 0
        self._wait_s = 0.0
        self._start = 0.0
        self._done_at = 0.0
        self._deadline = 0.0

    def _key(self, h: bytes, name: str) -> bytes:
        return self.space.key(h, self.layers[name])

    def start(self, transfers: Sequence) -> None:
        """Lease the blocks of ``transfers`` and start reading them, first layer first."""
        self.requests = [_Request(t.req_id, list(t.block_ids), list(t.hashes)) for t in transfers]
        self._start = time.monotonic()
        self._deadline = self._start + self.timeout_s
        names = sorted(self.caches, key=self.layers.__getitem__)
        keys = [self._key(h, n) for r in self.requests for h in r.hashes for n in names]
        try:
            located = self.store.locate(keys, lease_s=2 * self.timeout_s)
        except StoreError as e:
            log.warning("store locate failed, blocks will be recomputed: %s", e)
            for r in self.requests:
                r.bad.update(range(len(r.hashes)))
            return
        self._lease = located.lease_id or None
        chosen = self.readers.reader_for(located.offers) if located.offers else None
        if chosen is None:  # no shared backend: the plain Get API, all layers at once
            self._backend = "get"
            nbytes = {n: block_nbytes(self.caches[n], self.block_dims[n]) for n in names}
            sizes = [nbytes[n] for r in self.requests for _ in r.hashes for n in names]
            everything = self.executor.submit(self._get, keys, sizes)
            self._futures = {n: everything for n in names}
            return
        self._backend, reader = chosen
        for name in names:
            wanted = [(k, located.extents[k]) for k in (self._key(h, name) for r in self.requests
                                                        for h in r.hashes) if k in located.extents]
            self._futures[name] = self.executor.submit(self._read, reader, wanted)

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def _get(self, keys: list[bytes], sizes: list[int]) -> dict[bytes, bytes]:
        """Every layer's blocks through Get: as many calls as the message limit needs
        (blocks first, then layers, so that each call brings whole leading blocks), all
        within the step's deadline."""
        result = self.store.get(keys, sizes, deadline=self._deadline)
        self._nbytes += sum(len(b.data) for b in result.blocks.values())
        self._done_at = time.monotonic()
        return {k: b.data for k, b in result.blocks.items()}

    def _read(self, reader, wanted: list[tuple[bytes, tuple[int, int, int]]]) -> dict[bytes, bytes]:
        from kvmesh.kv_store.transfer import Extent, ReaderBroken, TransferError

        total = sum(size for _, (_, size, _) in wanted)
        dest = self.readers.scratch(total)
        try:
            reader.read([Extent(off, size) for _, (off, size, _) in wanted], dest,
                        deadline_s=self._remaining(), lease=self._lease or b"")
        except TransferError as e:
            log.warning("%s transfer failed, blocks will be recomputed: %s", self._backend, e)
            if isinstance(e, ReaderBroken):  # the next load attaches a new one
                self.readers.drop(reader)
            return {}
        out, pos = {}, 0
        for key, (_, size, crc) in wanted:
            piece = bytes(dest[pos:pos + size])
            pos += size
            if verify(piece, crc):
                out[key] = piece
        self._nbytes += total
        self._done_at = time.monotonic()
        return out

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
        self._wait_s += time.monotonic() - waited
        for r in self.requests:
            ids, data = [], []
            for i, h in enumerate(r.hashes):
                block = found.get(self._key(h, name))
                if block is None:
                    r.bad.add(i)
                else:
                    ids.append(r.block_ids[i])
                    data.append(block)
            try:
                write_blocks(self.caches[name], self.block_dims[name], ids, data)
            except ValueError as e:  # a layout mismatch: treat as missing
                log.warning("layer %s: %s", name, e)
                r.bad.update(range(len(r.hashes)))

    def finish(self, on_failed: Callable[[str, list[int]], None]) -> dict[str, LoadStats]:
        """Complete every layer, release the lease, report failed blocks per request."""
        for name in sorted(self._futures, key=self.layers.__getitem__):
            self.write_layer(name)
        if self._lease is not None:
            try:
                self.store.release(self._lease)
            except StoreError as e:  # the lease expires on its own
                log.warning("lease release failed: %s", e)
            self._lease = None
        transfer_s = max(0.0, (self._done_at or time.monotonic()) - self._start)
        stats = {}
        for r in self.requests:
            if r.bad:
                on_failed(r.req_id, r.block_ids[min(r.bad):])
            stats[r.req_id] = LoadStats(self._backend, self._nbytes, transfer_s, self._wait_s)
        self.requests = []
        return stats
