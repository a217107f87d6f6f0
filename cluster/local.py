"""Running a whole kvmesh cluster on one machine: store, prefill, decode, router.

Each component is its own process (``python -m kvmesh.cluster.cli <component>``) in its own
process group, logging to a file in ``run_dir``. ``LocalCluster`` starts them in
dependency order, waits (with a deadline) until each answers its health check, and
stops them all on exit, killing whatever does not stop in time. A component that dies
while starting raises ``ClusterError`` with the end of its log.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from kvmesh.kv_store.malloc_tuning import MALLOC_ENV


class ClusterError(RuntimeError):
    pass


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel hands out to outgoing connections and to ``bind(port 0)``."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_HANDED_OUT: set[tuple[str, int]] = set()  # ports free_port gave this process
_HANDED_OUT_LOCK = threading.Lock()


EXIT_WITH_PARENT_ENV = "KVMESH_EXIT_WITH_PARENT"


def exit_with_parent() -> bool:
    """In a component a ``LocalCluster`` started (``EXIT_WITH_PARENT_ENV`` is set; it is
    taken out of the environment, so the component's own children do not act on it): a
    thread that sends this process SIGTERM, its orderly stop, once its stdin reaches EOF,
    which happens when the cluster's process has ended, even killed. True if started."""
    if os.environ.pop(EXIT_WITH_PARENT_ENV, None) != "1":
        return False

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="kvmesh-parent-watch", daemon=True).start()
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a component started later, and never one this
    process was given before (components drawn together bind only later, so a port
    free for each draw could be drawn twice).

    It is drawn from below the kernel's ephemeral range: a port from inside it (what
    ``bind(0)`` gives) can be taken by any outgoing connection in the seconds before the
    component binds it, which made workers fail to start. Falls back to ``bind(0)`` where
    no room is left below that range."""
    with _HANDED_OUT_LOCK:
        port = _draw_port(host)
        _HANDED_OUT.add((host, port))
        return port


def _draw_port(host: str) -> int:
    low, _ = _ephemeral_ports()
    if low - 10000 >= 1024:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(low - 10000, low)
            if (host, port) in _HANDED_OUT:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    while True:  # the kernel hands out ephemeral ports in turn: a repeat is rare
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if (host, port) not in _HANDED_OUT:
            return port


def _grpc_ready(address: str, check: Callable[[grpc.Channel], bool]) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with grpc.insecure_channel(address) as channel:
                return check(channel)
        except grpc.RpcError:
            return False
    return ready


def store_ready(address: str) -> Callable[[], bool]:
    from kvmesh_proto import store_pb2, store_pb2_grpc

    return _grpc_ready(address, lambda ch: store_pb2_grpc.KVStoreStub(ch).Stats(
        store_pb2.StatsRequest(), timeout=1.0) is not None)


def worker_ready(address: str) -> Callable[[], bool]:
    from kvmesh_proto import worker_pb2, worker_pb2_grpc

    return _grpc_ready(address, lambda ch: worker_pb2_grpc.WorkerStub(ch).Health(
        worker_pb2.HealthRequest(), timeout=1.0).status == "ok")


def http_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False
    return ready




def worker_cpu_env(role: str) -> dict[str, str]:
    """Give the prefill and decode engines separate CPU cores on a CPU-only machine.

    vLLM's CPU engine binds its OpenMP threads to cores, and an engine that has just
    stepped keeps polling for about a second; two engines bound to the same cores slow
    each other down. The first half of the usable cores goes to prefill, the rest to
    decode. A binding the user set (``VLLM_CPU_OMP_THREADS_BIND``) is kept.
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {}
    half = len(cores) // 2
    mine = cores[:half] if role == "prefill" else cores[half:]
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine))}


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""


