"""kvmesh on a Ray cluster: ``up`` deploys a cluster config, ``status`` shows it, ``down`` removes it.

Every component is a named, detached actor in the ``kvmesh`` namespace that Ray restarts
when its process dies (``max_restarts=-1``):

* ``store-N``: one per Ray node that offers the store's ``node_resource`` (the head when
  none), pinned to that node. It runs the store's gRPC server in the actor process.
* ``prefill-N``, ``decode-N``: one per worker replica, in a placement group of TP x PP
  bundles packed on one node (``STRICT_PACK``, named ``kvmesh:ROLE-N``); the first bundle
  also holds the replica's custom resources (e.g. ``{prefill: 1}``), which pick the node.
  The actor runs the vLLM engine with vLLM's own executor (Ray's is refused on the CPU)
  and the worker gRPC API on an asyncio loop in a thread. It uses the store on its node,
  or the first store when its node has none. A worker whose engine dies after it served
  exits its process, so that Ray restarts it.
* ``router-N``: one per node offering the router's ``node_resource`` (the head when
  none); uvicorn serves the HTTP API (and the gRPC serving API) in a thread.
* ``deployment``: a record of what ``up`` deployed (the config, whether it started the
  Ray cluster itself), for ``down``.

Each actor binds its node's IP on the port the config gives it (worker replica ``i``:
``port + i``). A restarted actor runs its constructor again with the same arguments, on
the same node (a worker's placement group, a store's or router's node affinity), so it
comes back on the same address and the router finds it again. KV bytes never travel
through Ray: components talk gRPC to each other; Ray only places and restarts them.

The cluster secret (``kvmesh.kv_store.auth``): ``up`` takes ``KVMESH_CLUSTER_SECRET`` from
its own environment, or makes a fresh one, and passes it to every actor as a constructor
argument (so a restarted actor has it again); the actor puts it in its process's
environment, where its component, and a worker's engine processes, read it. Ray keeps
actor arguments in its control store: whoever can run code on the Ray cluster can read
the secret, as they could start components of their own anyway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from kvmesh.cluster.config import ClusterConfig, ConfigError
from kvmesh.cluster.plan import router_settings, store_settings, worker_settings
from kvmesh.kv_store.auth import load_secret, new_secret
from kvmesh_proto.options import WILDCARD_HOSTS, host_port

NAMESPACE = "kvmesh"
PG_PREFIX = "kvmesh:"
RECORD_NAME = "deployment"
_STANDARD_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}

log = logging.getLogger("kvmesh.ray")


class DeployError(RuntimeError):
    """``up``, ``status`` or ``down`` could not do what was asked; the message says why."""


def _ray():
    try:
        import ray
    except ImportError:
        raise DeployError("the Ray deployment needs Ray: pip install 'ray[default]==2.60.0'") from None
    return ray


# ====================================================================== actors
#
# Plain classes, made Ray actors with ``ray.remote(cls)`` where they are deployed, so
# this module imports without Ray. Each actor's constructor returns quickly; a
# component that needs long to start (an engine loading its model) starts in a thread,
# and ``health()`` says when it is ready (or raises the error that stopped it).


class _Component:
    kind = "component"

    def __init__(self, name: str, secret: str | None = None):
        import ray

        from kvmesh.kv_store.settings_base import SECRET_ENV

        if secret:  # before the component starts: it (and a worker's engine) reads it there
            os.environ[SECRET_ENV] = secret
        self.secret = secret
        self.name = name
        self.node_ip = ray.util.get_node_ip_address()
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.restarted = bool(context.was_current_actor_reconstructed)
        self.started_at = time.time()
        self.address = ""
        self.error: str | None = None  # why the component stopped working, with traceback

    def info(self) -> dict:
        return {"name": self.name, "kind": self.kind, "node_ip": self.node_ip,
                "node_id": self.node_id, "address": self.address, "pid": os.getpid(),
                "restarted": self.restarted, "started_at": self.started_at}

    def _check(self) -> None:
        if self.error:
            raise RuntimeError(f"{self.name} failed:\n{self.error}")

    def started_with(self):
        """The settings this component was started with (``plan.py``'s, as ``kvmesh serve
        --config`` starts the same component)."""
        return self.settings


class StoreActor(_Component):
    """A store node (``StoreNode``: tiers, transfer sources, gRPC server, index), in this
    process, from the settings ``plan.store_settings`` made: as ``kvmesh store`` runs it."""

    kind = "store"

    def __init__(self, name: str, settings, secret: str | None = None):
        super().__init__(name, secret)
        from kvmesh.kv_store.node import StoreNode

        if settings.disk_bytes and settings.disk_dir:
            os.makedirs(settings.disk_dir, exist_ok=True)
        self.settings = settings
        self.node = StoreNode.start(settings, say=lambda m: print(f"kvmesh {name}: {m}", flush=True))
        self.address = self.node.address

    def health(self) -> bool:
        from kvmesh.cluster.local import store_ready

        self._check()
        return store_ready(self.address, self.secret)()

    def stop(self) -> None:
        self.node.close()


def _disk_dir(name: str) -> str:
    """A store's disk directory when the config names none: a fixed one per store, so
    that a restarted store finds the slab file its killed predecessor left and removes it
    (``build_store`` removes the slab files no live store holds)."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"kvmesh-{name}")


