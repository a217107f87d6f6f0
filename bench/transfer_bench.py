"""``kvmesh bench transfer``: KV bytes between two processes, per transfer backend.

(Also ``python -m kvmesh.bench.transfer_bench [--json]``.)

A child process (started with ``spawn``) plays the store: a shared-memory host tier
filled with a known pattern, exposed through every backend (``shm``, ``nixl``,
``grpc``). This process plays the worker: one reader per backend copies ranges of that
arena into a preallocated destination, and measures

* single reads of 256 KiB, 4 MiB and 64 MiB, each read at a different offset of the
  arena in turn (so the source is not read from the CPU cache when the arena is larger
  than it);
* a layer-wise pattern: 32 layers x 16 blocks of 16 KiB scattered over the arena, read
  as one call per layer (16 extents), as a decode worker loads a prompt's KV.

The ceilings are measured in the same run: ``memcpy`` (numpy copies) of exactly the same
ranges into the same destination, out of a local arena of the same size and of the same
kind of memory as the source the case reads: a mapping of a ``/dev/shm`` segment (4 KiB
pages, ``shm-4k``) for the rows on the shared-memory tier, and an anonymous map on
transparent huge pages (``anon-hugepage``, ``kv_store.tiers.anonymous_arena``) for NIXL's
huge-page arena. Both ceilings are reported (``memcpy_by_case``, one entry per case and
arena kind); each row's ratios are to the ceiling of its own ``arena``. The ceilings and
the backends run in alternating batches of ~10 ms, so that on a shared machine they all
see the same load. Every case reports GB/s over all its calls (``GBps``) and at the
median call (``GBps_at_p50``, which a few preempted calls do not move), p50 and p99 of
the per-call latency and both ratios to its ceiling; after the timing, one read of every
backend is checked against the pattern (``verified``).

NIXL is measured twice: on the shared-memory tier (4 KiB pages, ``arena: shm-4k``, what
``HostTier(shm_name=...)`` gives) and on an anonymous arena on transparent huge pages
(``arena: anon-hugepage``, see ``kv_store.tiers.anonymous_arena``).
"""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import statistics
import sys
import time
import uuid

import numpy as np

from kvmesh.bench.stats import percentile

SIZES = [256 << 10, 4 << 20, 64 << 20]
LAYERS, BLOCKS_PER_LAYER, LAYER_BLOCK_BYTES = 32, 16, 16 << 10
ARENA_BYTES = 256 << 20
CASE_SECONDS = 0.8
ARENA_KINDS = ("shm-4k", "anon-hugepage")  # the memory a case reads: its ceiling reads the same kind
_MULT = np.uint64(0x9E3779B97F4A7C15)


def pattern(offset: int, size: int) -> np.ndarray:
    """The bytes ``[offset, offset + size)`` of the source arena's fill pattern: the
    little-endian uint64 ``k * 0x9E3779B97F4A7C15`` at byte ``8 k``."""
    k0, k1 = offset // 8, (offset + size + 7) // 8
    words = np.arange(k0, k1, dtype=np.uint64) * _MULT
    start = offset - 8 * k0
    return words.astype("<u8").view(np.uint8)[start:start + size]


def _fill(buffer: memoryview) -> None:
    arr = np.frombuffer(buffer, dtype=np.uint8)
    step = 8 << 20
    for start in range(0, len(arr), step):
        chunk = arr[start:start + step]
        chunk[:] = pattern(start, len(chunk))


# ------------------------------------------------------------------ the source process


def _source_main(conn, arena_bytes: int, backends: list[str], shm_name: str,
                 grpc_options: dict) -> None:
    from kvmesh.kv_store.tiers import HostTier
    from kvmesh.kv_store.transfer import open_source
    from kvmesh.kv_store.tiers import anonymous_arena

    tier = HostTier(arena_bytes, page_bytes=min(arena_bytes, 4 << 20), shm_name=shm_name)
    _fill(tier.buffer())
    huge = huge_view = None
    sources, descriptors, errors = {}, {}, {}
    for label in backends:
        backend, _, arena = label.partition("@")
        try:
            region = tier
            if arena == "hugepage":  # a second arena, same bytes, on transparent huge pages
                if huge is None:
                    huge = anonymous_arena(arena_bytes)
                    huge_view = memoryview(huge)
                    _fill(huge_view)
                region = huge_view
            elif arena:
                raise ValueError(f"unknown arena {arena!r}")
            options = grpc_options if backend == "grpc" else {}
            sources[label] = open_source(backend, region, **options)
            descriptors[label] = sources[label].descriptor()
        except Exception as e:  # reported to the parent, which decides
            errors[label] = f"{type(e).__name__}: {e}"
    conn.send({"pid": os.getpid(), "descriptors": descriptors, "errors": errors,
               "shm_name": shm_name})
    try:
        while True:
            command = conn.recv()
            if command == "close-shm" and "shm" in sources:
                sources.pop("shm").close()
                conn.send("ok")
            elif command == "stop":
                break
    except EOFError:  # the parent is gone
        pass
    for source in sources.values():
        source.close()
    tier.close()
    if huge is not None:
        region = None
        huge_view.release()
        huge.close()
    try:
        conn.send("stopped")
    except Exception:
        pass


