"""Running a whole kvmesh cluster on one machine: stores, prefill and decode workers, a router.

Each component is its own process (``python -m kvmesh.cluster.cli <component>``) in its own
process group, logging to a file in ``run_dir``, started with the flags that recreate its
settings object (``settings_cli.to_argv``): ``LocalCluster`` plans each component's
settings — from a cluster config through ``plan.py``, as ``kvmesh up`` does, or from its
own fields — then starts them in dependency order, waits (with a deadline) until each
answers its health check, and stops them all on exit, killing whatever does not stop in
time. A component that dies while starting raises ``ClusterError`` with the end of its log.

With a ``restart`` policy, once the cluster has started, a component that dies is
restarted on its own address and flags (``supervisor.Supervisor``: its process group and
``/dev/shm`` segments are cleaned up first, restarts back off, and past the policy's limit
it is given up on: ``failed`` names it and ``gave_up`` is set).

Every cluster has a throwaway secret of its own (``secret``; ``kvmesh.kv_store.auth``),
written to ``run_dir/cluster-secret`` (mode 0600) and named by every component's
``cluster_secret_file``: its components accept internal calls only from each other (and
from whoever holds ``secret``, as the tests do).
"""

from __future__ import annotations

import dataclasses
import json
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
from typing import Callable, Sequence

import grpc

from kvmesh.cluster.settings_cli import to_argv
from kvmesh.cluster.supervisor import RestartPolicy, Supervisor
from kvmesh.engine_host.engine_args import given_flags
from kvmesh.engine_host.settings import DecodeSettings, PrefillSettings
from kvmesh.kv_store.auth import call_metadata, new_secret, write_secret
from kvmesh.kv_store.malloc_tuning import MALLOC_ENV
from kvmesh.kv_store.settings import StoreSettings
from kvmesh.kv_store.settings_base import Settings
from kvmesh.router.settings import RouterSettings
from kvmesh_proto.options import host_port


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


def store_ready(address: str, secret: str | None = None) -> Callable[[], bool]:
    """Whether the store at ``address`` answers a call carrying ``secret``."""
    from kvmesh_proto import store_pb2, store_pb2_grpc

    return _grpc_ready(address, lambda ch: store_pb2_grpc.KVStoreStub(ch).Stats(
        store_pb2.StatsRequest(), timeout=1.0, metadata=call_metadata(secret)) is not None)


def worker_ready(address: str, secret: str | None = None) -> Callable[[], bool]:
    """Whether the worker at ``address`` answers a call carrying ``secret`` with "ok"."""
    from kvmesh_proto import worker_pb2, worker_pb2_grpc

    return _grpc_ready(address, lambda ch: worker_pb2_grpc.WorkerStub(ch).Health(
        worker_pb2.HealthRequest(), timeout=1.0, metadata=call_metadata(secret)).status == "ok")