def auto_cpu_bind(role: str, world_size: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``cpu_cores: auto``: the role's half of this
    machine's cores (as ``cluster.local.worker_cpu_env``), one group per rank
    (``"0,1|2,3"``), all cores when the half has fewer than ``world_size``; None where
    there are too few cores (vLLM then binds by itself) or the variable is set already."""
    from kvmesh.cluster.local import worker_cpu_env

    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None
    half = worker_cpu_env(role, 0, (1, 1)).get("VLLM_CPU_OMP_THREADS_BIND")
    if world_size == 1:
        return half
    cores = [int(c) for c in half.split(",")] if half else []
    if len(cores) < world_size:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < world_size:
            return None
    per = len(cores) // world_size
    return "|".join(",".join(map(str, cores[r * per:(r + 1) * per])) for r in range(world_size))


class WorkerActor(_Component):
    """A prefill or decode worker: ``engine_host.service.serve_worker`` on a thread's loop."""

    def __init__(self, name: str, settings, world_size: int, env: dict[str, str],
                 cpu_cores: str | None, visible_devices: list[str] | None, secret: str | None = None):
        super().__init__(name, secret)
        role = settings.role
        self.kind = role
        self.address = host_port(settings.host, settings.port)
        os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                           "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib)})
        if cpu_cores == "auto":
            bind = auto_cpu_bind(role, world_size)
            if bind:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        elif cpu_cores:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
        if visible_devices is not None:  # the GPUs of this replica's bundles
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_devices)
        os.environ.update(env)
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"kvmesh-{name}", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name=f"kvmesh-{name}-watch", daemon=True).start()

    def _serve(self) -> None:
        from kvmesh.engine_host.service import serve_worker

        # Signals belong to the actor's main thread (Ray's): ``stop()`` cancels the task.
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._task = loop.create_task(serve_worker(self.settings, stop=asyncio.Event()))
            loop.run_until_complete(self._task)
            if self.error is None:
                self.error = "the worker stopped"
        except asyncio.CancelledError:
            self.error = "stopped"
        except BaseException:
            self.error = traceback.format_exc()
        finally:
            loop.close()

    def _engine_status(self) -> str | None:
        """The worker API's own health ("ok", "error": the engine died), None: no answer."""
        import grpc

        from kvmesh.kv_store.auth import call_metadata
        from kvmesh_proto import worker_pb2, worker_pb2_grpc

        try:
            with grpc.insecure_channel(self.address) as channel:
                return worker_pb2_grpc.WorkerStub(channel).Health(
                    worker_pb2.HealthRequest(), timeout=2.0, metadata=call_metadata(self.secret)).status
        except grpc.RpcError:
            return None

    def _watch(self, period_s: float = 2.0) -> None:
        """A worker that served and then lost its engine (the engine process died, the
        serving thread failed) exits its process, so that Ray restarts it on the same
        address. One that never served stays up with its error for ``up`` to report,
        rather than restarting forever over a bad setting. Slow answers are not failures."""
        served, errors = False, 0
        while not self._stopping.wait(period_s):
            if not self._thread.is_alive():
                if served and not self._stopping.is_set():
                    self._exit(f"its serving thread ended: {self.error}")
                return
            state = self._engine_status()
            if state == "ok":
                served, errors = True, 0
            elif state == "error" and served:
                errors += 1
                if errors >= 2:
                    self._exit("its engine failed")

    def _exit(self, why: str) -> None:
        log.error("%s: %s; exiting so that Ray restarts this worker", self.name, why)
        print(f"kvmesh {self.name}: {why}; exiting so that Ray restarts it", flush=True)
        os._exit(1)

    def health(self) -> bool:
        from kvmesh.cluster.local import worker_ready

        self._check()
        return worker_ready(self.address, self.secret)()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the API and shut the engine down (its processes exit with it)."""
        self._stopping.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile
                pass
        self._thread.join(timeout_s)


class RouterActor(_Component):
    """The router: the OpenAI HTTP API (and the gRPC serving API) under uvicorn, in a thread."""

    kind = "router"

    def __init__(self, name: str, settings, secret: str | None = None):
        super().__init__(name, secret)
        from kvmesh.router.app import router_server

        os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        self.settings = settings
        reach = reachable_host(settings.host, self.node_ip)
        self.address = host_port(reach, settings.port)
        self.grpc_address = host_port(reach, settings.grpc_port) if settings.grpc_port else ""
        self.server = router_server(settings)
        self._thread = threading.Thread(target=self._serve, name=f"kvmesh-{name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.server.run()
        except BaseException:
            self.error = traceback.format_exc()
        if not self.server.should_exit:  # not stop(): it failed
            self.error = self.error or "the router stopped (is its port taken?)"
            if self.server.started:  # it served: a crash, for Ray to restart
                print(f"kvmesh {self.name}: {self.error}; exiting so that Ray restarts it", flush=True)
                os._exit(1)

    def info(self) -> dict:
        return {**super().info(), "url": f"http://{self.address}", "grpc_address": self.grpc_address}

    def health(self) -> bool:
        from kvmesh.cluster.local import http_ready

        self._check()
        return http_ready(f"http://{self.address}/health")()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)


def reachable_host(bind: str, node_ip: str) -> str:
    """The host clients (and the health check) reach a server bound to ``bind`` by: the
    node's IP for a wildcard bind, else the bound host itself (a router bound to
    127.0.0.1 answers only there)."""
    return node_ip if bind in WILDCARD_HOSTS else bind


class DeploymentRecord:
    """What ``up`` deployed (the plan, the config), for ``status`` and ``down``."""

    def __init__(self, record: dict):
        self.record = record

    def get(self) -> dict:
        return self.record

    def health(self) -> bool:
        return True

    def stop(self) -> None:
        pass


def _gpu_ids() -> list[str]:
    """Run in a placement-group bundle: the GPUs Ray gave it."""
    import ray

    return [str(g) for g in ray.get_gpu_ids()]


# ====================================================================== connecting


def _reachable(address: str, timeout_s: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _recorded_address() -> str | None:
    """The cluster ``RAY_ADDRESS`` or this machine's Ray records name, if any."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto")
    except Exception:  # none recorded (or Ray's private helper changed)
        return None


