"""``kvmesh bench store``: put/get bandwidth of each store tier against its ceiling.

The ceilings are measured in the same run, with the cases they bound: for the host
tier, ``memcpy`` of the same block sizes over the same memory as each case (copies from
the very payloads the case puts into a region of the case's size, and out of it into a
get's result buffers), just before the case; for the disk tier, raw sequential file I/O
(``O_DIRECT`` when the file system allows it, 4 MiB requests) on the same disk, the tier
then also running with ``O_DIRECT``, in bursts between the tier's own calls (16 MiB each
time the case has moved another 16 MiB), so that both see the same disk: a shared disk's
bandwidth drifts by 2x from one second to the next (``RawDisk``); and, where CUDA is
usable, copies of the same block sizes between the host and the device for the GPU
tier, just before the case: host to device from the payloads the case puts (pageable
``bytes``, as callers hand them to the tier), device to host into page-locked memory (as
the tier's gets go through its page-locked staging buffer). The ceiling also names the
file system of the directory (``disk_filesystem``): on a RAM file system (tmpfs, which
accepts ``O_DIRECT`` since Linux 6.6) the disk figures are memory figures
(``disk_is_memory``, and a warning on stderr); without ``O_DIRECT``, reads of blocks just
written are page-cache hits (``disk_direct_io`` false, ``disk_measures``). Each case runs
five rounds with its ceiling; the round with the median ratio is reported. A case's GB/s is its bytes over the time spent in its calls. Every result row
names its ``ceiling_GBps`` and its ratio to it; disk rows also name
``raw_same_requests_GBps``, raw I/O in requests the size of the case's calls, in the
same bursts: what the disk itself gives that pattern (a 64 KiB request at a time reads
at a fraction of the sequential rate), so that the store's own cost shows apart from
the disk's.

It also times host-RAM hits alone and while another thread's leases promote blocks from
disk (``host_hits_under_disk_traffic``): the ratio says how much disk traffic slows a
hit down (the store copies bytes outside its lock, so ideally not at all); and puts into
a full host tier, each of which first demotes a block to disk, against raw disk writes
(``puts_demoting_to_disk``): the write path of a store whose host RAM has filled; and
puts that come in bursts into a host tier that has filled, with and without the demoter
keeping a quarter of it free between bursts (``bursty_puts_with_demote_ahead``): the
ratio of their latencies is what moving blocks down ahead of need saves a put; and how
fast the demoter empties half of a full host tier onto disk, by block size, against raw
sequential disk writes run just before and after it (``demoter_to_disk``).

Last, the encodings a disk tier may hold blocks in (``encodings``): per encoding, the
bytes at rest over the blocks' own (the encoded bytes, and the slots the disk tier gives
them), and encode and decode GB/s (of the blocks' own bytes) against memcpy of the same
blocks, measured just before. The blocks are bf16 values drawn per KV head from normal
distributions of different scales (a stand-in for a real KV cache: how much a real one
compresses depends on the model), and each encoding's blocks also go through a store
whose disk tier holds them so, read back and compared (lossless: equal; int8 and int4: the
largest error relative to the head's largest value).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, NamedTuple

import numpy as np

from kvmesh.bench.stats import percentile
from kvmesh.kv_store.encoding import bf16_to_f32, f32_to_bf16, make_encoding
from kvmesh.kv_store.gc_tuning import freeze_startup_objects
from kvmesh.kv_store.integrity import checksum
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.tiers import DiskTier, GpuTier, HostTier, anonymous_arena

BLOCK_SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20]
PAGE = 4 << 20
GET_BATCH = 8  # keys per call in the batched gets (a request asks for many blocks at once)
PAYLOADS = 8  # distinct blocks the puts cycle through
WRITE_BEHIND = 32 << 20  # staging RAM of the disk tier's write-behind variant
ROUNDS = 5  # each case and its ceiling are measured this many times; the median round is kept
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")  # a "disk" on these is RAM


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def payloads_for(block_bytes: int, total_bytes: int) -> list[bytes]:
    """The few distinct blocks (``os.urandom`` bytes, as a caller hands them over) a case's
    puts cycle through; its ceiling copies from the same objects."""
    count = max(GET_BATCH, total_bytes // block_bytes)
    return [os.urandom(block_bytes) for _ in range(min(count, PAYLOADS))]


def memcpy_gbps(block_bytes: int, total_bytes: int, sources: int | list[bytes],
                destinations: int) -> float:
    """Copies of ``block_bytes`` (``memcpy``, as a memoryview assignment does it, like the
    host tier's), block by block, ``total_bytes`` in all, cycling through the sources and
    ``destinations`` destination blocks (at most the number of copies), in resident maps
    of the kind the host tier's arena is (huge pages where the kernel gives them): the
    memory a tier's case touches, without the tier. ``sources`` is a number of source
    blocks in such a map, or the ``bytes`` objects to copy from (a put case's payloads)."""
    count = max(GET_BATCH, total_bytes // block_bytes)
    n_dst = min(destinations, count)
    dst_map = anonymous_arena(n_dst * block_bytes)
    dst = memoryview(dst_map)
    src_map = None
    views: list[memoryview] = []
    try:
        if isinstance(sources, int):
            n_src = min(sources, count)
            src_map = anonymous_arena(n_src * block_bytes)
            block = os.urandom(block_bytes)
            with memoryview(src_map) as src:
                for i in range(n_src):
                    src[i * block_bytes:(i + 1) * block_bytes] = block
            views = [memoryview(src_map)[i * block_bytes:(i + 1) * block_bytes]
                     for i in range(n_src)]
        else:
            if any(len(p) != block_bytes for p in sources):
                raise ValueError(f"the sources are not all {block_bytes} bytes")
            views = [memoryview(p) for p in sources]
        n_src = len(views)
        start = time.perf_counter()
        for i in range(count):
            d = (i % n_dst) * block_bytes
            dst[d:d + block_bytes] = views[i % n_src]
        return _gbps(count * block_bytes, time.perf_counter() - start)
    finally:
        for v in views:
            v.release()
        dst.release()
        dst_map.close()
        if src_map is not None:
            src_map.close()


def memcpy_cases(block_bytes: int, total_bytes: int,
                 payloads: list[bytes]) -> dict[tuple[str, int], float]:
    """The memcpy ceiling of each host-tier case, keyed ``(op, keys_per_call)``: puts
    copy the case's own ``payloads`` (the same ``bytes`` objects) into a region of the
    case's size; gets copy out of that region into as many result buffers as a call
    returns (the allocator hands the same ones out again, so they may stay in cache)."""
    count = max(GET_BATCH, total_bytes // block_bytes)
    shapes = {("put", 1): (payloads, count), ("get", 1): (count, 1), ("get", GET_BATCH): (count, GET_BATCH)}
    return {case: memcpy_gbps(block_bytes, total_bytes, *shape) for case, shape in shapes.items()}


def gpu_copy_gbps(block_bytes: int, total_bytes: int, payloads: list[bytes],
                  device: str = "cuda") -> tuple[float, float]:
    """Copies of ``block_bytes`` between the host and ``device``, back to back over
    ``total_bytes``: (h2d, d2h) GB/s. Host to device copies from ``payloads``, the
    ``bytes`` objects the GPU tier's put case puts (pageable memory: callers hand the
    tier bytes, and ``GpuTier._write`` copies straight from them), so the put ceiling is
    what CUDA's own staging of pageable memory gives; device to host copies into
    page-locked memory, as the tier's gets do (through its page-locked staging buffer).
    ``device="cpu"`` runs the same code without a GPU (nothing page-locked then)."""
    import warnings

    import torch

    count = max(GET_BATCH, total_bytes // block_bytes)
    cuda = torch.device(device).type == "cuda"
    with warnings.catch_warnings():  # read-only bytes: torch warns, but only reads them
        warnings.simplefilter("ignore", UserWarning)
        sources = [torch.frombuffer(p, dtype=torch.uint8) for p in payloads]
    if any(src.numel() != block_bytes for src in sources):
        raise ValueError(f"the payloads are not all {block_bytes} bytes")
    pinned = torch.empty(block_bytes, dtype=torch.uint8, pin_memory=cuda)
    rows = torch.empty((count, block_bytes), dtype=torch.uint8, device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rows[0].copy_(sources[0])  # warm up the copy engine, both ways
    pinned.copy_(rows[0])
    sync()
    out = []
    for direction in ("h2d", "d2h"):
        start = time.perf_counter()
        for i in range(count):
            if direction == "h2d":
                rows[i].copy_(sources[i % len(sources)])
            else:
                pinned.copy_(rows[i])
        sync()
        out.append(_gbps(count * block_bytes, time.perf_counter() - start))
    return out[0], out[1]


def _cuda_usable() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _open_direct(path: str, flags: int) -> tuple[int, bool]:
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600), True
    except (OSError, AttributeError):
        return os.open(path, flags, 0o600), False


class RawFigures(NamedTuple):
    sequential_GBps: float  # in requests of RawDisk.chunk: the ceiling
    same_requests_GBps: float  # in requests the size of the case's calls (up to a chunk)


class RawDisk:
    """Raw file I/O on a file of its own in the bench's directory, ``O_DIRECT`` when the
    file system allows it, run in bursts between the disk tier's calls so that both see
    the same disk: the tier's ceiling.

    ``owe(case, nbytes, before_burst)`` records that a call of ``case`` (``("put"|"get",
    keys_per_call)``) just wrote or read ``nbytes``. Each time ``burst`` bytes (16 MiB)
    are owed, ``before_burst()`` runs (a case whose writes finish behind its calls
    finishes them there, on its own clock) and then a burst: as many bytes moved raw
    sequentially in requests of ``chunk`` (4 MiB), then in requests the size of the
    case's calls (at most ``chunk``). ``settle(case)`` runs the
    rest and returns both rates (``RawFigures``). Bursts, not a raw request after every
    call: a virtual disk acknowledges writes into a cache and drains it behind them, so a
    request that follows another pays for the one before; in bursts, each kind pays once
    a burst for the kind before it, and the case, ceiling and same-size kinds take turns.
    Each kind goes through its own half of the file in order (not the same bytes twice in
    a row, which the cache would absorb). The file is written through once up front, so
    reads hit written blocks and writes overwrite them, as the tier's do once it has
    filled; that fill is then synced to the disk (``fsync``) and followed by one untimed
    burst of writes, so that the first stretch of a case pays for a burst before it, as
    every later one does, and not for the whole fill's backlog. ``close`` removes it."""

    KINDS = ("sequential", "same")

    def __init__(self, directory: str, total_bytes: int, chunk: int = 4 << 20, burst: int = 16 << 20):
        import mmap

        self.path = os.path.join(directory, "kvmesh-raw-bench.bin")
        self.chunk, self.burst = chunk, burst
        self.size = max(chunk, total_bytes // chunk * chunk)
        self._buf = mmap.mmap(-1, chunk)
        self._buf.write(os.urandom(chunk))
        self._view = memoryview(self._buf)
        self.fd, _ = _open_direct(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        self._pos: dict[str, int] = {}
        self._owed: dict[tuple, int] = {}
        self._call_bytes: dict[tuple, int] = {}
        self._done: dict[tuple, list[float]] = {}  # (case, kind): [bytes, seconds]
        try:
            for offset in range(0, len(self.KINDS) * self.size, chunk):
                os.pwrite(self.fd, self._view, offset)
            os.fsync(self.fd)
            for kind in self.KINDS:  # untimed: the state every later stretch of a case starts from
                for _ in range(0, burst, chunk):
                    self._request(("put", 0), kind, chunk, timed=False)
        except BaseException:
            self.close()
            raise

    def _request(self, case: tuple, kind: str, nbytes: int, timed: bool = True) -> None:
        nbytes = -(-nbytes // 4096) * 4096
        offset = self._pos.get(kind, 0)
        if offset + nbytes > self.size:
            offset = 0
        self._pos[kind] = offset + nbytes
        offset += self.KINDS.index(kind) * self.size
        with self._view[:nbytes] as view:
            start = time.perf_counter()
            if case[0] == "put":  # like the disk tier's writes: no fsync
                os.pwrite(self.fd, view, offset)
            else:
                os.preadv(self.fd, [view], offset)
            seconds = time.perf_counter() - start
        if not timed:
            return
        done = self._done.setdefault((case, kind), [0, 0.0])
        done[0] += nbytes
        done[1] += seconds

    def _burst(self, case: tuple, nbytes: int) -> None:
        for kind, request in (("sequential", self.chunk), ("same", self._call_bytes[case])):
            for start in range(0, nbytes, request):
                self._request(case, kind, min(request, nbytes - start))

    def owe(self, case: tuple, nbytes: int, before_burst: Callable[[], None] = lambda: None) -> None:
        self._call_bytes[case] = min(self.chunk, nbytes)
        owed = self._owed.get(case, 0) + nbytes
        if owed >= self.burst:
            before_burst()
            self._burst(case, owed)
            owed = 0
        self._owed[case] = owed

    def settle(self, case: tuple) -> RawFigures:
        owed = self._owed.pop(case, 0)
        if owed:
            self._burst(case, owed)
        return RawFigures(*(_gbps(*self._done.pop((case, kind), (0, 0.0))) for kind in self.KINDS))

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)
        self._view.release()
        self._buf.close()


def _run_ops(store: TieredStore, tier: str, block_bytes: int, total_bytes: int,
             raw: RawDisk | None = None, payloads: list[bytes] | None = None) -> list[dict]:
    """Puts one block a call, then gets one block a call, then gets ``GET_BATCH`` a call
    (each pass of gets after one untimed call, as in a process that has served gets
    before). The puts' time includes waiting, before each raw burst and at the end, for
    writes a tier finishes behind them (``flush``). With ``raw``, raw I/O of as many
    bytes runs between the calls (untimed here), and each row gets its ``ceiling_GBps``
    (sequential) and ``raw_same_requests_GBps`` from it. The puts cycle through
    ``payloads`` (``payloads_for``; new ones when None)."""
    owe = (lambda case, nbytes, before_burst=None: None) if raw is None else raw.owe
    count = max(GET_BATCH, total_bytes // block_bytes)
    payloads = payloads or payloads_for(block_bytes, total_bytes)
    sums = [checksum(p) for p in payloads]
    keys = [b"bench-%d" % i for i in range(count)]
    results = []
    put_lat = []
    drained = []

    def drain() -> None:  # write-behind: the puts' writes reach the disk on the puts' clock
        t = time.perf_counter()
        if not store.flush():
            raise RuntimeError(f"{tier} tier: staged writes did not reach the disk")
        drained.append(time.perf_counter() - t)

    for i, key in enumerate(keys):
        t = time.perf_counter()
        if not store.put(key, payloads[i % len(payloads)], sums[i % len(sums)]):
            raise RuntimeError(f"{tier} tier refused a {block_bytes}-byte block")
        put_lat.append(time.perf_counter() - t)
        owe(("put", 1), block_bytes, drain)
    drain()
    put_s = sum(put_lat) + sum(drained)
    gets = []
    for per_call in (1, GET_BATCH):
        store.get_many(keys[:per_call])  # untimed: the first call grows the heap for its results
        lat = []
        for i in range(0, count - per_call + 1, per_call):
            batch = keys[i:i + per_call]
            t = time.perf_counter()
            if len(store.get_many(batch)) != len(batch):
                raise RuntimeError(f"{tier} tier lost a block")
            lat.append(time.perf_counter() - t)
            owe(("get", per_call), per_call * block_bytes)
        gets.append(("get", per_call, sum(lat), lat, len(lat) * per_call))
    store.drop()
    for op, per_call, seconds, lat, n in [("put", 1, put_s, put_lat, count), *gets]:
        lat_us = sorted(x * 1e6 for x in lat)
        row = {"tier": tier, "op": op, "block_bytes": block_bytes, "keys_per_call": per_call,
               "GBps": round(_gbps(n * block_bytes, seconds), 3),
               "p50_us": round(statistics.median(lat_us), 1),
               "p99_us": round(percentile(lat_us, 0.99), 1)}
        if raw is not None:
            figures = raw.settle((op, per_call))
            row["ceiling_GBps"] = round(figures.sequential_GBps, 3)
            row["raw_same_requests_GBps"] = round(figures.same_requests_GBps, 3)
        results.append(row)
    return results


def _latencies_us(op, seconds: float, every: float = 1e-3) -> list[float]:
    """Sorted latencies of ``op()`` called once every ``every`` seconds for ``seconds``
    (requests that arrive at intervals, leaving the machine to other work in between)."""
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        op()
        lat.append((time.perf_counter() - t) * 1e6)
        time.sleep(max(0.0, every - (time.perf_counter() - t)))
    return sorted(lat)


def demoting_puts(directory: str, direct: bool, total_bytes: int, block_bytes: int = 1 << 20) -> dict:
    """Puts into a full host tier over a disk tier, one block a call: each put first
    moves the host's least recently used block down to disk (a write straight out of the
    host arena), then copies its own in. Against raw sequential writes run in bursts
    between the calls (``RawDisk``), ``ROUNDS`` rounds, the median ratio kept."""
    host_blocks = 32
    count = host_blocks + max(host_blocks, total_bytes // block_bytes)  # the first host_blocks: untimed
    rounds = []
    for r in range(ROUNDS):
        store = TieredStore([HostTier(host_blocks * block_bytes, PAGE),
                             DiskTier(os.path.join(directory, "kvmesh-demote-bench.bin"),
                                      count * block_bytes, PAGE, direct_io=direct)])
        raw = None
        try:
            raw = RawDisk(directory, total_bytes)  # in here: if it fails, the store's file goes too
            payloads = [os.urandom(block_bytes) for _ in range(PAYLOADS)]
            sums = [checksum(p) for p in payloads]
            for i in range(host_blocks):  # fill host RAM (untimed)
                store.put(b"warm-%d" % i, payloads[i % PAYLOADS], sums[i % PAYLOADS])
            seconds = 0.0
            for i in range(count - host_blocks):
                t = time.perf_counter()
                store.put(b"put-%d" % i, payloads[i % PAYLOADS], sums[i % PAYLOADS])
                seconds += time.perf_counter() - t
                raw.owe(("put", 1), block_bytes)
            ceiling = raw.settle(("put", 1)).sequential_GBps
            gbps = _gbps((count - host_blocks) * block_bytes, seconds)
            rounds.append({"block_bytes": block_bytes, "demotions": store.stats().tiers[0].demotions,
                           "GBps": round(gbps, 3), "ceiling_GBps": round(ceiling, 3),
                           "ratio_to_ceiling": round(gbps / ceiling, 3)})
        finally:
            if raw is not None:
                raw.close()
            store.close()
    return _median_ratio(rounds)


def bursty_puts(directory: str, direct: bool, block_bytes: int = 1 << 20, bursts: int = 12,
                burst_blocks: int = 8, pause_s: float = 0.05, share: float = 0.25) -> dict:
    """Puts in bursts of ``burst_blocks`` with ``pause_s`` between them, into a host tier
    of 32 blocks that has filled, over disk: their latencies without the demoter (each
    put moves a block down first) and with it keeping ``share`` of host RAM free
    (``demote_ahead``; a quarter is one burst), and the ratios of the two."""
    host_blocks = 32
    payloads = [os.urandom(block_bytes) for _ in range(PAYLOADS)]
    sums = [checksum(p) for p in payloads]
    out: dict = {"block_bytes": block_bytes, "burst_blocks": burst_blocks, "pause_ms": pause_s * 1e3,
                 "demote_ahead": share}
    for label, ahead in (("without", 0.0), ("with", share)):
        store = TieredStore([HostTier(host_blocks * block_bytes, PAGE),
                             DiskTier(os.path.join(directory, "kvmesh-bursts-bench.bin"),
                                      (host_blocks + bursts * burst_blocks) * block_bytes, PAGE,
                                      direct_io=direct)], demote_ahead=ahead)
        try:
            for i in range(host_blocks):  # fill host RAM (untimed)
                store.put(b"warm-%d" % i, payloads[i % PAYLOADS], sums[i % PAYLOADS])
            time.sleep(pause_s)
            lat = []
            for b in range(bursts):
                for j in range(burst_blocks):
                    i = b * burst_blocks + j
                    t = time.perf_counter()
                    store.put(b"burst-%d" % i, payloads[i % PAYLOADS], sums[i % PAYLOADS])
                    lat.append((time.perf_counter() - t) * 1e6)
                time.sleep(pause_s)
            lat.sort()
            out[f"{label}_p50_us"] = round(statistics.median(lat), 1)
            out[f"{label}_p99_us"] = round(percentile(lat, 0.99), 1)
            out[f"{label}_demotions_ahead"] = store.stats().tiers[0].demotions_ahead
        finally:
            store.close()
    out["p50_ratio"] = round(out["with_p50_us"] / out["without_p50_us"], 3)
    out["p99_ratio"] = round(out["with_p99_us"] / out["without_p99_us"], 3)
    return out


def demoter_to_disk(directory: str, direct: bool, total_bytes: int,
                    sizes: tuple[int, ...] = (64 << 10, 256 << 10, 1 << 20)) -> list[dict]:
    """Per block size: a host tier of ``total_bytes`` (at least 16 MiB) filled, then the
    demoter asked to keep half of it free; the time until it has moved that half to
    disk (adjacent victims in one request), against raw sequential writes of as many
    bytes, half just before and half just after (``RawDisk``). ``ROUNDS`` rounds, the
    median ratio kept."""
    host_bytes = max(16 << 20, total_bytes // PAGE * PAGE)
    rows = []
    for block_bytes in sizes:
        count = host_bytes // block_bytes
        payload = os.urandom(block_bytes)
        crc = checksum(payload)
        rounds = []
        for _ in range(ROUNDS):
            store = TieredStore([HostTier(host_bytes, PAGE),
                                 DiskTier(os.path.join(directory, "kvmesh-demoter-bench.bin"),
                                          host_bytes, PAGE, direct_io=direct)])
            raw = None
            try:
                # a burst is a quarter of host RAM: half the raw writes run before, half after
                raw = RawDisk(directory, host_bytes // 2, burst=host_bytes // 4)
                for i in range(count):
                    store.put(b"k%d" % i, payload, crc)
                raw.owe(("put", 0), host_bytes // 4)
                start = time.perf_counter()
                store.demote_ahead = 0.5
                while store.stats().tiers[0].demotions_ahead < count // 2:
                    if time.perf_counter() - start > 120:
                        raise RuntimeError("the demoter did not free half of host RAM in 120 s")
                    time.sleep(0.0002)
                gbps = _gbps(count // 2 * block_bytes, time.perf_counter() - start)
                raw.owe(("put", 0), host_bytes // 4)
                ceiling = raw.settle(("put", 0)).sequential_GBps
                rounds.append({"block_bytes": block_bytes, "GBps": round(gbps, 3),
                               "ceiling_GBps": round(ceiling, 3), "ratio_to_ceiling": round(gbps / ceiling, 3)})
            finally:
                if raw is not None:
                    raw.close()
                store.close()
        rows.append(_median_ratio(rounds))
    return rows


def contention(directory: str, direct: bool, block_bytes: int = 1 << 20,
               seconds: float = 1.5) -> dict:
    """Host-RAM hits of one block, one a millisecond, alone and while another thread
    leases eight blocks at a time that are on disk (each lease promotes them, which
    demotes others): their latencies, the ratios of the two (1: disk traffic does not
    slow a host hit down) and how fast the leases moved blocks up from disk."""
    import threading

    host_blocks, cold_blocks = 32, 96
    disk_file = os.path.join(directory, "kvmesh-contention-bench.bin")
    store = TieredStore([HostTier(host_blocks * block_bytes, PAGE),
                         DiskTier(disk_file, (host_blocks + cold_blocks) * block_bytes, PAGE,
                                  direct_io=direct)])
    try:
        payload = os.urandom(block_bytes)
        crc = checksum(payload)
        cold = [b"cold-%d" % i for i in range(cold_blocks)]
        hot = b"hot"
        for key in [*cold, hot]:
            store.put(key, payload, crc)
        _fsync_path(disk_file)  # the fill's demotions reach the disk before the hits alone are timed
        alone = _latencies_us(lambda: store.get(hot), seconds)
        stop = threading.Event()

        def lease_cold() -> None:
            n = 0
            while not stop.is_set():
                lease, _ = store.lease([cold[(n + j) % cold_blocks] for j in range(8)], 5)
                store.release(lease)
                n += 8

        leaser = threading.Thread(target=lease_cold, daemon=True)
        start = time.perf_counter()
        leaser.start()
        try:
            busy = _latencies_us(lambda: store.get(hot), seconds)
        finally:
            stop.set()
            leaser.join()
        promoted_s = time.perf_counter() - start
        if store.tier_of(hot) != "host":
            raise RuntimeError("the hot block left host RAM during the contention run")
        def pct(lat: list[float], q: float) -> float:
            return round(statistics.median(lat) if q == 0.5 else percentile(lat, q), 1)

        promotions = store.stats().tiers[0].promotions
        return {"block_bytes": block_bytes, "promotions": promotions,
                "promoted_GBps": round(_gbps(promotions * block_bytes, promoted_s), 3),
                "alone_p50_us": pct(alone, 0.5), "alone_p99_us": pct(alone, 0.99),
                "with_disk_traffic_p50_us": pct(busy, 0.5), "with_disk_traffic_p99_us": pct(busy, 0.99),
                "p50_ratio": round(pct(busy, 0.5) / pct(alone, 0.5), 2),
                "p99_ratio": round(pct(busy, 0.99) / pct(alone, 0.99), 2)}
    finally:
        store.close()


def run(total_bytes: int = 128 << 20, directory: str | None = None,
        block_sizes: list[int] | None = None, progress=None) -> dict:
    """Measure the ceilings and every tier; the files it writes in ``directory`` (a new
    temporary directory when None, removed afterwards) are gone when it returns."""
    made = directory is None
    directory = directory or tempfile.mkdtemp(prefix="kvmesh-bench-")
    try:
        return _run(total_bytes, directory, block_sizes or BLOCK_SIZES, progress or (lambda msg: None))
    finally:
        if made:
            shutil.rmtree(directory, ignore_errors=True)


def _direct_io_works(directory: str) -> bool:
    """Whether files in ``directory`` open with ``O_DIRECT`` (which says nothing of where
    the bytes go: tmpfs accepts it too; see ``filesystem_of``)."""
    path = os.path.join(directory, "kvmesh-direct-probe.bin")
    fd, direct = _open_direct(path, os.O_RDWR | os.O_CREAT)
    os.close(fd)
    os.unlink(path)
    return direct


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mount_field(field: str) -> str:
    """A path field of mountinfo with its octal escapes (``\\040`` for a space) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_of(path: str, mountinfo: str | None = None) -> str | None:
    """The type of the file system ``path`` is on (``ext4``, ``xfs``, ``tmpfs``...): that
    of the mount whose mount point is the longest one containing the path's real path,
    the last such line where mounts are stacked on one point, from ``mountinfo`` (the
    text of ``/proc/self/mountinfo`` when None). None where that cannot be read (not
    Linux) or no mount matches. (``os.statvfs`` does not give the type.)"""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
        except OSError:
            return None
    target = os.path.realpath(path)
    best_len, fstype = -1, None
    for line in mountinfo.splitlines():
        fields = line.split()
        try:  # ID parent major:minor root mount-point options [optional...] - type source super
            point, kind = _mount_field(fields[4]), fields[fields.index("-", 6) + 1]
        except (IndexError, ValueError):
            continue
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best_len:
            best_len, fstype = len(point), kind
    return fstype


def _disk_measures(direct: bool, filesystem: str | None) -> str:
    """What the disk figures are figures of: ``memory`` (a RAM file system), ``page_cache``
    (no ``O_DIRECT``: reads of blocks just written hit the page cache) or ``device``."""
    if filesystem in MEMORY_FILESYSTEMS:
        return "memory"
    return "device" if direct else "page_cache"


def _ceilings(tier: str, block_bytes: int, total_bytes: int,
              payloads: list[bytes]) -> dict[tuple[str, int], float]:
    """The ceiling of each case of ``tier`` (host or GPU) at ``block_bytes``, keyed
    ``(op, keys_per_call)``: one measurement, taken just before the cases run, the puts'
    from the ``payloads`` the case then puts."""
    if tier == "host":
        return memcpy_cases(block_bytes, total_bytes, payloads)
    write, read = gpu_copy_gbps(block_bytes, total_bytes, payloads)
    return {("put", 1): write, ("get", 1): read, ("get", GET_BATCH): read}


def _one_round(store: TieredStore, tier: str, block_bytes: int, total_bytes: int,
               directory: str) -> list[dict]:
    """Every case of ``tier`` at ``block_bytes`` once, each row with its ceiling: for the
    disk tier, raw I/O run between the tier's calls; otherwise measured just before."""
    payloads = payloads_for(block_bytes, total_bytes)
    if tier != "disk":
        ceilings = _ceilings(tier, block_bytes, total_bytes, payloads)
        rows = _run_ops(store, tier, block_bytes, total_bytes, payloads=payloads)
        for r in rows:
            r["ceiling_GBps"] = round(ceilings[r["op"], r["keys_per_call"]], 3)
        return rows
    raw = RawDisk(directory, total_bytes)
    try:
        return _run_ops(store, tier, block_bytes, total_bytes, raw, payloads)
    finally:
        raw.close()


def _median_round(store: TieredStore, tier: str, block_bytes: int, total_bytes: int,
                  directory: str) -> list[dict]:
    """Each case of ``tier`` at ``block_bytes`` and its ceiling, over ``ROUNDS`` rounds;
    per case the round whose ratio to its ceiling is the median (one lucky or unlucky
    round on a shared machine moves neither the figure nor its ceiling)."""
    by_case: dict[tuple[str, int], list[dict]] = {}
    for _ in range(ROUNDS):
        for r in _one_round(store, tier, block_bytes, total_bytes, directory):
            r["ratio_to_ceiling"] = round(r["GBps"] / r["ceiling_GBps"], 3)
            by_case.setdefault((r["op"], r["keys_per_call"]), []).append(r)
    return [_median_ratio(rows) for rows in by_case.values()]


def _median_ratio(rounds: list[dict]) -> dict:
    """The round whose ``ratio_to_ceiling`` is the median (the upper one of an even count)."""
    return sorted(rounds, key=lambda r: r["ratio_to_ceiling"])[len(rounds) // 2]


ENCODED = ("zstd", "lz4", "int8", "int4")
KV_HEADS = 8  # heads of a stand-in KV block
ENCODED_BLOCK = 64 << 10


def kv_blocks(block_bytes: int, count: int, heads: int = KV_HEADS, seed: int = 0) -> list[bytes]:
    """Stand-in KV blocks: bf16 values, each head's drawn from a normal distribution of
    its own scale."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        scale = rng.uniform(0.05, 4.0, size=(heads, 1)).astype(np.float32)
        values = rng.standard_normal((heads, block_bytes // 2 // heads), dtype=np.float32) * scale
        out.append(f32_to_bf16(values).tobytes())
    return out


def encodings(directory: str, total_bytes: int, block_bytes: int = ENCODED_BLOCK) -> list[dict]:
    """Per encoding: bytes at rest, encode/decode GB/s against memcpy (see the module's
    docstring)."""
    from kvmesh.kv_store.keys import BlockKey

    count = max(GET_BATCH, min(total_bytes // block_bytes, 512))
    blocks = kv_blocks(block_bytes, 2 * PAGE // block_bytes)  # half of them go to disk
    keys = [BlockKey(b"n" * 8, i.to_bytes(16, "big"), (0, 1), (0, KV_HEADS)).to_bytes() for i in range(len(blocks))]
    rows = []
    for name in ENCODED:
        enc = make_encoding(name)
        memcpy = memcpy_gbps(block_bytes, count * block_bytes, blocks, count)
        start = time.perf_counter()
        blobs = [enc.encode(blocks[i % len(blocks)], KV_HEADS) for i in range(count)]
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        for blob in blobs:
            enc.decode(blob)
        decode_s = time.perf_counter() - start
        rest = sum(map(len, blobs[:len(blocks)])) / (len(blocks) * block_bytes)
        # through a store: a host tier of one page, the rest pushed to a disk tier holding them encoded
        tier = DiskTier(os.path.join(directory, f"kvmesh-encoded-{name}.bin"),
                        2 * len(blocks) * block_bytes + 4 * PAGE, PAGE, encoding=enc)
        store = TieredStore([HostTier(PAGE, PAGE), tier])
        try:
            for key, data in zip(keys, blocks):
                store.put(key, data, checksum(data))
            disk = store.stats().tiers[1]
            on_disk = [k for k in keys if store.tier_of(k) == "disk"]
            slots = tier.allocator.slot_bytes
            errors = []
            for key, data in zip(keys, blocks):
                if key in on_disk:
                    got = store.get(key).data
                    if not enc.lossy and got != data:
                        raise RuntimeError(f"{name}: a block read back from the disk tier differs")
                    a = bf16_to_f32(np.frombuffer(data, np.uint16)).reshape(KV_HEADS, -1)
                    b = bf16_to_f32(np.frombuffer(got, np.uint16)).reshape(KV_HEADS, -1)
                    errors.append(float((np.abs(a - b).max(axis=1) / np.abs(a).max(axis=1)).max()))
        finally:
            store.close()
        rows.append({
            "encoding": name, "lossy": enc.lossy, "block_bytes": block_bytes, "heads": KV_HEADS,
            "bytes_at_rest_ratio": round(rest, 4),
            "disk_payload_ratio": round(disk.used_bytes / disk.block_bytes, 4),
            "disk_slot_ratio": round(slots / disk.block_bytes, 4),
            "blocks_on_disk": len(on_disk),
            "encode_GBps": round(_gbps(count * block_bytes, encode_s), 3),
            "decode_GBps": round(_gbps(count * block_bytes, decode_s), 3),
            "memcpy_GBps": round(memcpy, 3),
            "encode_of_memcpy": round(_gbps(count * block_bytes, encode_s) / memcpy, 4),
            "decode_of_memcpy": round(_gbps(count * block_bytes, decode_s) / memcpy, 4),
            "max_relative_error": round(max(errors), 5),
        })
    return rows


def _run(total_bytes: int, directory: str, sizes: list[int], say) -> dict:
    direct = _direct_io_works(directory)
    filesystem = filesystem_of(directory)
    measures = _disk_measures(direct, filesystem)
    if measures == "memory":  # on stderr whatever the output: the JSON on stdout stays clean
        print(f"kvmesh bench: WARNING: {directory} is on {filesystem}, which is RAM: the disk tier's "
              "figures and ceilings will be memory figures, not a disk's (pass --dir on a disk)",
              file=sys.stderr, flush=True)
    capacity = total_bytes + 2 * PAGE * len(sizes)
    disk_file = os.path.join(directory, "kvmesh-tier-bench.bin")
    tiers = [("host", 0, lambda: HostTier(capacity, PAGE)),
             ("disk", 0, lambda: DiskTier(disk_file, capacity, PAGE, direct_io=direct)),
             ("disk", WRITE_BEHIND, lambda: DiskTier(disk_file, capacity, PAGE, direct_io=direct,
                                                     write_behind_bytes=WRITE_BEHIND))]
    if _cuda_usable():
        tiers.insert(0, ("gpu", 0, lambda: GpuTier(capacity, PAGE)))
    freeze_startup_objects()  # as a store server does once it is up (torch is imported by now)
    results = []
    for name, behind, make_tier in tiers:
        store = TieredStore([make_tier()])
        label = f"{name} tier" + (f" with {behind >> 20} MiB of write-behind" if behind else "")
        try:
            for size in sizes:
                say(f"{label}, {size >> 10} KiB blocks: its ceiling and the tier, {ROUNDS} rounds")
                rows = _median_round(store, name, size, total_bytes, directory)
                results.extend(r | {"write_behind_bytes": behind} if name == "disk" else r for r in rows)
        finally:
            store.close()
    say("host hits while disk blocks are leased")
    host_hits = contention(directory, direct)
    say("puts into a full host tier, each demoting a block to disk")
    demoting = demoting_puts(directory, direct, total_bytes)
    say("puts in bursts into a full host tier, without and with the demoter")
    bursty = bursty_puts(directory, direct)
    say(f"the demoter emptying half of a full host tier onto disk, {ROUNDS} rounds per block size")
    demoter = demoter_to_disk(directory, direct, total_bytes)
    say(f"encodings of {ENCODED_BLOCK >> 10} KiB blocks at rest: {', '.join(ENCODED)}")
    encoded = encodings(directory, total_bytes)

    def best(tier: str, op: str) -> dict[str, float]:  # per block size, over its cases
        out: dict[str, float] = {}
        for r in results:
            if r["tier"] == tier and (op == "any" or r["op"] == op):
                key = str(r["block_bytes"])
                out[key] = max(out.get(key, 0.0), r["ceiling_GBps"])
        return out

    memcpy = best("host", "any")
    ceilings = {"memcpy_GBps": max(memcpy.values()), "memcpy_GBps_by_block": memcpy,
                "disk_read_GBps": max(best("disk", "get").values()),
                "disk_write_GBps": max(best("disk", "put").values()), "disk_direct_io": direct,
                "disk_filesystem": filesystem, "disk_is_memory": measures == "memory",
                "disk_measures": measures}
    if any(r["tier"] == "gpu" for r in results):
        ceilings["gpu_h2d_GBps_by_block"] = best("gpu", "put")
        ceilings["gpu_d2h_GBps_by_block"] = best("gpu", "get")
    return {
        "ceiling": ceilings,
        "results": results,
        "host_hits_under_disk_traffic": host_hits,
        "puts_demoting_to_disk": demoting,
        "bursty_puts_with_demote_ahead": bursty,
        "demoter_to_disk": demoter,
        "encodings": encoded,
        "config": {"total_bytes_per_case": total_bytes, "page_bytes": PAGE},
    }


def print_table(report: dict) -> None:
    c = report["ceiling"]
    print(f"ceilings: memcpy up to {c['memcpy_GBps']} GB/s, disk read {c['disk_read_GBps']} GB/s, "
          f"disk write {c['disk_write_GBps']} GB/s (O_DIRECT: {c['disk_direct_io']}, "
          f"file system: {c['disk_filesystem']})")
    if c["disk_measures"] == "memory":
        print(f"          the disk figures are MEMORY figures: the directory is on {c['disk_filesystem']}")
    elif c["disk_measures"] == "page_cache":
        print("          the disk figures are PAGE-CACHE figures: without O_DIRECT, reads of blocks "
              "just written come from RAM")
    if "gpu_h2d_GBps_by_block" in c:
        print(f"          host->device up to {max(c['gpu_h2d_GBps_by_block'].values())} GB/s "
              f"(from pageable bytes, as puts hand them), device->host up to "
              f"{max(c['gpu_d2h_GBps_by_block'].values())} GB/s (into page-locked memory)")
    print(f"{'tier':8} {'op':6} {'block':>8} {'GB/s':>8} {'ratio':>6} {'p50 us':>9} {'p99 us':>9} "
          f"{'raw as the calls GB/s':>22}")
    for r in report["results"]:
        op = r["op"] if r["keys_per_call"] == 1 else f"{r['op']}x{r['keys_per_call']}"
        tier = r["tier"] + ("+wb" if r.get("write_behind_bytes") else "")  # with write-behind
        print(f"{tier:8} {op:6} {r['block_bytes'] >> 10:>6}Ki {r['GBps']:>8.2f} "
              f"{r['ratio_to_ceiling']:>6.2f} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} "
              f"{r.get('raw_same_requests_GBps', ''):>22}")
    h = report["host_hits_under_disk_traffic"]
    d = report["puts_demoting_to_disk"]
    print(f"puts of {d['block_bytes'] >> 10} KiB into full host RAM, each demoting one to disk: "
          f"{d['GBps']} GB/s ({d['ratio_to_ceiling']} of raw disk writes)")
    b = report["bursty_puts_with_demote_ahead"]
    print(f"puts of {b['block_bytes'] >> 10} KiB in bursts of {b['burst_blocks']} into full host RAM: "
          f"p50 {b['without_p50_us']} us, with {b['demote_ahead']} of it kept free by the demoter "
          f"{b['with_p50_us']} us (x{b['p50_ratio']}; p99 x{b['p99_ratio']})")
    for r in report["demoter_to_disk"]:
        print(f"the demoter moving {r['block_bytes'] >> 10} KiB blocks to disk: {r['GBps']} GB/s "
              f"({r['ratio_to_ceiling']} of raw sequential writes)")
    for r in report["encodings"]:
        print(f"{r['encoding']}{' (LOSSY)' if r['lossy'] else ''} on {r['block_bytes'] >> 10} KiB blocks: "
              f"{r['bytes_at_rest_ratio']} of the bytes at rest ({r['disk_slot_ratio']} in disk slots); "
              f"encode {r['encode_GBps']} GB/s ({r['encode_of_memcpy']} of memcpy), decode "
              f"{r['decode_GBps']} GB/s ({r['decode_of_memcpy']} of memcpy); largest error "
              f"{r['max_relative_error']} of a head's largest value")
    print(f"host hits of {h['block_bytes'] >> 10} KiB: p50 {h['alone_p50_us']} us alone, "
          f"{h['with_disk_traffic_p50_us']} us while leases promote {h['promoted_GBps']} GB/s from disk "
          f"(x{h['p50_ratio']}; p99 x{h['p99_ratio']})")


def main(as_json: bool, total_bytes: int, directory: str | None) -> None:
    import sys

    progress = None if as_json else (lambda m: print(f"kvmesh bench: {m}", file=sys.stderr, flush=True))
    report = run(total_bytes, directory, progress=progress)
    if as_json:
        print(json.dumps(report))
    else:
        print_table(report)
