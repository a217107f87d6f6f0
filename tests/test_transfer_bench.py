"""The transfer benchmark runs between two processes and reports every backend against
its memcpy ceiling as one JSON object (speed is not asserted)."""

import glob
import json
import subprocess
import sys


def test_bench_transfer_prints_one_json_object_with_every_backend():
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.transfer_bench", "--json", "--sizes", "64KiB,256KiB",
         "--arena-bytes", "2MiB", "--case-seconds", "0.02", "--layers", "2",
         "--blocks-per-layer", "4", "--layer-block-bytes", "4KiB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads(out)  # stdout is exactly one JSON object
    assert report["errors"] == {}, report["errors"]
    assert report["ceiling"]["memcpy_GBps"] > 0
    cases = {(c["pattern"], c["block_bytes"]) for c in report["ceiling"]["memcpy_by_case"]}
    assert cases == {("single", 64 << 10), ("single", 256 << 10), ("layerwise-2x4", 4 << 10)}
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
    assert glob.glob(f"/dev/shm/kvmesh-xfer-{proc.pid}-*") == []  # the segment is gone