class SourceProcess:
    """A store stand-in in its own process: ``arena_bytes`` of a shared-memory host tier
    filled with ``pattern``, exposed through ``backends``. ``descriptors`` and ``errors``
    (backend → why it could not start) are there once started. ``"nixl@hugepage"``
    exposes through NIXL a second arena with the same bytes on transparent huge pages."""

    def __init__(self, arena_bytes: int, backends=("shm", "nixl", "grpc"),
                 grpc_options: dict | None = None, start_timeout_s: float = 120.0):
        self.arena_bytes = arena_bytes
        self.shm_name = f"kvmesh-xfer-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_source_main, daemon=True, args=(
            child, arena_bytes, list(backends), self.shm_name, grpc_options or {}))
        self.process.start()
        child.close()
        try:
            if not self._conn.poll(start_timeout_s):
                raise RuntimeError(f"the source process did not start in {start_timeout_s} s")
            hello = self._conn.recv()  # EOFError: the child died (its segment may be there)
            self.pid = hello["pid"]
            self.descriptors: dict[str, bytes] = hello["descriptors"]
            self.errors: dict[str, str] = hello["errors"]
        except BaseException:  # no with-block will stop it: stop it here, segment included
            self.kill()
            raise

    def request(self, command: str, timeout_s: float = 30.0):
        self._conn.send(command)
        if not self._conn.poll(timeout_s):
            raise RuntimeError(f"the source process did not answer {command!r}")
        return self._conn.recv()

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self._cleanup()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.is_alive():
            try:
                self._conn.send("stop")
                if self._conn.poll(timeout_s):
                    self._conn.recv()
            except (OSError, EOFError):
                pass
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.kill()
        self._cleanup()

    def _cleanup(self) -> None:  # a killed store leaves its segment behind
        try:
            os.unlink(os.path.join("/dev/shm", self.shm_name))
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------ measuring


