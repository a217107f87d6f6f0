"""The store benchmark runs and reports every case against its ceiling (speed is not asserted)."""

import json
import subprocess
import sys


def test_bench_store_prints_one_json_object(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "store", "--json",
                          "--total-bytes", "8MiB", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out)
    ceiling = report["ceiling"]
    assert ceiling["memcpy_GBps"] > 0 and ceiling["disk_read_GBps"] > 0 and ceiling["disk_write_GBps"] > 0
    cases = {(r["tier"], r["op"], r["keys_per_call"], r["block_bytes"]) for r in report["results"]}
    for tier in ("host", "disk"):
        for op, per_call in (("put", 1), ("get", 1), ("get", 8)):
            for size in (64 << 10, 256 << 10, 1 << 20, 4 << 20):
                assert (tier, op, per_call, size) in cases
    for r in report["results"]:
        assert r["GBps"] > 0 and r["p99_us"] >= r["p50_us"] > 0 and r["ratio_to_ceiling"] > 0
        assert abs(r["ratio_to_ceiling"] - r["GBps"] / r["ceiling_GBps"]) < 0.01
        if r["tier"] == "host":
            assert r["ceiling_GBps"] <= ceiling["memcpy_GBps_by_block"][str(r["block_bytes"])]
        if r["tier"] == "disk":  # raw I/O run between the tier's calls: sequential, and as the calls
            assert r["raw_same_requests_GBps"] > 0
            assert r["ceiling_GBps"] <= ceiling["disk_read_GBps" if r["op"] == "get" else "disk_write_GBps"]
    hits = report["host_hits_under_disk_traffic"]  # measured against the same hits alone
    assert hits["promotions"] > 0 and hits["with_disk_traffic_p99_us"] >= hits["with_disk_traffic_p50_us"] > 0
    assert hits["p50_ratio"] > 0 and hits["alone_p99_us"] >= hits["alone_p50_us"] > 0
    demoting = report["puts_demoting_to_disk"]  # every timed put made room by demoting one
    assert demoting["demotions"] >= 32 and demoting["GBps"] > 0 and demoting["ratio_to_ceiling"] > 0
    bursty = report["bursty_puts_with_demote_ahead"]  # the same bursts without and with the demoter
    assert bursty["without_demotions_ahead"] == 0 and bursty["with_demotions_ahead"] > 0
    assert bursty["without_p99_us"] >= bursty["without_p50_us"] > 0 and bursty["p50_ratio"] > 0
    demoter = report["demoter_to_disk"]  # against raw writes run around it
    assert [r["block_bytes"] for r in demoter] == [64 << 10, 256 << 10, 1 << 20]
    assert all(r["GBps"] > 0 and r["ratio_to_ceiling"] > 0 for r in demoter)
    assert list(tmp_path.iterdir()) == []  # the benchmark's files are gone
