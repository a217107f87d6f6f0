"""The transfer benchmark runs between two processes and reports every backend against
its memcpy ceiling as one JSON object (speed is not asserted)."""

import glob
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from kvmesh.bench.transfer_bench import SourceProcess


def test_bench_transfer_prints_one_json_object_with_every_backend():
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmesh.bench.transfer_bench", "--json", "--sizes", "64KiB,256KiB",
         "--arena-bytes", "2MiB", "--case-seconds", "0.02", "--layers", "2",
         "--blocks-per-layer", "4", "--layer-block-bytes", "4KiB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads(out)  # stdout is exactly one JSON object
    assert report["errors"] == {}, report["errors"]
    ceiling = report["ceiling"]
    assert set(ceiling["memcpy_GBps_by_arena"]) == {"shm-4k", "anon-hugepage"}
    assert ceiling["memcpy_GBps"] > 0 and all(v > 0 for v in ceiling["memcpy_GBps_by_arena"].values())
    cases = {(c["pattern"], c["block_bytes"]) for c in ceiling["memcpy_by_case"]}
    assert cases == {("single", 64 << 10), ("single", 256 << 10), ("layerwise-2x4", 4 << 10)}
    # one ceiling per case and kind of memory
    by_arena = {(c["pattern"], c["block_bytes"], c["arena"]): c for c in ceiling["memcpy_by_case"]}
    assert len(by_arena) == len(ceiling["memcpy_by_case"]) == 2 * len(cases)
    seen = {(r["backend"], r["arena"], r["pattern"], r["block_bytes"]) for r in report["results"]}
    for pattern, block in cases:
        for backend, arena in (("shm", "shm-4k"), ("grpc", "shm-4k"), ("nixl", "shm-4k"),
                               ("nixl", "anon-hugepage")):
            assert (backend, arena, pattern, block) in seen
    for r in report["results"]:
        assert r["verified"] is True
        assert r["GBps"] > 0 and r["GBps_at_p50"] > 0 and r["ratio_to_ceiling"] > 0
        assert r["p99_ms"] >= r["p50_ms"] > 0
        assert r["extents_per_call"] == (4 if r["pattern"].startswith("layerwise") else 1)
        own = by_arena[(r["pattern"], r["block_bytes"], r["arena"])]  # the ceiling over its own memory
        assert abs(r["ratio_to_ceiling"] - r["GBps"] / own["GBps"]) < 0.01
        assert abs(r["ratio_at_p50"] - r["GBps_at_p50"] / own["GBps_at_p50"]) < 0.01
    assert glob.glob(f"/dev/shm/kvmesh-xfer-{proc.pid}-*") == []  # the segment is gone
    assert glob.glob(f"/dev/shm/kvmesh-xfer-ceiling-{proc.pid}-*") == []  # and the ceiling's


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_a_source_that_dies_while_starting_leaves_no_segment():
    segments = f"/dev/shm/kvmesh-xfer-{os.getpid()}-*"
    stop = threading.Event()

    def kill_once_its_segment_exists():  # it then still fills 256 MiB before it answers
        while not stop.is_set():
            if glob.glob(segments):
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal.SIGKILL)
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=kill_once_its_segment_exists, daemon=True)
    watcher.start()
    try:
        with pytest.raises(EOFError):
            SourceProcess(256 << 20, backends=("shm",))
    finally:
        stop.set()
        watcher.join()
    assert glob.glob(segments) == []