def _cases(sizes, arena_bytes, layers, blocks_per_layer, layer_block_bytes, seed=0):
    """Each case: (pattern, block_bytes, call_bytes, [call extents, ...])."""
    out = []
    for size in sizes:
        slots = max(1, arena_bytes // size)
        out.append(("single", size, size, [[(i * size, size)] for i in range(slots)]))
    if layers and blocks_per_layer:
        slots = arena_bytes // layer_block_bytes
        needed = layers * blocks_per_layer
        rng = np.random.default_rng(seed)
        picks = rng.permutation(slots)[:needed] if needed <= slots else rng.integers(0, slots, needed)
        calls = [[(int(picks[layer * blocks_per_layer + b]) * layer_block_bytes, layer_block_bytes)
                  for b in range(blocks_per_layer)] for layer in range(layers)]
        out.append((f"layerwise-{layers}x{blocks_per_layer}", layer_block_bytes,
                    blocks_per_layer * layer_block_bytes, calls))
    return out


def _stats(latencies: list[float], call_bytes: int) -> dict:
    lat_ms = sorted(x * 1e3 for x in latencies)
    p50 = statistics.median(lat_ms)
    return {"GBps": round(call_bytes * len(lat_ms) / sum(lat_ms) / 1e6, 3),
            # robust to the calls a busy machine preempts (the mean is not)
            "GBps_at_p50": round(call_bytes / p50 / 1e6, 3),
            "p50_ms": round(p50, 4),
            "p99_ms": round(percentile(lat_ms, 0.99), 4),
            "calls": len(lat_ms)}


def shm_arena(nbytes: int) -> mmap.mmap:
    """A resident read-write mapping of a new ``/dev/shm`` segment of ``nbytes``: the
    memory kind of the shared-memory host tier and of its readers' mappings (shmem, 4 KiB
    pages, page tables populated). The name is unlinked at once: nothing stays behind."""
    path = os.path.join("/dev/shm", f"kvmesh-xfer-ceiling-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.unlink(path)
        os.posix_fallocate(fd, 0, nbytes)
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _ceiling_arenas(arena_bytes: int) -> dict[str, mmap.mmap]:
    """Per arena kind (``ARENA_KINDS``), a local map of ``arena_bytes`` filled with
    ``pattern``: what the ceilings copy out of."""
    from kvmesh.kv_store.tiers import anonymous_arena

    maps = {"shm-4k": shm_arena(arena_bytes), "anon-hugepage": anonymous_arena(arena_bytes)}
    for region in maps.values():
        with memoryview(region) as view:
            _fill(view)
    return maps


def _arena_of(label: str) -> str:
    """The kind of memory the source of backend ``label`` reads."""
    return "anon-hugepage" if label.partition("@")[2] == "hugepage" else "shm-4k"


def _measure_interleaved(methods: dict, calls_by_method: dict, call_bytes: int,
                         case_seconds: float, min_calls: int, max_calls: int,
                         batch_seconds: float = 0.01) -> dict:
    """Time every method (name → one-call function) on its calls, in alternating batches
    of about ``batch_seconds``, so that all of them see the same load on a shared
    machine; about ``case_seconds`` of calls each. Latencies per method."""
    latencies = {name: [] for name in methods}
    batch, next_call = {}, {}
    for name, fn in methods.items():
        calls = calls_by_method[name]
        fn(calls[0])  # warm-up: connections, registrations, page tables
        t = time.perf_counter()
        fn(calls[1 % len(calls)])
        batch[name] = max(1, min(1000, int(batch_seconds / max(time.perf_counter() - t, 1e-7))))
        next_call[name] = 2
    rounds_until = time.perf_counter() + case_seconds * len(methods)
    while True:
        for name, fn in methods.items():
            calls, lat = calls_by_method[name], latencies[name]
            for _ in range(min(batch[name], max_calls - len(lat))):
                call = calls[next_call[name] % len(calls)]
                next_call[name] += 1
                t = time.perf_counter()
                fn(call)
                lat.append(time.perf_counter() - t)
        enough = all(len(v) >= min_calls for v in latencies.values())
        if (enough and time.perf_counter() >= rounds_until) or \
                all(len(v) >= max_calls for v in latencies.values()):
            break
    return {name: _stats(lat, call_bytes) for name, lat in latencies.items()}


def run(sizes=None, arena_bytes: int = ARENA_BYTES, layers: int = LAYERS,
        blocks_per_layer: int = BLOCKS_PER_LAYER, layer_block_bytes: int = LAYER_BLOCK_BYTES,
        backends=("shm", "nixl", "grpc"), case_seconds: float = CASE_SECONDS,
        min_calls: int = 5, max_calls: int = 100_000, deadline_s: float = 30.0,
        nixl_arenas=("hugepage", "shm"), progress=None) -> dict:
    from kvmesh.kv_store.transfer import Extent, open_reader

    sizes = list(SIZES if sizes is None else sizes)
    say = progress or (lambda msg: None)
    cases = _cases(sizes, arena_bytes, layers, blocks_per_layer, layer_block_bytes)
    labels = []
    for backend in backends:
        if backend == "nixl":
            labels += ["nixl@hugepage" if arena == "hugepage" else "nixl" for arena in nixl_arenas]
        else:
            labels.append(backend)
    say(f"starting the source process ({arena_bytes >> 20} MiB arena, {', '.join(labels)})")
    started = time.perf_counter()
    results, ceilings = [], []
    with SourceProcess(arena_bytes, labels) as source:
        setup_s = time.perf_counter() - started
        errors = dict(source.errors)
        locals_ = {kind: np.frombuffer(region, dtype=np.uint8)
                   for kind, region in _ceiling_arenas(arena_bytes).items()}
        readers = {}
        for label in labels:
            if label in source.descriptors:
                try:
                    readers[label] = open_reader(source.descriptors[label])
                except Exception as e:
                    errors[label] = f"{type(e).__name__}: {e}"
        try:
            for pattern_name, block_bytes, call_bytes, calls in cases:
                say(f"{pattern_name} {block_bytes >> 10} KiB: memcpy ({', '.join(ARENA_KINDS)}), "
                    f"{', '.join(readers)}")
                dest = np.zeros(call_bytes, dtype=np.uint8)  # touched: resident like a KV cache
                out = memoryview(dest)
                extent_calls = [[Extent(o, s) for o, s in call] for call in calls]

                def memcpy(local, dest=dest):
                    def copy(call):
                        pos = 0
                        for o, s in call:
                            np.copyto(dest[pos:pos + s], local[o:o + s])
                            pos += s
                    return copy

                def reads(reader):
                    return lambda call: reader.read(call, out, deadline_s)

                copies = {f"memcpy@{kind}": memcpy(local) for kind, local in locals_.items()}
                methods = {**copies, **{label: reads(r) for label, r in readers.items()}}
                measured = _measure_interleaved(
                    methods, {**{name: calls for name in copies}, **{label: extent_calls for label in readers}},
                    call_bytes, case_seconds, min_calls, max_calls)
                ceiling_of = {}
                for name in copies:
                    kind = name.partition("@")[2]
                    ceiling_of[kind] = measured.pop(name)
                    ceilings.append({"pattern": pattern_name, "block_bytes": block_bytes,
                                     "call_bytes": call_bytes, "arena": kind, **ceiling_of[kind]})
                for label, r in measured.items():
                    m = ceiling_of[_arena_of(label)]
                    check = extent_calls[len(extent_calls) // 2]  # the bytes, after the timing
                    dest[:] = 0
                    readers[label].read(check, out, deadline_s)
                    expected = np.concatenate([pattern(o, s) for o, s in check])
                    r["verified"] = bool(np.array_equal(dest, expected))
                    r["ratio_to_ceiling"] = round(r["GBps"] / m["GBps"], 3)
                    r["ratio_at_p50"] = round(r["GBps_at_p50"] / m["GBps_at_p50"], 3)
                    results.append({"backend": label.partition("@")[0], "arena": _arena_of(label),
                                    "pattern": pattern_name, "block_bytes": block_bytes,
                                    "call_bytes": call_bytes, "extents_per_call": len(calls[0]), **r})
        finally:
            for reader in readers.values():
                reader.close()
            locals_.clear()  # the maps go with their last array
    by_arena = {kind: max(c["GBps"] for c in ceilings if c["arena"] == kind) for kind in ARENA_KINDS}
    return {
        "ceiling": {"memcpy_GBps": max(by_arena.values()), "memcpy_GBps_by_arena": by_arena,
                    "memcpy_by_case": ceilings},
        "results": results,
        "errors": errors,
        "config": {"arena_bytes": arena_bytes, "sizes": sizes, "layers": layers,
                   "blocks_per_layer": blocks_per_layer, "layer_block_bytes": layer_block_bytes,
                   "case_seconds": case_seconds, "source_start_s": round(setup_s, 2),
                   "cpus": os.cpu_count()},
    }


def print_table(report: dict) -> None:
    ceil = {(c["pattern"], c["block_bytes"], c["arena"]): c for c in report["ceiling"]["memcpy_by_case"]}
    print(f"{'backend':8} {'arena':13} {'pattern':16} {'block':>8} {'GB/s':>8} {'memcpy':>8} {'ratio':>6} "
          f"{'p50 ms':>9} {'p99 ms':>9} {'ratio@p50':>9}")
    for r in report["results"]:
        c = ceil[(r["pattern"], r["block_bytes"], r["arena"])]
        print(f"{r['backend']:8} {r['arena']:13} {r['pattern']:16} {r['block_bytes'] >> 10:>6}Ki "
              f"{r['GBps']:>8.2f} {c['GBps']:>8.2f} {r['ratio_to_ceiling']:>6.2f} {r['p50_ms']:>9.3f} "
              f"{r['p99_ms']:>9.3f} {r['ratio_at_p50']:>9.2f}")
    for backend, why in report["errors"].items():
        print(f"{backend}: not measured: {why}")


def main(as_json: bool, sizes=None, arena_bytes: int = ARENA_BYTES,
         case_seconds: float = CASE_SECONDS, backends=("shm", "nixl", "grpc"),
         layers: int = LAYERS, blocks_per_layer: int = BLOCKS_PER_LAYER,
         layer_block_bytes: int = LAYER_BLOCK_BYTES) -> dict:
    progress = None if as_json else (
        lambda m: print(f"kvmesh bench: {m}", file=sys.stderr, flush=True))
    report = run(sizes, arena_bytes, layers, blocks_per_layer, layer_block_bytes,
                 tuple(backends), case_seconds, progress=progress)
    if as_json:
        print(json.dumps(report))
    else:
        print_table(report)
    return report


def _parse_bytes(text: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20,
             "g": 1 << 30, "b": 1}
    t = text.strip().lower()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[:-len(unit)]) * mult)
    return int(t)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m kvmesh.bench.transfer_bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sizes", default="256KiB,4MiB,64MiB", help="single-read sizes")
    p.add_argument("--arena-bytes", type=_parse_bytes, default=ARENA_BYTES)
    p.add_argument("--case-seconds", type=float, default=CASE_SECONDS)
    p.add_argument("--backends", default="shm,nixl,grpc")
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--blocks-per-layer", type=int, default=BLOCKS_PER_LAYER)
    p.add_argument("--layer-block-bytes", type=_parse_bytes, default=LAYER_BLOCK_BYTES)
    a = p.parse_args()
    main(a.json, [_parse_bytes(s) for s in a.sizes.split(",") if s], a.arena_bytes,
         a.case_seconds, a.backends.split(","), a.layers, a.blocks_per_layer, a.layer_block_bytes)
