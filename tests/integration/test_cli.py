import argparse
import os
import signal
import socket
import subprocess
import sys

import pytest

from kvmesh.cluster.cli import build_parser, parse_bytes, seconds, share
from kvmesh.kv_store.node import SHM_PREFIX
from kvmesh.kv_store.tiers import SHM_DIR


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


def test_seconds():
    assert seconds("0.5") == 0.5 and seconds("30") == 30.0
    for bad in ("", "soon", "0", "-1", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            seconds(bad)


@pytest.mark.parametrize("command, flag", [
    ("store", "--heartbeat"), ("store", "--heartbeat-timeout"), ("store", "--peer-timeout"),
    ("prefill", "--store-timeout"), ("decode", "--discovery-timeout"), ("router", "--queue-timeout"),
    ("bench transfer", "--case-seconds")])
@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf"])
def test_durations_must_be_finite_and_positive(command, flag, bad, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([*command.split(), f"{flag}={bad}"])
    assert exit.value.code != 0 and "finite number of seconds above 0" in capsys.readouterr().err


def test_the_heartbeat_timeout_must_outlast_the_heartbeat():
    proc = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "store", "--port", "0", "--host-bytes",
                           "8MiB", "--heartbeat", "5", "--heartbeat-timeout", "5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "heartbeat_timeout (5.0 s) must be longer than heartbeat (5.0 s)" in proc.stderr


def _run_store(*args: str) -> tuple[int, str, list[str]]:
    """Run ``kvmesh store ARGS`` with a small shared-memory host tier to its end; its exit
    status, its stderr and what it left in /dev/shm under its own name."""
    proc = subprocess.Popen([sys.executable, "-m", "kvmesh.cluster.cli", "store", "--host-bytes", "8MiB",
                             "--transfer", "shm", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    left = [n for n in os.listdir(SHM_DIR) if n.startswith(f"{SHM_PREFIX}{proc.pid}-")]
    for name in left:  # not to leave it to the next test run
        os.unlink(os.path.join(SHM_DIR, name))
    return proc.returncode, err, left


@pytest.mark.parametrize("busy_one, error", [("--port", "cannot serve on"),
                                              ("--metrics-port", "cannot serve metrics on"),
                                              ("--transfer-port", "cannot bind the gRPC transfer source to")])
def test_a_busy_port_is_a_clear_error_and_the_store_is_closed(busy_one, error):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        ports = ["--port", taken] if busy_one == "--port" else ["--port", "0", busy_one, taken]
        if busy_one == "--transfer-port":
            ports += ["--transfer", "shm,grpc"]
        rc, err, left = _run_store("--host", "127.0.0.1", *ports)
    assert rc != 0 and "Traceback" not in err
    assert f"kvmesh store: {error} 127.0.0.1:{taken}" in err
    assert left == []


def test_a_tier_that_fails_to_open_closes_those_made_before_it(tmp_path):
    (tmp_path / "file").write_text("")
    rc, err, left = _run_store("--port", "0", "--disk-bytes", "8MiB",
                               "--disk-dir", str(tmp_path / "file" / "slabs"))
    assert rc != 0 and "Traceback" not in err and "kvmesh store:" in err
    assert left == []


def test_a_store_with_no_host_tier_serves(tmp_path):
    """``--host-bytes 0``: no host tier, as its help says; the disk tier alone serves."""
    proc = subprocess.Popen([sys.executable, "-m", "kvmesh.cluster.cli", "store", "--port", "0",
                             "--host-bytes", "0", "--disk-bytes", "8MiB", "--disk-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        serving = next((line for line in proc.stdout if "serving on" in line), "")
        assert "(disk 8388608 bytes; lru eviction)" in serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_help_names_every_command():
    out = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    for command in ("demo", "serve", "model", "store", "prefill", "decode", "router"):
        assert command in out


def test_workers_need_a_store_address_or_an_index(tiny_model):
    proc = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "prefill", "--model", tiny_model],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "give --store" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "router", "--model", tiny_model,
                           "--prefill", "nohostport", "--decode", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not a HOST:PORT address" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "router", "--model", tiny_model],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--index to discover" in proc.stderr


def test_a_missing_model_directory_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "router", "--model", str(tmp_path),
                           "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "not a Hugging Face model directory" in proc.stderr


def test_bad_block_size_is_refused():
    from kvmesh.engine_host.engine_args import EngineArgsError, parse_engine_args

    with pytest.raises(EngineArgsError, match="multiple of 32"):
        parse_engine_args(["--model", "m", "--block-size", "48"], "decode")


def test_parallel_sizes_reach_the_engine_arguments(tiny_model):
    from kvmesh.engine_host.engine_args import parse_engine_args

    args = parse_engine_args(["--model", tiny_model, "-tp", "2", "--pipeline-parallel-size", "2"], "decode")
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 2)
    assert args.distributed_executor_backend == "mp"
    assert parse_engine_args(["--model", tiny_model], "decode").distributed_executor_backend == "uni"


def test_free_ports_avoid_the_ephemeral_range():
    """Ports picked for components started later come from below the range outgoing
    connections draw from, so no client socket takes one first."""
    from kvmesh.cluster.local import _ephemeral_ports, free_port

    low, high = _ephemeral_ports()
    ports = {free_port() for _ in range(50)}
    assert all(p < low or p > high for p in ports) and len(ports) > 40


def test_free_ports_are_never_handed_out_twice(monkeypatch):
    """Components of one cluster draw their ports before any binds one: a draw that
    repeats an earlier one must be drawn again."""
    import random

    from kvmesh.cluster.local import _ephemeral_ports, free_port

    low, _ = _ephemeral_ports()
    draws = iter([low - 5000, low - 5000, low - 5000, low - 4999])
    monkeypatch.setattr(random.SystemRandom, "randrange", lambda self, a, b: next(draws))
    assert [free_port(), free_port()] == [low - 5000, low - 4999]


def test_the_grpc_transfer_offer_names_a_host_readers_can_reach():
    """A store bound to a wildcard (as in a pod: ``--host 0.0.0.0``) tells readers the host
    of ``--advertise``, never the wildcard, and the gRPC transfer serves IPv6 binds too."""
    from kvmesh.kv_store.integrity import checksum
    from kvmesh.kv_store.node import advertised_host, open_transfer_sources
    from kvmesh.kv_store.tiered_store import TieredStore
    from kvmesh.kv_store.tiers import HostTier
    from kvmesh.kv_store.transfer import open_reader
    from kvmesh.kv_store.transfer.base import decode_descriptor
    from kvmesh_proto.options import split_host_port

    assert advertised_host("10.1.2.3:50051", "0.0.0.0") == "10.1.2.3"
    assert advertised_host("[fd00::7]:50051", "::") == "fd00::7"
    assert advertised_host(None, "10.0.0.9") == "10.0.0.9"
    try:  # the machine's address on its default route, never a loopback one
        import ipaddress
        assert not ipaddress.ip_address(advertised_host(None, "0.0.0.0")).is_loopback
    except ValueError as e:  # a machine without a default route: only --advertise can say
        assert "give --advertise" in str(e)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    store = TieredStore([HostTier(8 << 20, 1 << 20, populate=False)])
    try:
        assert store.put(b"k", b"hello", checksum(b"hello"))
        lease, where = store.lease([b"k"], seconds=30)  # a store's source serves leased blocks only
        offset = where[b"k"][0]
        sources = open_transfer_sources(store, ["grpc"], "0.0.0.0", free, advertised_host("10.1.2.3:1", "0.0.0.0"))
        try:
            assert decode_descriptor(sources["grpc"].descriptor())["address"] == f"10.1.2.3:{free}"
        finally:
            sources["grpc"].close()
        with socket.socket() as busy:  # a failed bind leaves nothing that keeps the arena open
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            with pytest.raises(OSError, match="cannot bind the gRPC transfer source"):
                open_transfer_sources(store, ["grpc"], "127.0.0.1", busy.getsockname()[1])
        sources = open_transfer_sources(store, ["grpc"], "::", 0, "::1")
        try:
            address = decode_descriptor(sources["grpc"].descriptor())["address"]
            assert address.startswith("[::1]:") and split_host_port(address)[0] == "::1"
            reader = open_reader(sources["grpc"].descriptor())
            try:
                got = bytearray(5)
                reader.read([(offset, 5)], got, deadline_s=10, lease=lease)
                assert got == b"hello"
            finally:
                reader.close()
        finally:
            sources["grpc"].close()
    finally:
        store.close()


@pytest.mark.parametrize("good, bad", [("[::1]:50051", "::1:50051"), ("host:1", "host"),
                                       ("10.0.0.1:65535", "10.0.0.1:65536")])
def test_addresses_are_checked_and_ipv6_ones_bracketed(good, bad, capsys):
    assert build_parser().parse_args(["store", "--advertise", good]).advertise == good
    with pytest.raises(SystemExit):
        build_parser().parse_args(["store", "--advertise", bad])
    assert "not a HOST:PORT address" in capsys.readouterr().err


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def test_a_component_stops_when_the_cluster_process_is_killed(tmp_path):
    """A local cluster's components end with the process that started them, even when it
    is killed without a chance to stop them (SIGKILL, a closed terminal, a CI timeout)."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from kvmesh.cluster.local import LocalCluster\n"
        f"c = LocalCluster(model='unused', run_dir={str(tmp_path)!r}, verbose=False)\n"
        "p = c._spawn('store', '--port', '0', '--host-bytes', '8MiB', '--transfer', '')\n"
        "print(p.popen.pid, flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    store = None
    try:
        store = int(parent.stdout.readline())
        log = tmp_path / "store.log"
        from tests.waiting import wait_until
        assert wait_until(lambda: "serving on" in log.read_text(errors="replace"), 60)
        parent.kill()
        parent.wait()
        assert wait_until(lambda: _gone(store), 30), "the store outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()
        if store is not None and not _gone(store):
            os.kill(store, signal.SIGKILL)



def test_decode_workers_keep_vllms_prefix_cache_by_default_and_prefill_workers_do_not(tiny_model):
    from kvmesh.engine_host.engine_args import check_engine_args, engine_help

    assert check_engine_args(["--model", tiny_model], "decode").enable_prefix_caching is True
    assert check_engine_args(["--model", tiny_model, "--no-enable-prefix-caching"],
                             "decode").enable_prefix_caching is False
    assert check_engine_args(["--model", tiny_model], "prefill").enable_prefix_caching is False
    assert check_engine_args(["--model", tiny_model]).enable_prefix_caching is False
    assert "--enable-prefix-caching" in engine_help("decode")


@pytest.mark.parametrize("workers", [1, 2])
def test_each_decode_worker_gets_its_own_flags_however_many_there_are(workers):
    """``decode_worker_args`` reach the decode worker they are listed for, the only one
    too (named "decode", not "decode0"), and no other component."""
    from kvmesh.cluster.local import LocalCluster

    own = (("--transfer-preference", "shm", "--no-layerwise"), ("--transfer-preference", "nixl"))[:workers]
    cluster = LocalCluster(model="/a/model", decode_workers=workers, decode_worker_args=own,
                           worker_args=("--max-num-seqs", "4"))
    decode = [c for c in cluster.components if c.kind == "decode"]
    assert [c.extra for c in decode] == [("--max-num-seqs", "4", *flags) for flags in own]
    assert all(c.extra == ("--max-num-seqs", "4") for c in cluster.components if c.kind == "prefill")
