import argparse
import subprocess
import sys

import pytest

from cluster.cli import parse_bytes, share


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("2G") == 2 << 30
    assert parse_bytes("4096") == 4096
    for bad in ("", "lots", "-1G", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bytes(bad)


def test_share():
    assert share("0") == 0.0 and share("0.25") == 0.25
    for bad in ("", "a tenth", "-0.1", "1", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            share(bad)


def test_help_names_every_command():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    for command in ("demo", "serve", "model", "store", "prefill", "decode", "router"):
        assert command in out


def test_workers_need_a_store_address_or_an_index(tiny_model):
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "prefill", "--model", tiny_model],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "give --store" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "router", "--model", tiny_model,
                           "--prefill", "nohostport", "--decode", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not a HOST:PORT address" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "router", "--model", tiny_model],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--index to discover" in proc.stderr


def test_a_missing_model_directory_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "router", "--model", str(tmp_path),
                           "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "not a Hugging Face model directory" in proc.stderr


def test_bad_block_size_is_refused():
    from engine_host.engine import EngineSettings

    with pytest.raises(ValueError, match="multiple of 32"):
        EngineSettings(model="m", role="decode", store_address="a:1", block_size=48)
    with pytest.raises(ValueError, match="role"):
        EngineSettings(model="m", role="router", store_address="a:1")


def test_parallel_sizes_reach_the_engine_arguments(monkeypatch):
    from engine_host.engine import EngineSettings, base_engine_kwargs

    kwargs = base_engine_kwargs(EngineSettings(model="m", role="decode", store_address="a:1",
                                               tensor_parallel_size=2, pipeline_parallel_size=2))
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (2, 2)
    assert kwargs["distributed_executor_backend"] == "mp"
    one = base_engine_kwargs(EngineSettings(model="m", role="decode", store_address="a:1"))
    assert one["distributed_executor_backend"] == "uni"
    with pytest.raises(ValueError, match="at least 1"):
        EngineSettings(model="m", role="decode", store_address="a:1", pipeline_parallel_size=0)
    monkeypatch.setenv("KVMESH_TENSOR_PARALLEL_SIZE", "4")  # the chart's way of passing TP
    import importlib

    import cluster.cli
    args = importlib.reload(cluster.cli).build_parser().parse_args(["decode", "--store", "a:1"])
    assert args.tensor_parallel_size == 4 and args.pipeline_parallel_size == 1


def test_free_ports_avoid_the_ephemeral_range():
    """Ports picked for components started later come from below the range outgoing
    connections draw from, so no client socket takes one first."""
    from cluster.local import _ephemeral_ports, free_port

    low, high = _ephemeral_ports()
    ports = {free_port() for _ in range(50)}
    assert all(p < low or p > high for p in ports) and len(ports) > 40
