"""The eviction benchmark replays every trace against every policy through the store and
reports each against the trace's no-eviction ceiling (which policy wins is not asserted)."""

import json
import random
import subprocess
import sys

from kvmesh.bench import eviction_bench
from kvmesh.kv_store.eviction import POLICIES


def test_bench_eviction_prints_one_json_line_and_a_plot(tmp_path):
    png = tmp_path / "eviction.png"
    out = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "bench", "eviction", "--json",
                          "--requests", "150", "--capacities", "0.1,0.5", "--plot", str(png)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert len(out.strip().splitlines()) == 1
    report = json.loads(out)
    assert set(report["traces"]) == set(eviction_bench.TRACES)
    assert report["default_policy"] in POLICIES
    for name, trace in report["traces"].items():
        assert trace["blocks"] >= trace["distinct_blocks"] > 0
        assert 0 < trace["ceiling_hit_ratio"] < 1
        rows = [r for r in report["results"] if r["trace"] == name]
        assert {(r["policy"], r["capacity_share"]) for r in rows} == {
            (p, s) for p in POLICIES for s in (0.1, 0.5)}
        for r in rows:
            assert 0 <= r["hit_ratio"] <= trace["ceiling_hit_ratio"] + 1e-9
            assert abs(r["of_ceiling"] - r["hit_ratio"] / trace["ceiling_hit_ratio"]) < 1e-3
            missed, rest = divmod(r["bytes_recomputed"], report["block_bytes"])
            assert rest == 0 and abs(missed - (1 - r["hit_ratio"]) * trace["blocks"]) <= 1e-4 * trace["blocks"] + 1
            assert r["rejected_puts"] == 0
        small = [r for r in rows if r["capacity_share"] == 0.1]
        assert all(r["evictions"] > 0 for r in small)  # the small store was under pressure
        winner = report["winners"][name]
        assert winner["policy"] == max(winner["mean_hit_ratio"], key=winner["mean_hit_ratio"].get)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_store_large_enough_for_the_trace_reaches_the_ceiling():
    trace = [eviction_bench.chain_keys(r) for r in eviction_bench.scan_heavy(random.Random(1), 60)]
    distinct = len({k for keys in trace for k in keys})
    ceiling = eviction_bench.ceiling_hit_ratio(trace)
    for policy in POLICIES:
        r = eviction_bench.replay(trace, policy, distinct, 4096)
        assert r["evictions"] == 0 and abs(r["hit_ratio"] - ceiling) < 1e-12


def test_traces_are_seeded_and_share_prefixes_as_described():
    for name, make in eviction_bench.TRACES.items():
        assert make(random.Random(5), 50) == make(random.Random(5), 50)
        assert make(random.Random(5), 50) != make(random.Random(6), 50)
    chat = eviction_bench.multi_turn_chat(random.Random(0), 200)
    # a turn of a conversation starts with an earlier request of it, whole
    assert sum(any(len(b) > len(a) and b[:len(a)] == a for a in chat[:i]) for i, b in enumerate(chat)) > 100
