"""``kvmesh bench splits`` runs every case against its same-split baseline and checks what it
loaded (speed is not asserted)."""

import json
import subprocess
import sys

from kvmesh.bench.split_bench import CASES


def test_bench_splits_prints_one_json_object_with_every_case_verified():
    out = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "bench", "splits", "--json",
                          "--blocks", "4", "--rounds", "1"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    report = json.loads(out)
    rows = report["results"]
    assert [(r["writer_tp"], r["reader_tp"]) for r in rows] == CASES * 2
    assert {r["backend"] for r in rows} == {"shm", "get"}
    for r in rows:
        assert r["verified"] and r["median_ms"] > 0 and r["GBps"] > 0
        if r["same_split"]:
            assert r["ratio_to_same_split"] == 1.0 and r["read_per_placed"] == 1.0
        # a reader with fewer heads than the writer's shard reads the whole shard
        expected = max(1.0, r["reader_tp"] / r["writer_tp"])
        assert r["read_per_placed"] == expected
