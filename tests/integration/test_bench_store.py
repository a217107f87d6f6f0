"""The store benchmark runs and reports every case against its ceiling (speed is not asserted)."""

import json
import shutil
import subprocess
import sys

import pytest

from kvmesh.bench import store_bench

SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20)


def test_bench_store_prints_one_json_object(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "bench", "store", "--json",
                          "--total-bytes", "8MiB", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out)
    ceiling = report["ceiling"]
    assert {"memcpy_GBps", "disk_read_GBps", "disk_write_GBps"} <= set(ceiling)
    assert ceiling["memcpy_GBps"] > 0 and ceiling["disk_read_GBps"] > 0 and ceiling["disk_write_GBps"] > 0
    # every block size has a memcpy ceiling of its own
    assert set(ceiling["memcpy_GBps_by_block"]) == {str(size) for size in SIZES}
    # what the disk figures are figures of: the directory's file system, as findmnt sees it
    if shutil.which("findmnt"):
        fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(tmp_path)],
                                capture_output=True, text=True, check=True).stdout.strip()
        assert ceiling["disk_filesystem"] == fstype
    assert ceiling["disk_is_memory"] is (ceiling["disk_filesystem"] in ("tmpfs", "ramfs"))
    assert ceiling["disk_measures"] == ("memory" if ceiling["disk_is_memory"] else
                                        "device" if ceiling["disk_direct_io"] else "page_cache")
    cases = {(r["tier"], r["op"], r["keys_per_call"], r["block_bytes"]) for r in report["results"]}
    for tier in ("host", "disk"):
        for op, per_call in (("put", 1), ("get", 1), ("get", 8)):
            for size in SIZES:
                assert (tier, op, per_call, size) in cases
    for r in report["results"]:
        assert {"tier", "op", "block_bytes", "GBps", "p50_us", "p99_us"} <= set(r)
        assert r["GBps"] > 0 and r["p99_us"] >= r["p50_us"] > 0 and r["ratio_to_ceiling"] > 0
        assert r["ceiling_GBps"] > 0
        assert abs(r["ratio_to_ceiling"] - r["GBps"] / r["ceiling_GBps"]) < 0.01
        if r["tier"] == "disk":  # raw I/O run between the tier's calls: sequential, and as the calls
            assert r["raw_same_requests_GBps"] > 0
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
    assert [r["encoding"] for r in report["encodings"]] == list(store_bench.ENCODED)
    assert list(tmp_path.iterdir()) == []  # the benchmark's files are gone


def test_encodings_report_bytes_at_rest_and_speed_against_memcpy(tmp_path):
    rows = {r["encoding"]: r for r in store_bench.encodings(str(tmp_path), 4 << 20)}
    assert set(rows) == {"zstd", "lz4", "int8", "int4"}
    for r in rows.values():
        assert r["blocks_on_disk"] > 0
        assert 0 < r["bytes_at_rest_ratio"] <= r["disk_slot_ratio"] < 1  # slots round up
        assert r["encode_GBps"] > 0 and r["decode_GBps"] > 0 and r["memcpy_GBps"] > 0
        assert abs(r["encode_of_memcpy"] - r["encode_GBps"] / r["memcpy_GBps"]) < 0.01
        assert (r["max_relative_error"] > 0) == r["lossy"]
    assert rows["int8"]["lossy"] and rows["int8"]["bytes_at_rest_ratio"] <= 0.55
    assert rows["int8"]["max_relative_error"] <= 1 / 127  # half a step, plus bf16 rounding
    assert rows["int4"]["lossy"] and rows["int4"]["bytes_at_rest_ratio"] <= 0.3
    assert rows["int4"]["max_relative_error"] <= 2 / 15  # half a step of a group's range, at most
    assert list(tmp_path.iterdir()) == []


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 27 0:27 / /tmp rw,relatime shared:5 - tmpfs tmpfs rw
31 30 0:28 / /tmp rw,relatime - xfs /dev/vdb rw
32 27 0:29 / /data\\040disk rw,relatime master:1 - btrfs /dev/vdc rw
33 27 0:30 / /tmpfoo rw,relatime - ramfs ramfs rw
"""


@pytest.mark.parametrize("path, fstype", [
    ("/tmp/kvmesh-bench-1", "xfs"),  # two mounts on /tmp: the later one is what the path is on
    ("/tmp", "xfs"),
    ("/data disk/x", "btrfs"),  # mountinfo writes the space as \040
    ("/tmpfoo/x", "ramfs"),
    ("/tmpf", "ext4"),  # /tmp is no prefix of /tmpf: the root's
    ("/var/lib", "ext4"),
])
def test_filesystem_of_takes_the_longest_mount_point_containing_the_path(path, fstype):
    assert store_bench.filesystem_of(path, MOUNTINFO) == fstype


def test_disk_measures_tells_memory_and_page_cache_from_a_device():
    assert store_bench._disk_measures(True, "tmpfs") == "memory"  # tmpfs accepts O_DIRECT
    assert store_bench._disk_measures(False, "ramfs") == "memory"
    assert store_bench._disk_measures(False, "ext4") == "page_cache"
    assert store_bench._disk_measures(True, "xfs") == "device"


def test_gpu_put_ceiling_copies_from_the_put_payloads_on_any_device():
    pytest.importorskip("torch")
    payloads = store_bench.payloads_for(64 << 10, 1 << 20)
    h2d, d2h = store_bench.gpu_copy_gbps(64 << 10, 1 << 20, payloads, device="cpu")
    assert h2d > 0 and d2h > 0
    with pytest.raises(ValueError):  # the payloads are the case's blocks, of its size
        store_bench.gpu_copy_gbps(128 << 10, 1 << 20, payloads, device="cpu")
    with pytest.raises(ValueError):
        store_bench.memcpy_gbps(128 << 10, 1 << 20, payloads, 1)


@pytest.mark.parametrize("case", [
    lambda d: store_bench.demoting_puts(d, False, 1 << 20),
    lambda d: store_bench.demoter_to_disk(d, False, 16 << 20, sizes=(1 << 20,)),
])
def test_a_raw_disk_that_fails_to_start_leaves_no_store_file(tmp_path, monkeypatch, case):
    class Broken:
        def __init__(self, *args, **kwargs):
            raise OSError("no room for the raw file")

    monkeypatch.setattr(store_bench, "RawDisk", Broken)
    with pytest.raises(OSError, match="no room"):
        case(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
