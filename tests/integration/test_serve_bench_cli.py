"""``kvmesh bench serve`` refuses bad input with a clear error, before starting anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "kvmesh.cluster.cli", "bench", "serve"]


@pytest.mark.parametrize("argv, message", [
    (["--engine-args=--model /x"], "--model is the benchmark's to set"),
    (["--engine-args=64"], "must be --flags"),
    (["--workload", "cache-pressure", "--engine-args=--block-size 32"], "give --num-gpu-blocks-override"),
    (["--engine-args=--kv-transfer-config {}"], "--kv-transfer-config is not allowed"),
    (["--users", "0"], "must be at least 1"),
    (["--systems", "sglang"], "one or both of kvmesh,vllm"),
])
def test_bad_input_is_a_clear_error(argv, message):
    proc = subprocess.run([*CLI, "--size", "tiny", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