def connect(address: str | None = None) -> None:
    """Connect this process to the Ray cluster at ``address`` (None or "auto": the one
    ``RAY_ADDRESS`` or this machine's records name). Raises ``DeployError`` fast when it
    does not answer, rather than letting ``ray.init`` wait on a stale record."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address in (None, "auto"):
        address = _recorded_address()
        if not address:
            raise DeployError("no Ray cluster found: start one (ray start --head), "
                              "give --address HOST:PORT or set RAY_ADDRESS")
    if address.startswith("ray://"):
        raise DeployError("give the cluster's GCS address HOST:PORT, not a ray:// client address")
    if not _reachable(address):
        raise DeployError(f"no Ray cluster answers at {address} (stale record? give --address "
                          "HOST:PORT of a running cluster)")
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)


def _ray_command() -> str:
    """The ``ray`` command of the Python running kvmesh."""
    beside = os.path.join(os.path.dirname(sys.executable), "ray")
    return beside if os.path.exists(beside) else (shutil.which("ray") or "ray")


def _start_local_ray(resources: dict[str, float], say: Callable[[str], None],
                     timeout_s: float = 120.0) -> str:
    """Start a Ray head on this machine (``ray start --head``) with ``resources``; returns
    its address (this node's IP and the port it was started on, whatever ``RAY_ADDRESS``
    says). It outlives this process: ``down`` stops it again. A start that fails, times
    out or is interrupted runs ``ray stop``, which stops this user's Ray processes on
    this machine (none other runs: a reachable cluster was refused above)."""
    recorded = _recorded_address()
    if recorded and _reachable(recorded):
        raise DeployError(f"a Ray cluster already runs at {recorded}: deploy onto it with "
                          f"--address {recorded}, or stop it first (ray stop)")
    say(f"starting a local Ray cluster (custom resources: {resources or 'none'})")
    ray_cli = _ray_command()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    cmd = [ray_cli, "start", "--head", f"--port={port}", "--disable-usage-stats",
           f"--resources={json.dumps(resources)}"]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DeployError(f"could not start a local Ray cluster: {e}") from None
        if proc.returncode != 0:
            raise DeployError(f"`ray start --head` failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    except BaseException:  # its daemons may have started: none is left running
        try:
            subprocess.run([ray_cli, "stop"], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:  # the start's own error is what to report
            log.warning("could not stop the Ray processes of the failed start (ray stop): %s", e)
        raise
    return host_port(_ray().util.get_node_ip_address(), port)


def _stop_local_ray() -> None:
    """Stop the Ray cluster on this machine (``ray stop``), this process's link first."""
    ray = _ray()
    ray.shutdown()
    subprocess.run([_ray_command(), "stop"], capture_output=True, timeout=120)