def http_ready(url: str, status: str | None = None, listed: Sequence[str] = (),
               token: str | None = None) -> Callable[[], bool]:
    """Whether ``url`` answers 200 (and, given ``status``, a JSON body whose ``status``
    is that, and whose ``workers`` name each of ``listed``, asked with ``token``). A
    router's ``/health`` says "ok" once every worker and store it has found is healthy;
    one that discovers its workers through the index may not have found them all yet,
    which ``listed`` (its workers as it names them, "ROLE ADDRESS") waits for."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})

    def ready() -> bool:
        try:
            with urllib.request.urlopen(request, timeout=2.0) as r:
                if r.status != 200 or status is None:
                    return r.status == 200
                body = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        found = body.get("workers") or {}
        return body.get("status") == status and all(found.get(name) == "ok" for name in listed)
    return ready




def worker_cpu_env(role: str, replica: int = 0, replicas: tuple[int, int] = (1, 1),
                   cores: str | None = "auto") -> dict[str, str]:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a worker's engine on a CPU-only machine.

    vLLM's CPU engine binds its OpenMP threads to cores, and an engine that has just
    stepped keeps polling for about a second; two engines bound to the same cores slow
    each other down. With ``cores="auto"`` each of the ``replicas`` (prefill, decode)
    engines gets cores of its own where there are enough; else the first half of the
    usable cores goes to prefill and the rest to decode. ``cores`` None leaves the binding
    to vLLM; any other value is the binding. A binding the user set is kept."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or cores is None:
        return {}
    if cores != "auto":
        return {"VLLM_CPU_OMP_THREADS_BIND": cores}
    usable = sorted(os.sched_getaffinity(0))
    total = sum(replicas)
    if len(usable) >= total > 0:
        per = len(usable) // total
        index = replica if role == "prefill" else replicas[0] + replica
        return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, usable[index * per:(index + 1) * per]))}
    if len(usable) < 2:
        return {}
    half = len(usable) // 2
    mine = usable[:half] if role == "prefill" else usable[half:]
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


@dataclass(frozen=True)
class Component:
    """One planned process: ``kvmesh <kind>`` with ``settings``' flags (a worker's vLLM
    engine arguments after them), then ``extra`` raw flags, in ``env``."""

    name: str
    kind: str  # "store", "prefill", "decode" or "router"
    settings: Settings
    extra: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def argv(self) -> list[str]:
        return [*to_argv(self.settings), *getattr(self.settings, "engine_args", ()), *self.extra]

    @property
    def address(self) -> str:
        return host_port(self.settings.host, self.settings.port)


@dataclass
class LocalCluster:
    """Stores, prefill workers, decode workers and a router on this machine.

    With ``config`` (a ``ClusterConfig``) every component comes from it, on its ports;
    otherwise from the fields below, on free ports. ``worker_args``, ``store_args``,
    ``router_args`` and ``decode_worker_args`` are raw flags added to what is planned (a
    worker's may be vLLM engine flags)."""

    model: str
    served_model_name: str = "kvmesh"
    host: str = "127.0.0.1"
    router_port: int = 0
    block_size: int = 32
    store_capacity_bytes: int = 512 << 20
    store_args: tuple[str, ...] = ()  # more `kvmesh store` flags, e.g. a disk tier
    num_stores: int = 1               # >1: prefill uses the first, decode the last
    prefill_workers: int = 1
    decode_workers: int = 1
    # decode workers keep vLLM's local prefix cache (their default); False: they don't, so
    # every cached prefix they use comes from the store
    decode_local_cache: bool = True
    router_args: tuple[str, ...] = ()  # more `kvmesh router` flags
    # Per-component bind addresses, e.g. {"store": "127.0.0.2", "prefill": "127.0.0.3",
    # "decode": "127.0.0.4"}, so that components talk as separate hosts would; the rest
    # bind ``host``.
    hosts: dict[str, str] = field(default_factory=dict)
    worker_args: tuple[str, ...] = ()  # more `kvmesh prefill|decode` flags (vLLM's too)
    discover: bool = False  # workers and router find each other through index_url
    decode_worker_args: tuple[tuple[str, ...], ...] = ()  # per decode worker, more flags
    role_args: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per role, more flags
    index_url: str | None = None      # shared block index (needed by several stores)
    api_token: str | None = None
    allow_fault_injection: bool = False
    config: object | None = None      # a ClusterConfig: plan everything from it
    run_dir: Path | None = None
    start_timeout_s: float = 300.0
    verbose: bool = True
    restart: RestartPolicy | None = None  # None: a component that dies stays down
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir or tempfile.mkdtemp(prefix="kvmesh-run-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if (self.num_stores > 1 or self.discover) and not self.index_url:
            raise ValueError("several store nodes, or discovery, need a shared block index (index_url)")
        self.secret = new_secret()
        secret_file = self.run_dir / "cluster-secret"
        write_secret(str(secret_file), self.secret)
        planned = self._plan_config() if self.config is not None else self._plan()
        self.components = [dataclasses.replace(c, settings=c.settings.model_copy(
            update={"cluster_secret_file": str(secret_file)})) for c in planned]
        by_kind = {kind: [c for c in self.components if c.kind == kind]
                   for kind in ("store", "prefill", "decode", "router")}
        self.store_addresses = [c.address for c in by_kind["store"]]
        self.store_address = self.store_addresses[0]
        self.store_metrics_urls = [f"http://{host_port(c.settings.host, c.settings.metrics_port)}/metrics"
                                   for c in by_kind["store"] if c.settings.metrics_port]
        self.store_metrics_url = (self.store_metrics_urls or [""])[0]
        self.prefill_addresses = [c.address for c in by_kind["prefill"]]
        self.prefill_address = self.prefill_addresses[0]
        self.decode_addresses = [c.address for c in by_kind["decode"]]
        self.decode_address = self.decode_addresses[0]
        router = by_kind["router"][0].settings
        self.router_port, self.grpc_port = router.port, router.grpc_port
        self.grpc_address = host_port(router.host, router.grpc_port)
        self.router_url = f"http://{host_port(router.host, router.port)}"
        self.served_model_name = router.name
        self.supervisor: Supervisor | None = None

    # ------------------------------------------------------------------ planning

    def _plan(self) -> list[Component]:
        """Components from this cluster's own fields, on free ports."""
        out = []
        store_host = self.hosts.get("store", self.host)
        for i in range(self.num_stores):
            name = "store" if self.num_stores == 1 else f"store{i}"
            settings = StoreSettings(
                host=store_host, port=free_port(store_host), host_bytes=self.store_capacity_bytes,
                metrics_port=free_port(store_host), index=self.index_url,
                node_id=name if self.index_url else None, allow_fault_injection=self.allow_fault_injection)
            out.append(Component(name, "store", settings, tuple(self.store_args)))
        stores = [c.address for c in out]
        counts = (self.prefill_workers, self.decode_workers)
        decode_flags = given_flags((*self.worker_args, *self.role_args.get("decode", ())))
        local_cache = self.decode_local_cache and "--no-enable-prefix-caching" not in decode_flags
        own = {("decode", i): args for i, args in enumerate(self.decode_worker_args)}
        for role, cls, count, store in (("prefill", PrefillSettings, self.prefill_workers, stores[0]),
                                        ("decode", DecodeSettings, self.decode_workers, stores[-1])):
            host = self.hosts.get(role, self.host)
            engine = ["--model", self.model, "--block-size", str(self.block_size)]
            if role == "decode" and not self.decode_local_cache:
                engine.append("--no-enable-prefix-caching")  # vLLM's own flag
            for i in range(count):
                name = role if count == 1 else f"{role}{i}"
                where = {"index": self.index_url} if self.discover else {"store": store}
                settings = cls(host=host, port=free_port(host), model_id=self.served_model_name,
                               engine_args=tuple(engine), **where)
                extra = (*self.worker_args, *self.role_args.get(role, ()), *own.get((role, i), ()))
                out.append(Component(name, role, settings, extra,
                                     tuple(worker_cpu_env(role, i, counts).items())))
        workers = {role: [c.address for c in out if c.kind == role] for role in ("prefill", "decode")}
        where = {"index": self.index_url} if self.discover else workers
        router = RouterSettings(
            model=self.model, served_model_name=self.served_model_name, host=self.host,
            port=self.router_port or free_port(self.host), grpc_port=free_port(self.host),
            block_size=self.block_size, decode_local_cache=local_cache,
            api_token=self.api_token, store=tuple(stores), **where)
        out.append(Component("router", "router", router, tuple(self.router_args)))
        return out

    def _plan_config(self) -> list[Component]:
        """Components from ``config`` through ``plan.py`` (what ``kvmesh up`` deploys), all
        bound to ``host``, on the config's ports."""
        from kvmesh.cluster.plan import router_settings, store_settings, worker_settings

        config = self.config
        model, served = config.resolved_model()
        out = []
        for i in range(len(config.stores)):
            name = "store" if len(config.stores) == 1 else f"store{i}"
            out.append(Component(name, "store", store_settings(config, i, self.host, name)))
        store = out[0].address
        counts = (config.prefill.replicas, config.decode.replicas)
        for role in ("prefill", "decode"):
            group = getattr(config, role)
            for i in range(group.replicas):
                name = role if group.replicas == 1 else f"{role}{i}"
                settings = worker_settings(config, role, i, self.host, store, model, served)
                env = {**worker_cpu_env(role, i, counts, group.cpu_cores), **group.env}
                out.append(Component(name, role, settings, tuple(self.worker_args), tuple(env.items())))
        workers = {role: [c.address for c in out if c.kind == role] for role in ("prefill", "decode")}
        router = router_settings(config, config.router.host or self.host, workers["prefill"],
                                 workers["decode"], model, served, self.api_token or config.api_token(),
                                 tuple(c.address for c in out if c.kind == "store"))
        if self.router_port:
            router = router.model_copy(update={"port": self.router_port})
        out.append(Component("router", "router", router, tuple(self.router_args)))
        return out

    # ------------------------------------------------------------------ running

    def _say(self, message: str) -> None:
        if self.verbose:
            print(f"kvmesh: {message}", flush=True)

    def _popen(self, name: str, *args: str, env: dict[str, str] | None = None,
               command: str | None = None) -> subprocess.Popen:
        """Start ``kvmesh <command or name> ARGS`` appending to ``<name>.log``."""
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
            return subprocess.Popen([sys.executable, "-m", "kvmesh.cluster.cli", command or name, *args],
                                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                    env=full_env, process_group=0)

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None,
               command: str | None = None) -> Process:
        """Start ``kvmesh <command or name> ARGS`` logging to ``<name>.log``."""
        proc = Process(name, self._popen(name, *args, env=env, command=command), self.run_dir / f"{name}.log")
        self.processes.append(proc)
        return proc

    def _start(self, component: Component) -> Process:
        return self._spawn(component.name, *component.argv(), env=dict(component.env), command=component.kind)

    def _supervise(self) -> None:
        """Put every component started so far under ``restart`` supervision."""
        self.supervisor = Supervisor(self.restart, self._say)
        for component in self.components:
            proc = next(p for p in self.processes if p.name == component.name)
            self.supervisor.watch(proc, lambda c=component: self._popen(
                c.name, *c.argv(), env=dict(c.env), command=c.kind))

    @property
    def failed(self) -> dict[str, str]:
        """Components given up on (name: why); empty without supervision."""
        return dict(self.supervisor.failed) if self.supervisor else {}

    def wait_given_up(self, timeout_s: float | None = None) -> bool:
        """Wait (at most ``timeout_s``; None: for ever) until supervision gives up on a
        component; True if it did. False at once without supervision."""
        if self.supervisor is None:
            return False
        return self.supervisor.gave_up.wait(timeout_s)

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
        router = next(c for c in self.components if c.kind == "router").settings
        workers = [f"{c.kind} {c.address}" for c in self.components if c.kind in ("prefill", "decode")]
        ready = {"store": lambda address: store_ready(address, self.secret),
                 "prefill": lambda address: worker_ready(address, self.secret),
                 "decode": lambda address: worker_ready(address, self.secret),
                 "router": lambda address: http_ready(self.router_url + "/health", "ok", workers,
                                                      router.api_token)}
        self._say(f"starting stores, prefill and decode workers (logs in {self.run_dir})")
        try:
            # Stores first (a worker's connector calls its store from its start); the
            # router starts beside the workers and is ready once its health poll has
            # found every one of them (and every store) healthy.
            for kinds in (("store",), ("prefill", "decode", "router")):
                if "prefill" in kinds:
                    self._say("loading the model in the workers (this takes a little while)")
                pending = {c.name: (self._start(c), ready[c.kind](c.address))
                           for c in self.components if c.kind in kinds}
                self._wait(pending, deadline)
            if self.restart is not None:
                self._supervise()
        except BaseException:
            self.stop()
            raise
        return self

    def add_router(self, name: str, *args: str) -> tuple[str, str]:
        """Start one more router over the same workers (e.g. with other limits or routing);
        returns its HTTP URL and gRPC address. It stops with the cluster."""
        base = next(c for c in self.components if c.kind == "router")
        settings = base.settings.model_copy(update={"port": free_port(self.host),
                                                    "grpc_port": free_port(self.host)})
        proc = self._start(Component(name, "router", settings, args))
        url = f"http://{host_port(settings.host, settings.port)}"
        self._wait({name: (proc, http_ready(url + "/health"))}, time.monotonic() + self.start_timeout_s)
        return url, host_port(settings.host, settings.grpc_port)

    def kill(self, name: str) -> None:
        """Kill one component at once (SIGKILL to its process group), as a crash would
        (under supervision it is restarted, as after a crash)."""
        for proc in self.processes:
            if proc.name == name and proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop supervision, then every component, router first; kill process groups that
        outlive ``timeout_s``."""
        if self.supervisor is not None:
            self.supervisor.stop()
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
