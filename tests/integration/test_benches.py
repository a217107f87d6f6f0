"""The router benchmark runs and reports against its baseline (speed is not asserted)."""

import json
import os
import subprocess
import sys

import pytest

from kvmesh.bench.stats import percentile


def test_bench_router_prints_one_json_object(tmp_path):
    # An empty model cache, as on a fresh machine: generating the model must not
    # write its progress into the JSON on stdout.
    env = dict(os.environ, KVMESH_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "bench", "router", "--json",
                          "--requests", "20"], capture_output=True, text=True, timeout=300,
                         check=True, env=env).stdout
    report = json.loads(out)
    base = report["ceiling"]["direct_to_workers"]
    assert base["p99_ms"] >= base["p50_ms"] > 0
    assert base["samples"] == 20  # the timed requests, warm-up ones left out
    assert {r["api"] for r in report["results"]} == {"grpc", "http"}
    for r in report["results"]:
        assert r["samples"] == 20
        assert r["p99_ms"] >= r["p50_ms"] > 0
        assert isinstance(r["added_p50_ms"], float)


@pytest.mark.parametrize("samples, q, expected", [
    (list(range(1, 101)), 0.99, 99),  # of 100, p99 is the 99th, not the largest
    (list(range(1, 21)), 0.99, 20),  # of 20, the largest (the 19th has only 95 % at or below)
    (list(range(1, 11)), 0.9, 9),
    (list(range(1, 101)), 0.07, 7),  # 0.07 * 100 is not quite 7 in floating point
    ([3.5], 0.99, 3.5),
])
def test_percentile_is_the_nearest_rank(samples, q, expected):
    assert percentile(samples, q) == expected


def test_percentile_of_no_samples_is_an_error():
    with pytest.raises(ValueError):
        percentile([], 0.5)