# ====================================================================== planning


def _alive_nodes() -> list[dict]:
    ray = _ray()
    return [n for n in ray.nodes() if n.get("Alive")]


def _is_head(node: dict) -> bool:
    return "node:__internal_head__" in node["Resources"]


def _nodes_for(resource: str | None, nodes: list[dict]) -> list[dict]:
    if resource is None:
        return [n for n in nodes if _is_head(n)]
    return sorted((n for n in nodes if n["Resources"].get(resource, 0) > 0),
                  key=lambda n: n["NodeManagerAddress"])


def _bundles(group) -> list[dict[str, float]]:
    bundles = [dict(group.resources_per_rank) for _ in range(group.world_size)]
    for key, value in group.resources.items():
        bundles[0][key] = bundles[0].get(key, 0) + value
    return bundles


def local_resources(config: ClusterConfig) -> dict[str, float]:
    """Custom resources a one-node Ray cluster needs to host ``config``."""
    out: dict[str, float] = {}
    for group in (config.prefill, config.decode):
        for key, value in group.resources.items():
            if key not in _STANDARD_RESOURCES:
                out[key] = out.get(key, 0) + value * group.replicas
    for resource in [s.node_resource for s in config.stores] + [config.router.node_resource]:
        if resource and resource not in _STANDARD_RESOURCES:
            out[resource] = max(out.get(resource, 0), 1)
    return out


@dataclass
class Deployment:
    """What ``up`` started; ``components`` as ``status`` reports them."""

    router_urls: list[str]
    grpc_addresses: list[str]
    components: list[dict] = field(default_factory=list)
    started_local_ray: bool = False


# ====================================================================== up


def _options(name: str, **extra) -> dict:
    return dict(name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
                max_concurrency=8, **extra)


