"""Transfer backends between real processes: a store stand-in process exposes a
shared-memory host tier through shm, NIXL and gRPC; this process reads from it.

Nothing is mocked: NIXL runs UCX between the two processes, gRPC runs over loopback TCP,
shm maps the real segment. NIXL must be installed (``pip install nixl``): its tests fail,
saying why, where it is not usable.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from kvmesh.bench.transfer_bench import SourceProcess, pattern
from kvmesh.kv_store.tiers import HostTier
from kvmesh.kv_store.transfer import (
    BackendChoice, Extent, ReaderBroken, TransferError, choose_backend, open_reader, open_source,
    usable_backends,
)
from kvmesh.kv_store.transfer.base import decode_descriptor, encode_descriptor

BACKENDS = ["shm", "nixl", "grpc"]
ARENA = 32 << 20
MARGIN_S = 0.5  # scheduling slack on a loaded 2-core machine, beyond one bounded piece


def expected(extents) -> np.ndarray:
    parts = [pattern(o, s) for o, s in extents if s]
    return np.concatenate(parts) if parts else np.empty(0, np.uint8)


def _require(source: SourceProcess, backend: str) -> bytes:
    if backend not in source.descriptors:
        pytest.fail(f"the {backend} source did not start: {source.errors.get(backend)}",
                    pytrace=False)
    return source.descriptors[backend]


@pytest.fixture(scope="module")
def source():
    with SourceProcess(ARENA, BACKENDS) as proc:
        yield proc


@pytest.fixture
def reader_for(source):
    opened = []

    def make(backend):
        reader = open_reader(_require(source, backend))
        opened.append(reader)
        return reader

    yield make
    for reader in opened:
        reader.close()


def _random_extents(rng, n, max_size):
    out = []
    for _ in range(n):
        kind = rng.integers(0, 10)
        if kind == 0:
            size = 0
        elif kind == 1:
            size = int(rng.integers(1, 8))
        else:
            size = int(rng.integers(1, max_size))
        offset = int(rng.integers(0, ARENA - size + 1))
        out.append(Extent(offset, size))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_equal_the_source_bytes(reader_for, backend):
    reader = reader_for(backend)
    rng = np.random.default_rng(7)
    buffer = np.zeros((1 << 20) * 8, dtype=np.uint8)
    for _ in range(120):
        extents = _random_extents(rng, int(rng.integers(1, 24)), 96 << 10)
        total = sum(e.size for e in extents)
        start = int(rng.integers(0, 64))  # unaligned destination inside a larger buffer
        dest = memoryview(buffer)[start:start + total + int(rng.integers(0, 100))]
        reader.read(extents, dest, deadline_s=10)
        assert np.array_equal(buffer[start:start + total], expected(extents))
    # edge cases: the last byte, the very end with size 0, the whole region, no extents
    edge = [Extent(ARENA - 1, 1), Extent(ARENA, 0), Extent(0, 0), Extent(12345, 3),
            Extent(100, 50), Extent(150, 50), Extent(150, 10), Extent(7, 1)]  # adjacent, repeated
    dest = bytearray(sum(e.size for e in edge))
    reader.read(edge, dest, deadline_s=10)
    assert bytes(dest) == expected(edge).tobytes()
    whole = np.empty(ARENA, dtype=np.uint8)
    reader.read([(0, ARENA)], whole, deadline_s=30)  # plain tuples work too
    assert np.array_equal(whole, pattern(0, ARENA))
    reader.read([], bytearray(0), deadline_s=10)
    assert reader.stats()["in_flight"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_extents_are_refused_before_any_transfer(reader_for, backend):
    reader = reader_for(backend)
    reader.read([Extent(0, 4096)], bytearray(4096), deadline_s=10)  # warm: connected, registered
    before = reader.stats()
    dest = np.full(1 << 16, 0xAB, dtype=np.uint8)
    bad = [
        [Extent(-1, 10)],
        [Extent(0, -10)],
        [Extent(0, 10), Extent(ARENA - 5, 6)],      # one past the end
        [Extent(ARENA + 1, 0)],                      # empty but out of range
        [Extent(1.5, 10)],
        [("a", 3)],
        [Extent(0, (1 << 16) + 1)],                  # more than dest holds
    ]
    for extents in bad:
        with pytest.raises(ValueError):
            reader.read(extents, dest, deadline_s=10)
    with pytest.raises(ValueError):
        reader.read([Extent(0, 8)], bytes(8), deadline_s=10)  # read-only destination
    assert (dest == 0xAB).all()
    assert reader.stats() == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_deadline_shorter_than_the_transfer(reader_for, backend):
    reader = reader_for(backend)
    small = bytearray(1 << 16)
    reader.read([Extent(0, len(small))], small, deadline_s=10)
    baseline = reader.stats()
    big = np.empty(8 * ARENA, dtype=np.uint8)  # 256 MiB: far longer than the deadline
    big[::4096] = 0
    deadline = 0.005 if backend != "grpc" else 0.02
    start = time.monotonic()
    with pytest.raises(TransferError, match="deadline|DEADLINE"):
        reader.read([Extent(0, ARENA)] * 8, big, deadline_s=deadline)
    assert time.monotonic() - start < deadline + MARGIN_S
    assert reader.stats() == baseline  # nothing left registered or in flight
    reader.read([Extent(5, len(small))], small, deadline_s=10)  # the reader still works
    assert bytes(small) == pattern(5, len(small)).tobytes()
    with pytest.raises(TransferError):
        reader.read([Extent(0, 16)], small, deadline_s=0)
    assert reader.stats() == baseline


def test_grpc_stalled_source_times_out_then_recovers(source, reader_for):
    reader = reader_for("grpc")
    dest = bytearray(1 << 20)
    reader.read([Extent(0, len(dest))], dest, deadline_s=10)
    source.signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(TransferError, match="DEADLINE_EXCEEDED"):
            reader.read([Extent(0, len(dest))], dest, deadline_s=0.2)
        assert time.monotonic() - start < 0.2 + MARGIN_S
    finally:
        source.signal(signal.SIGCONT)
    assert reader.stats()["in_flight"] == 0
    reader.read([Extent(7, len(dest))], dest, deadline_s=10)
    assert bytes(dest) == pattern(7, len(dest)).tobytes()


def test_grpc_slow_source_frames_time_out():
    region = bytearray(4 << 20)
    with open_source("grpc", memoryview(region), chunk_bytes=64 << 10, frame_delay_s=0.05) as src:
        with open_reader(src.descriptor()) as reader:
            start = time.monotonic()
            with pytest.raises(TransferError, match="DEADLINE_EXCEEDED"):
                reader.read([Extent(0, 1 << 20)], bytearray(1 << 20), deadline_s=0.15)
            assert time.monotonic() - start < 0.15 + MARGIN_S


def test_grpc_source_bounds_what_one_reader_can_make_it_do():
    """Too many extents, and a stream the reader stopped reading (it set no deadline):
    refused, and cut, so that an honest read finds a free server thread."""
    import grpc

    from kvmesh.kv_store.transfer.grpc_backend import _pack_request

    region = bytearray(32 << 20)
    with open_source("grpc", memoryview(region), max_workers=1, max_stream_s=0.5) as src:
        with open_reader(src.descriptor()) as reader:
            with pytest.raises(grpc.RpcError) as info:
                list(reader._call(_pack_request([(2 * i, 1) for i in range(70000)], b""), timeout=5))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stalled = reader._call(_pack_request([(0, len(region))], b""))  # no deadline
            next(stalled)  # one frame, then it stops reading: the server's writes block
            start = time.monotonic()
            dest = bytearray(4096)
            reader.read([Extent(100, len(dest))], dest, deadline_s=5)
            assert bytes(dest) == bytes(4096) and time.monotonic() - start < 0.5 + 4 * MARGIN_S
            stalled.cancel()


@pytest.mark.parametrize("backend", ["shm", "nixl"])
def test_one_sided_reads_work_while_the_store_is_stopped(source, reader_for, backend):
    reader = reader_for(backend)
    dest = bytearray(1 << 20)
    reader.read([Extent(0, 4096)], dest, deadline_s=10)  # connected
    source.signal(signal.SIGSTOP)
    try:
        reader.read([Extent(99, len(dest))], dest, deadline_s=5)
    finally:
        source.signal(signal.SIGCONT)
    assert bytes(dest) == pattern(99, len(dest)).tobytes()


def test_nixl_connection_to_a_stopped_store_times_out_and_releases(source):
    descriptor = _require(source, "nixl")
    reader = open_reader(descriptor)  # a new reader: UCX must still connect to the source
    try:
        dest = bytearray(1 << 16)
        source.signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(TransferError, match="deadline"):
                reader.read([Extent(0, len(dest))], dest, deadline_s=0.2)
            assert time.monotonic() - start < 0.2 + MARGIN_S
            assert reader.stats() == {"registered": 0, "in_flight": 0}
        finally:
            source.signal(signal.SIGCONT)
        reader.read([Extent(3, len(dest))], dest, deadline_s=10)
        assert bytes(dest) == pattern(3, len(dest)).tobytes()
    finally:
        reader.close()


def test_source_killed_mid_read(source):
    """One store process serves a reader per backend, each reading in a loop; SIGKILL
    the store: every reader fails with TransferError promptly (shm: ReaderBroken, so its
    user opens a new one), holds nothing, and a new reader of a live store works."""
    with SourceProcess(8 << 20, BACKENDS) as doomed:
        readers = {b: open_reader(_require(doomed, b)) for b in BACKENDS}
        failures: dict[str, tuple[float, BaseException]] = {}
        reads = dict.fromkeys(BACKENDS, 0)

        def loop(backend):
            dest = np.empty(8 << 20, dtype=np.uint8)
            try:
                while True:
                    readers[backend].read([Extent(0, 8 << 20)], dest, deadline_s=5)
                    reads[backend] += 1
            except BaseException as e:  # noqa: BLE001 - recorded and checked below
                failures[backend] = (time.monotonic(), e)

        threads = [threading.Thread(target=loop, args=(b,), daemon=True) for b in BACKENDS]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while min(reads.values()) < 3 and not failures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert min(reads.values()) >= 3 and not failures, (reads, failures)
        killed_at = time.monotonic()
        doomed.signal(signal.SIGKILL)
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()
        for backend, reader in readers.items():
            failed_at, error = failures[backend]
            assert isinstance(error, TransferError), (backend, error)
            if backend == "shm":  # the owner's lock is gone: this reader is done for
                assert isinstance(error, ReaderBroken), error
            assert failed_at - killed_at < 5 + MARGIN_S, backend
            assert reader.stats()["in_flight"] == 0, backend
            with pytest.raises(TransferError):
                reader.read([Extent(0, 16)], bytearray(16), deadline_s=1)
            reader.close()
            reader.close()
    for backend in BACKENDS:  # new readers of a live store work
        with open_reader(_require(source, backend)) as fresh:
            out = bytearray(4096)
            fresh.read([Extent(1, 4096)], out, deadline_s=10)
            assert bytes(out) == pattern(1, 4096).tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_twice_and_read_after_close(reader_for, backend):
    reader = reader_for(backend)
    reader.read([Extent(0, 16)], bytearray(16), deadline_s=10)
    reader.close()
    reader.close()
    with pytest.raises(ReaderBroken, match="closed"):
        reader.read([Extent(0, 16)], bytearray(16), deadline_s=10)
    assert reader.stats() == {"registered": 0, "in_flight": 0}


def _shm_name(tag: str) -> str:
    return f"kvmesh-test-{tag}-{os.getpid()}-{time.monotonic_ns()}"


def test_sources_close_twice_and_shm_close_unlinks_the_name():
    tier = HostTier(8 << 20, page_bytes=1 << 20, shm_name=_shm_name("close"))
    path = tier.shm_path
    tier.buffer()[:5] = b"hello"
    sources = [open_source(b, tier) for b in BACKENDS]
    shm = sources[0]
    with open_reader(shm.descriptor()) as reader:
        out = bytearray(5)
        reader.read([Extent(0, 5)], out, deadline_s=5)
        assert out == b"hello"
        for src in sources:
            src.close()
            src.close()
        assert not os.path.exists(path)  # the name is gone ...
        reader.read([Extent(0, 5)], out, deadline_s=5)  # ... attached readers keep their map
    with pytest.raises(TransferError):
        open_reader(shm.descriptor())  # no new reader can attach
    tier.close()
    tier.close()


def test_shm_source_close_in_the_store_process_unlinks():
    with SourceProcess(1 << 20, ["shm"]) as store:
        descriptor = _require(store, "shm")
        name = decode_descriptor(descriptor)["name"]
        assert os.path.exists(f"/dev/shm/{name}")
        with open_reader(descriptor) as reader:
            assert store.request("close-shm") == "ok"
            assert not os.path.exists(f"/dev/shm/{name}")
            out = bytearray(64)
            reader.read([Extent(64, 64)], out, deadline_s=5)  # the owner lives: still served
            assert bytes(out) == pattern(64, 64).tobytes()
        with pytest.raises(TransferError):
            open_reader(descriptor)


def test_host_tier_shared_memory_option():
    name = _shm_name("tier")
    tier = HostTier(4 << 20, page_bytes=1 << 20, shm_name=name)
    try:
        assert tier.shm_path == f"/dev/shm/{name}" and os.path.exists(tier.shm_path)
        with pytest.raises(FileExistsError):
            HostTier(4 << 20, page_bytes=1 << 20, shm_name=name)
    finally:
        tier.close()
    assert not os.path.exists(f"/dev/shm/{name}")
    for bad in ("../etc", "a/b", ".hidden", ""):
        with pytest.raises(ValueError):
            HostTier(1 << 20, page_bytes=1 << 20, shm_name=bad)
    assert HostTier(1 << 20, page_bytes=1 << 20).shm_path is None


def test_shm_reader_refuses_a_replaced_segment_and_another_host():
    tier = HostTier(1 << 20, page_bytes=1 << 20, shm_name=_shm_name("replace"))
    with open_source("shm", tier) as src:
        fields = decode_descriptor(src.descriptor())
        fields.pop("backend"), fields.pop("v")
        with pytest.raises(TransferError, match="replaced"):
            open_reader(encode_descriptor("shm", **{**fields, "ino": fields["ino"] + 1}))
        with pytest.raises(TransferError, match="another host"):
            open_reader(encode_descriptor("shm", **{**fields, "boot": "elsewhere"}))
        other = encode_descriptor("shm", **{**fields, "boot": "elsewhere"})
        assert usable_backends({"shm": other, "grpc": b""}) == {"grpc"}
        assert "shm" in usable_backends({"shm": src.descriptor()})
    tier.close()


def test_grpc_server_checks_extents_itself(source):
    import grpc
    import msgpack

    from kvmesh.kv_store.transfer.grpc_backend import _pack_request

    with open_reader(_require(source, "grpc")) as reader:
        call = reader._call(_pack_request([(ARENA - 4, 8)], b""), timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):
            list(reader._call(msgpack.packb({"extents": b"x"}), timeout=5))


def test_nixl_registrations_are_cached_and_released(reader_for):
    reader = reader_for("nixl")
    buffer = np.zeros(1 << 20, dtype=np.uint8)
    reader.read([Extent(0, 4096)], buffer, deadline_s=10)
    reader.read([Extent(0, 4096)], memoryview(buffer)[8192:], deadline_s=10)  # inside it
    assert reader.stats() == {"registered": 1, "in_flight": 0}
    pinned = np.zeros(1 << 16, dtype=np.uint8)
    reader.register(pinned)
    others = [np.zeros(4096, dtype=np.uint8) for _ in range(reader.max_registrations + 3)]
    for other in others:
        reader.read([Extent(1, 4096)], other, deadline_s=10)
        assert np.array_equal(other, pattern(1, 4096))
    assert reader.stats()["registered"] == reader.max_registrations
    reader.read([Extent(2, 100)], pinned, deadline_s=10)  # still registered: not evicted
    assert np.array_equal(pinned[:100], pattern(2, 100))
    reader.unregister(pinned)
    assert reader.stats()["registered"] == reader.max_registrations - 1
    reader.close()
    assert reader.stats() == {"registered": 0, "in_flight": 0}


def test_open_reader_refuses_bad_descriptors():
    for bad in (b"", b"\xc1", encode_descriptor("carrier-pigeon"), encode_descriptor("grpc", size=3),
                encode_descriptor("shm", name="x", size=1)):
        with pytest.raises(ValueError):
            open_reader(bad)


def test_choose_backend_prefers_and_explains():
    both = {"shm", "nixl", "grpc"}
    choice = choose_backend(both, both)
    assert isinstance(choice, BackendChoice) and choice.backend == "shm" and choice.reason
    choice = choose_backend({"nixl", "grpc"}, both)
    assert choice.backend == "nixl" and "shm" in choice.reason and "not usable here" in choice.reason
    choice = choose_backend(both, {"grpc"})
    assert choice.backend == "grpc" and "does not offer" in choice.reason
    assert choose_backend(both, both, preference=("grpc", "shm")).backend == "grpc"
    with pytest.raises(ValueError, match="no common"):
        choose_backend({"shm"}, {"grpc"})


def test_pieces_are_bounded_and_back_to_back():
    from kvmesh.kv_store.transfer.base import check_extents, split_pieces

    pairs, total = check_extents([Extent(0, 10), Extent(10, 5), Extent(40, 0), Extent(100, 37),
                                  Extent(3, 20)], 1000)
    assert pairs == [(0, 15), (100, 37), (3, 20)] and total == 72  # adjacent ones merged
    pieces = list(split_pieces(pairs, 16))
    assert all(sum(n for _, _, n in p) <= 16 for p in pieces)
    flat = [entry for p in pieces for entry in p]
    assert [pos for _, pos, _ in flat] == list(np.cumsum([0] + [n for _, _, n in flat])[:-1])
    rebuilt = np.concatenate([pattern(src, n) for src, _, n in flat])
    assert np.array_equal(rebuilt, expected(pairs))


def test_segments_of_dead_stores_are_reaped_and_live_ones_kept():
    """A store killed before it could unlink its arena leaves it in /dev/shm; the next store
    removes it (its owner's lock is gone) but never a live store's, nor a new one's."""
    from kvmesh.kv_store.tiers import reap_orphaned_segments

    prefix = f"kvmesh-reap-{os.getpid()}-"
    live = HostTier(1 << 20, page_bytes=1 << 20, shm_name=prefix + "live")
    try:
        with SourceProcess(1 << 20, ["shm"]) as doomed:
            dead_name = decode_descriptor(_require(doomed, "shm"))["name"]
            doomed.signal(signal.SIGKILL)
            doomed.process.join(10)
            # The killed store's arena under this test's prefix (the helper unlinks its
            # own name on the way out; the link keeps the segment as a crash leaves it).
            orphan = prefix + "orphan"
            os.link(f"/dev/shm/{dead_name}", f"/dev/shm/{orphan}")
        assert os.path.exists(f"/dev/shm/{orphan}")
        assert reap_orphaned_segments(prefix) == []  # younger than the margin: kept
        assert reap_orphaned_segments(prefix, min_age_s=0) == [orphan]
        assert not os.path.exists(f"/dev/shm/{orphan}") and os.path.exists(live.shm_path)
    finally:
        live.close()


def test_shm_lends_its_mapping_checked_as_a_read_is():
    """The shm reader lends the segment itself (read in place, no copy): the extents'
    bytes are the source's, at their own offsets; bad extents, a passed deadline and a
    closed reader are refused as ``read`` refuses them; a view still held when the
    reader closes does not make ``close`` fail. The other backends lend nothing."""
    with SourceProcess(8 << 20, BACKENDS) as proc:
        for backend in ("nixl", "grpc"):
            with open_reader(_require(proc, backend)) as other:
                assert other.mapped([Extent(0, 16)], deadline_s=5) is None
        reader = open_reader(_require(proc, "shm"))
        extents = [Extent(4096, 100), Extent(12345, 7)]
        view = reader.mapped(extents, deadline_s=5)
        assert view.readonly
        for offset, size in extents:
            assert bytes(view[offset:offset + size]) == pattern(offset, size).tobytes()
        with pytest.raises(ValueError, match="past the end"):
            reader.mapped([Extent((8 << 20) - 4, 8)], deadline_s=5)
        with pytest.raises(TransferError, match="deadline"):
            reader.mapped(extents, deadline_s=0)
        held = np.frombuffer(view, dtype=np.uint8)  # an array made from the lent view
        reader.close()
        assert held[4096:4196].tobytes() == pattern(4096, 100).tobytes()
        with pytest.raises(ReaderBroken, match="closed"):
            reader.mapped(extents, deadline_s=5)
        reader.close()