@dataclass
class LocalCluster:
    """A store, a prefill worker, a decode worker and a router on this machine."""

    model: str
    served_model_name: str = "kvmesh"
    host: str = "127.0.0.1"
    router_port: int = 0
    block_size: int = 32
    store_capacity_bytes: int = 512 << 20
    store_args: tuple[str, ...] = ()  # more `kvmesh store` flags, e.g. a disk tier
    num_stores: int = 1               # >1: prefill uses the first, decode the last
    decode_workers: int = 1
    decode_local_cache: bool = False  # decode workers keep vLLM's prefix cache too
    router_args: tuple[str, ...] = ()  # more `kvmesh router` flags
    # Per-component bind addresses, e.g. {"store": "127.0.0.2", "prefill": "127.0.0.3",
    # "decode": "127.0.0.4"}, so that components talk as separate hosts would; the rest
    # bind ``host``.
    hosts: dict[str, str] = field(default_factory=dict)
    worker_args: tuple[str, ...] = ()  # more `kvmesh prefill|decode` flags
    discover: bool = False  # workers and router find each other through index_url
    decode_worker_args: tuple[tuple[str, ...], ...] = ()  # per decode worker, more flags
    index_url: str | None = None      # shared block index (needed by several stores)
    api_token: str | None = None
    allow_fault_injection: bool = False
    run_dir: Path | None = None
    start_timeout_s: float = 300.0
    verbose: bool = True
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir or tempfile.mkdtemp(prefix="kvmesh-run-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if (self.num_stores > 1 or self.discover) and not self.index_url:
            raise ValueError("several store nodes, or discovery, need a shared block index (index_url)")
        store_host = self.hosts.get("store", self.host)
        self.store_addresses = [f"{store_host}:{free_port(store_host)}" for _ in range(self.num_stores)]
        self.store_address = self.store_addresses[0]
        self.store_metrics_urls = []
        prefill_host = self.hosts.get("prefill", self.host)
        decode_host = self.hosts.get("decode", self.host)
        self.prefill_address = f"{prefill_host}:{free_port(prefill_host)}"
        self.decode_addresses = [f"{decode_host}:{free_port(decode_host)}"
                                 for _ in range(self.decode_workers)]
        self.decode_address = self.decode_addresses[0]
        self.grpc_port = free_port(self.host)
        self.grpc_address = f"{self.host}:{self.grpc_port}"
        for _ in self.store_addresses:
            self.store_metrics_urls.append(f"http://{store_host}:{free_port(store_host)}/metrics")
        self.store_metrics_url = self.store_metrics_urls[0]
        self.router_port = self.router_port or free_port(self.host)
        self.router_url = f"http://{self.host}:{self.router_port}"

    def _say(self, message: str) -> None:
        if self.verbose:
            print(f"kvmesh: {message}", flush=True)

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None,
               command: str | None = None) -> Process:
        """Start ``kvmesh <command or name> ARGS`` logging to ``<name>.log``."""
        log_path = self.run_dir / f"{name}.log"
        full_env = dict(MALLOC_ENV, **os.environ)
        full_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                        **{EXIT_WITH_PARENT_ENV: "1"})
        full_env.update(env or {})
        # A process group of its own (stopping it reaches its engine processes; a terminal's
        # Ctrl-C reaches only us), but not a session of its own: Linux schedules each
        # session as one group (autogroup), and with every component in its own, a busy
        # decode engine starved the others for seconds on two cores (streams stalled).
        # Its stdin is a pipe only this process writes: when this process ends, however it
        # ends (SIGKILL included), the component reads EOF and stops (``exit_with_parent``).
        with open(log_path, "ab") as log:
            popen = subprocess.Popen([sys.executable, "-m", "kvmesh.cluster.cli", command or name, *args],
                                     stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                     env=full_env, process_group=0)
        proc = Process(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def _wait(self, pending: dict[str, tuple[Process, Callable[[], bool]]], deadline: float) -> None:
        while pending:
            for name, (proc, ready) in list(pending.items()):
                if proc.popen.poll() is not None:
                    raise ClusterError(f"{name} exited with code {proc.popen.returncode} while "
                                       f"starting; end of {proc.log_path}:\n{proc.log_tail()}")
                if ready():
                    self._say(f"{name} is ready")
                    del pending[name]
            if pending and time.monotonic() > deadline:
                names = ", ".join(pending)
                raise ClusterError(f"{names} not ready after {self.start_timeout_s:.0f}s; "
                                   f"logs in {self.run_dir}")
            time.sleep(0.25)

    def start(self) -> "LocalCluster":
        deadline = time.monotonic() + self.start_timeout_s
        self._say(f"starting store, prefill and decode workers (logs in {self.run_dir})")
        try:
            pending = {}
            for i, (address, metrics) in enumerate(zip(self.store_addresses, self.store_metrics_urls)):
                name = "store" if self.num_stores == 1 else f"store{i}"
                args = ["--host", address.rsplit(":", 1)[0], "--port", address.rsplit(":", 1)[1],
                        "--host-bytes", str(self.store_capacity_bytes),
                        "--metrics-port", metrics.rsplit(":", 1)[1].split("/")[0], *self.store_args]
                if self.index_url:
                    args += ["--index", self.index_url, "--node-id", name]
                if self.allow_fault_injection:
                    args.append("--allow-fault-injection")
                pending[name] = (self._spawn(name, *args, command="store"), store_ready(address))
            self._wait(pending, deadline)
            pending = {}
            workers = [("prefill", "prefill", self.prefill_address, self.store_addresses[0])]
            for i, address in enumerate(self.decode_addresses):
                name = "decode" if self.decode_workers == 1 else f"decode{i}"
                workers.append((name, "decode", address, self.store_addresses[-1]))
            own = dict(zip((f"decode{i}" for i in range(self.decode_workers)), self.decode_worker_args))
            for name, role, address, store in workers:
                extra = ["--local-prefix-cache"] if role == "decode" and self.decode_local_cache else []
                where = ["--index", self.index_url] if self.discover else ["--store", store]
                proc = self._spawn(name, "--model", self.model, "--host", address.rsplit(":", 1)[0],
                                   "--port", address.rsplit(":", 1)[1], *where,
                                   "--block-size", str(self.block_size),
                                   "--model-id", self.served_model_name, *extra, *self.worker_args,
                                   *own.get(name, ()),
                                   env=worker_cpu_env(role), command=role)
                pending[name] = (proc, worker_ready(address))
            self._say("loading the model in both workers (this takes a little while)")
            self._wait(pending, deadline)
            router_args = ["--model", self.model, "--served-model-name", self.served_model_name,
                           "--host", self.host, "--port", str(self.router_port),
                           "--grpc-port", str(self.grpc_port), "--block-size", str(self.block_size),
                           *(["--index", self.index_url] if self.discover else
                             ["--prefill", self.prefill_address, "--decode", ",".join(self.decode_addresses)]),
                           *self.router_args]
            if self.decode_local_cache:
                router_args.append("--decode-local-cache")
            if self.api_token:
                router_args += ["--api-token", self.api_token]
            router = self._spawn("router", *router_args)
            self._wait({"router": (router, http_ready(self.router_url + "/health"))}, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def add_router(self, name: str, *args: str) -> tuple[str, str]:
        """Start one more router over the same workers (e.g. with other limits or routing);
        returns its HTTP URL and gRPC address. It stops with the cluster."""
        http_port, grpc_port = free_port(self.host), free_port(self.host)
        proc = self._spawn(name, "--model", self.model, "--served-model-name", self.served_model_name,
                           "--host", self.host, "--port", str(http_port), "--grpc-port", str(grpc_port),
                           "--block-size", str(self.block_size), "--prefill", self.prefill_address,
                           "--decode", ",".join(self.decode_addresses), *args, command="router")
        url = f"http://{self.host}:{http_port}"
        self._wait({name: (proc, http_ready(url + "/health"))}, time.monotonic() + self.start_timeout_s)
        return url, f"{self.host}:{grpc_port}"

    def kill(self, name: str) -> None:
        """Kill one component at once (SIGKILL to its process group), as a crash would."""
        for proc in self.processes:
            if proc.name == name and proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop every component, router first; kill process groups that outlive ``timeout_s``."""
        for proc in reversed(self.processes):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in reversed(self.processes):
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the engine's own child processes share the group
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.popen.wait()
            proc.popen.stdin.close()
        self.processes.clear()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
