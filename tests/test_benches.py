"""The router benchmark runs and reports against its baseline (speed is not asserted)."""

import json
import os
import subprocess
import sys


def test_bench_router_prints_one_json_object(tmp_path):
    # An empty model cache, as on a fresh machine: generating the model must not
    # write its progress into the JSON on stdout.
    env = dict(os.environ, KVMESH_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "router", "--json",
                          "--requests", "20"], capture_output=True, text=True, timeout=300,
                         check=True, env=env).stdout
    report = json.loads(out)
    base = report["ceiling"]["direct_to_workers"]
    assert base["p99_ms"] >= base["p50_ms"] > 0
    assert {r["api"] for r in report["results"]} == {"grpc", "http"}
    for r in report["results"]:
        assert r["p50_ms"] > 0 and r["added_p50_ms"] == round(r["p50_ms"] - base["p50_ms"], 3)