def _pin(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


class _QuietPlacementGroupWarning(logging.Filter):
    """Ray warns that a restartable detached actor in a placement group dies with the
    group: that is what ``down`` relies on, so the warning is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "restartable detached actor with a placement group" not in record.getMessage()


def _wait_healthy(handles: dict[str, Any], deadline: float, say: Callable[[str], None]) -> None:
    """Poll each actor's ``health()`` until all are true; raise ``DeployError`` on the first
    one that fails for good, or at the deadline."""
    ray = _ray()
    pending = dict(handles)
    while pending:
        for name, handle in list(pending.items()):
            try:
                ok = ray.get(handle.health.remote(), timeout=10)
            except ray.exceptions.GetTimeoutError:
                ok = False
            except ray.exceptions.RayActorError as e:
                raise DeployError(f"{name} died while starting: {e}") from None
            except ray.exceptions.RayTaskError as e:
                raise DeployError(f"{name} failed while starting: {e.cause if e.cause else e}") from None
            if ok:
                say(f"{name} is ready")
                del pending[name]
        if pending and time.monotonic() > deadline:
            raise DeployError(f"not ready before the deadline: {', '.join(pending)}")
        if pending:
            time.sleep(0.5)


def up(config: ClusterConfig, address: str | None = None, *, timeout_s: float = 600.0,
       say: Callable[[str], None] = lambda m: print(f"kvmesh: {m}", flush=True)) -> Deployment:
    """Deploy ``config`` onto the Ray cluster at ``address`` (None: start a new one on this
    machine, with the custom resources the config asks for) and wait until every
    component answers its health check. On failure everything started is removed again
    and ``DeployError`` says why."""
    ray = _ray()
    deadline = time.monotonic() + timeout_s
    model, served_name = config.resolved_model()
    api_token = config.api_token()
    secret = load_secret() or new_secret()  # KVMESH_CLUSTER_SECRET, else a fresh one
    actor_log = logging.getLogger("ray.actor")
    if not any(isinstance(f, _QuietPlacementGroupWarning) for f in actor_log.filters):
        actor_log.addFilter(_QuietPlacementGroupWarning())

    started_local = False
    if address is None and not ray.is_initialized():
        address = _start_local_ray(local_resources(config), say)
        started_local = True
    try:
        connect(address)
        if _named_actors() or _placement_groups():
            raise DeployError("this Ray cluster already runs a kvmesh deployment; "
                              "remove it first (kvmesh down)")
    except BaseException:
        if started_local:
            _stop_local_ray()
        raise

    try:
        return _up(ray, config, model, served_name, api_token, secret, started_local, deadline, say)
    except BaseException:
        say("deployment failed; removing what was started")
        try:
            down(stop_local_ray=False, say=lambda m: None)
        except Exception as e:  # keep the original error
            log.warning("cleanup after a failed deployment: %s", e)
        if started_local:
            _stop_local_ray()
        raise


def _up(ray, config, model, served_name, api_token, secret, started_local, deadline, say) -> Deployment:
    nodes = _alive_nodes()
    store_plan = _plan_stores(config, nodes)
    router_nodes = _nodes_for(config.router.node_resource, nodes)
    if config.router.replicas > len(router_nodes):
        raise DeployError(f"router.replicas: {config.router.replicas} routers need as many nodes "
                          f"offering {config.router.node_resource or 'the head role'}; "
                          f"{len(router_nodes)} do")
    record = ray.remote(DeploymentRecord).options(
        name=RECORD_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0).remote({
            "config": config.model_dump(mode="json"), "model": model, "served_name": served_name,
            "started_local_ray": started_local, "host": socket.gethostname(),
            "created_at": time.time()})
    ray.get(record.health.remote(), timeout=60)

    say(f"starting {len(store_plan)} store(s)")
    stores, store_on_node = {}, {}
    for name, node, i in store_plan:
        settings = store_settings(config, i, node["NodeManagerAddress"], name, disk_dir=_disk_dir(name))
        stores[name] = ray.remote(StoreActor).options(
            **_options(name, num_cpus=0, scheduling_strategy=_pin(node["NodeID"]))
        ).remote(name, settings, secret)
        store_on_node[node["NodeID"]] = host_port(node["NodeManagerAddress"], settings.port)
    _wait_healthy(stores, deadline, say)

    addresses = _start_workers(ray, config, model, served_name, nodes, store_on_node,
                               store_on_node.get(store_plan[0][1]["NodeID"], "") if store_plan else "",
                               secret, deadline, say)

    routers = {}
    for i in range(config.router.replicas):
        name = f"router-{i}"
        settings = router_settings(config, config.router.host or router_nodes[i]["NodeManagerAddress"],
                                   addresses["prefill"], addresses["decode"], model, served_name, api_token,
                                   tuple(sorted(set(store_on_node.values()))))
        routers[name] = ray.remote(RouterActor).options(**_options(
            name, num_cpus=0, scheduling_strategy=_pin(router_nodes[i]["NodeID"]))
        ).remote(name, settings, secret)
    if routers:
        say(f"starting {len(routers)} router(s)")
        _wait_healthy(routers, deadline, say)

    rows = status()
    routers_info = [row for row in rows if row["kind"] == "router"]
    return Deployment(router_urls=[row["url"] for row in routers_info],
                      grpc_addresses=[row["grpc_address"] for row in routers_info if row["grpc_address"]],
                      components=rows, started_local_ray=started_local)


def _plan_stores(config: ClusterConfig, nodes: list[dict]) -> list[tuple[str, dict, int]]:
    """(actor name, node, index of its ``stores`` entry): one store per node offering its resource."""
    plan: list[tuple[str, dict, int]] = []
    taken: dict[str, int] = {}
    for i, spec in enumerate(config.stores):
        where = _nodes_for(spec.node_resource, nodes)
        if not where:
            raise DeployError(f"stores[{i}].node_resource: no alive Ray node offers resource "
                              f"{spec.node_resource!r}")
        for node in where:
            if node["NodeID"] in taken:
                raise DeployError(f"stores[{i}] and stores[{taken[node['NodeID']]}] both match node "
                                  f"{node['NodeManagerAddress']} (one store per node)")
            taken[node["NodeID"]] = i
            plan.append((f"store-{len(plan)}", node, i))
    if len(plan) > 1 and not config.index:
        raise DeployError(f"{len(plan)} stores would run (one per matching node); several "
                          "stores need a shared block index (index: redis://...)")
    return plan


def _start_workers(ray, config, model, served_name, nodes, store_on_node, first_store,
                   secret, deadline, say) -> dict[str, list[str]]:
    """A placement group per replica, then its worker actor in it; waits until all are
    healthy. Returns the workers' addresses by role."""
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    groups = {}
    for role in ("prefill", "decode"):
        group = getattr(config, role)
        for i in range(group.replicas):
            name = f"{role}-{i}"
            pg = placement_group(_bundles(group), strategy="STRICT_PACK", name=PG_PREFIX + name,
                                 lifetime="detached")
            groups[name] = (role, i, group, pg)
    for name, (role, i, group, pg) in groups.items():
        wait = max(1.0, min(120.0, deadline - time.monotonic()))
        ready, _ = ray.wait([pg.ready()], timeout=wait)
        if not ready:
            offered = "; ".join(f"{n['NodeManagerAddress']}: {n['Resources']}" for n in nodes)
            raise DeployError(f"{name}: no node can host its placement group {_bundles(group)} "
                              f"(STRICT_PACK) within {wait:.0f}s; nodes offer {offered}")
    by_id = {n["NodeID"]: n for n in nodes}
    workers: dict[str, Any] = {}
    addresses: dict[str, list[str]] = {"prefill": [], "decode": []}
    for name, (role, i, group, pg) in groups.items():
        node_id = placement_group_table(pg)["bundles_to_node_id"][0]
        bundles = _bundles(group)
        visible = None
        if any(b.get("GPU") for b in bundles):  # the GPUs of all its bundles, for vLLM's ranks
            visible = sum(ray.get([ray.remote(_gpu_ids).options(
                num_cpus=0, num_gpus=b["GPU"], scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=k)).remote() for k, b in enumerate(bundles)],
                timeout=60), [])
        node = by_id.get(node_id) or {n["NodeID"]: n for n in _alive_nodes()}[node_id]
        settings = worker_settings(config, role, i, node["NodeManagerAddress"],
                                   store_on_node.get(node_id, first_store), model, served_name)
        custom = {k: v for k, v in bundles[0].items() if k not in _STANDARD_RESOURCES}
        workers[name] = ray.remote(WorkerActor).options(**_options(
            name, num_cpus=bundles[0].get("CPU", 0), num_gpus=0, resources=custom,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
        ).remote(name, settings, group.world_size, group.env, group.cpu_cores, visible, secret)
        addresses[role].append(host_port(settings.host, settings.port))
    if workers:
        say(f"loading the model in {len(workers)} worker(s) (this takes a little while)")
        _wait_healthy(workers, deadline, say)
    return addresses


# ====================================================================== status, down


def _named_actors() -> list[str]:
    ray = _ray()
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE)


