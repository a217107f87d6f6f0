"""A worker's command line passes vLLM's own engine flags through to its engine, and
refuses the ones kvmesh must own before the engine loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _health(address: str):
    import grpc

    from kvmesh_proto import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Health(worker_pb2.HealthRequest(), timeout=2)


def test_vllm_engine_flags_reach_the_engine(tiny_model, tmp_path):
    """vLLM's own engine flags pass through a worker's command line unchanged: the worker
    reports the engine they configured."""
    import json
    import time

    from kvmesh.cluster.local import free_port

    port = free_port()
    log = open(tmp_path / "prefill.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kvmesh.cluster.cli", "prefill", "--model", tiny_model,
                             "--port", str(port), "--store", "127.0.0.1:1", "--max-num-seqs", "8",
                             "--num-gpu-blocks-override", "512", "--max_num_batched_tokens=1024"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "prefill.log").read_text()[-3000:]
            try:
                reply = _health(f"127.0.0.1:{port}")
                break
            except Exception:
                assert time.monotonic() < deadline, "the worker did not start"
                time.sleep(1)
        engine = json.loads(reply.engine_config)
        assert (engine["max_num_seqs"], engine["num_gpu_blocks"], engine["max_num_batched_tokens"]) == (8, 512, 1024)
        assert engine["block_size"] == reply.block_size == 32 and engine["enable_prefix_caching"] is False
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize("role, flags, says", [
    ("prefill", ["--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'],
     "--kv-transfer-config is not allowed here: kvmesh sets vLLM's KV transfer config itself"),
    ("prefill", ["--enable-prefix-caching"], "--enable-prefix-caching is not allowed here: a prefill worker"),
    ("decode", ["--max-num-seqs", "many"], "argument --max-num-seqs: invalid int value: 'many'"),
    ("decode", ["--no-such-engine-flag"], "unrecognized arguments: --no-such-engine-flag"),
])
def test_engine_flags_kvmesh_must_own_are_refused_before_the_engine_loads(tiny_model, role, flags, says):
    proc = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", role, "--model", tiny_model,
                           "--store", "127.0.0.1:1", *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"kvmesh {role}: {says}" in proc.stderr, proc.stderr[-2000:]


def test_worker_help_lists_vllm_engine_arguments():
    out = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "decode", "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    for flag in ("--store-timeout", "--transfer-preference", "--max-num-seqs", "--num-gpu-blocks-override",
                 "--speculative-config"):
        assert flag in out, flag