def _placement_groups() -> list[dict]:
    """kvmesh's placement groups that are not removed yet."""
    from ray.util.placement_group import placement_group_table

    return [pg for pg in placement_group_table().values()
            if (pg.get("name") or "").startswith(PG_PREFIX) and pg.get("state") != "REMOVED"]


def _actor_states() -> dict[str, dict]:
    """Ray's view of kvmesh's actors by name (state, node, restarts); empty where Ray's
    state API is not available (it needs the dashboard, in ``ray[default]``)."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("ray_namespace", "=", NAMESPACE)], limit=1000,
                             timeout=10, raise_on_missing_output=False)
    except Exception as e:
        log.debug("Ray's state API: %s", e)
        return {}
    out = {}
    for a in actors:
        a = a if isinstance(a, dict) else dataclasses.asdict(a)
        name = a.get("name")
        if name and (name not in out or a.get("state") != "DEAD"):
            out[name] = a
    return out


def status(address: str | None = None, timeout_s: float = 10.0) -> list[dict]:
    """One row per kvmesh actor: name, kind, node, address, state (Ray's: ALIVE,
    RESTARTING, ...), health ("ok", "starting", "unreachable" or the error)."""
    ray = _ray()
    connect(address)
    names = _named_actors()
    states = _actor_states()
    handles = {n: ray.get_actor(n, namespace=NAMESPACE) for n in names if n != RECORD_NAME}
    info_refs = {n: h.info.remote() for n, h in handles.items()}
    health_refs = {n: h.health.remote() for n, h in handles.items()}
    deadline = time.monotonic() + timeout_s
    rows = []
    for name in sorted(handles, key=_sort_key):
        state = states.get(name, {})
        row = {"name": name, "kind": name.rsplit("-", 1)[0], "node_ip": "", "node_id": state.get("node_id", ""),
               "address": "", "state": state.get("state", "?"), "health": "?", "url": "",
               "grpc_address": "", "pid": state.get("pid"), "restarted": None}
        try:
            row.update(ray.get(info_refs[name], timeout=max(0.1, deadline - time.monotonic())))
        except Exception as e:
            row["health"] = f"unreachable ({type(e).__name__})"
        else:
            try:
                ok = ray.get(health_refs[name], timeout=max(0.1, deadline - time.monotonic()))
                row["health"] = "ok" if ok else "starting"
            except ray.exceptions.RayTaskError as e:
                row["health"] = f"failed: {str(e.cause or e).splitlines()[-1]}"
            except Exception as e:
                row["health"] = f"unreachable ({type(e).__name__})"
        if row["state"] == "?" and not row["health"].startswith("unreachable"):
            row["state"] = "ALIVE"
        rows.append(row)
    return rows


def _sort_key(name: str):
    order = {"store": 0, "prefill": 1, "decode": 2, "router": 3}
    kind, _, index = name.rpartition("-")
    return order.get(kind, 9), kind, int(index) if index.isdigit() else 0


def deployment_record(address: str | None = None) -> dict | None:
    ray = _ray()
    connect(address)
    try:
        return ray.get(ray.get_actor(RECORD_NAME, namespace=NAMESPACE).get.remote(), timeout=10)
    except Exception:
        return None


def down(address: str | None = None, *, timeout_s: float = 60.0, stop_local_ray: bool = True,
         say: Callable[[str], None] = lambda m: print(f"kvmesh: {m}", flush=True)) -> dict:
    """Remove every kvmesh actor and placement group: components stop gracefully (engines
    shut down) within ``timeout_s``, then are killed without restart. When ``up`` started
    the Ray cluster itself on this machine, it is stopped too (unless ``stop_local_ray``
    is false). Returns what was removed; raises ``DeployError`` if anything is left."""
    ray = _ray()
    connect(address)
    deadline = time.monotonic() + timeout_s
    record = deployment_record()
    names = _named_actors()
    handles = {}
    for name in names:
        try:
            handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # gone meanwhile
            pass
    # Routers first, then workers, then stores: nothing is left calling a stopped peer.
    for kinds in (("router",), ("prefill", "decode"), ("store", RECORD_NAME)):
        batch = {n: h for n, h in handles.items() if n.rsplit("-", 1)[0] in kinds or n in kinds}
        refs = [h.stop.remote() for h in batch.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=max(1.0, min(30.0, deadline - time.monotonic())))
        for h in batch.values():
            ray.kill(h, no_restart=True)
    groups = _placement_groups()
    for pg in groups:
        try:
            ray.util.remove_placement_group(ray.util.get_placement_group(pg["name"]))
        except ValueError:  # removed meanwhile
            pass
    while _named_actors() or _placement_groups():
        if time.monotonic() > deadline:
            raise DeployError(f"still present after {timeout_s:.0f}s: actors {_named_actors()}, "
                              f"placement groups {[pg['name'] for pg in _placement_groups()]}")
        time.sleep(0.2)
    say(f"removed {len(names)} actor(s) and {len(groups)} placement group(s)")
    removed = {"actors": names, "placement_groups": [pg["name"] for pg in groups]}
    if stop_local_ray and record and record.get("started_local_ray") \
            and record.get("host") == socket.gethostname():
        say("stopping the local Ray cluster `kvmesh up` started")
        _stop_local_ray()
        removed["stopped_ray"] = True
    return removed


__all__ = ["ConfigError", "DeployError", "Deployment", "NAMESPACE", "connect", "down",
           "local_resources", "status", "up"]
