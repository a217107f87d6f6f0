"""kvmesh on a real two-node Ray cluster on this machine, with real vLLM engines.

The head node (127.0.0.2) offers the custom resource ``prefill``, the second node
(127.0.0.3) ``decode``: ``deploy/configs/two-node.yaml`` puts the prefill worker (and the
router) on the head, the decode worker and the store on the second node, so every KV
block the decode worker loads crossed from one Ray node to the other over gRPC. The
prefill group runs at tensor-parallel size 2 and the decode group at 1: each group's
ranks are packed in one placement group, each rank (a process of vLLM's own) bound to a
core of its own, and the blocks two ranks saved are loaded by one.
Greedy outputs must equal a colocated TP=1 vLLM run. Then failures: the decode worker's
actor is killed while requests are sent (Ray restarts it on the same address and every
request still ends with the right tokens), the prefill worker's engine process dies (its
ranks with it; the actor exits so that Ray restarts it), the store is killed (it comes
back empty on its address). Then ``down`` leaves no actor, placement group or process.
Last, the reverse split (prefill TP=1, decode TP=2) is deployed on the same Ray cluster,
checked the same way and removed.

The tests share one deployment (starting engines costs most of the time) and run in
file order; each also works alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from kvmesh.cluster.config import parse_config
from kvmesh.cluster.local import free_port
from tests.colocated import reference_table
from tests.waiting import wait_until

HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
BLOCK = 32
MAX_TOKENS = 12
PROMPTS = [[(7 * i + n) % 900 + 10 for i in range(n)] for n in (5, 64, 100, 200)]
REPO = Path(__file__).resolve().parents[2]


def _ray_command() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _use_token(auth: dict[str, str]) -> None:
    """Make this process a driver of the test cluster: Ray reads its auth settings when
    first used, so set them before that (and refresh them if Ray was used already)."""
    os.environ.update(auth)
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _run(args: list[str], env: dict, timeout_s: float) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head on 127.0.0.2 with {prefill: 1} and a node on 127.0.0.3 with {decode: 1},
    token auth on (a token of its own), each node given its share of memory."""
    if importlib.util.find_spec("ray") is None:
        pytest.fail("Ray is not installed; install it with pip install 'ray[default]==2.60.0'",
                    pytrace=False)
    # Short: Ray's socket paths under its temp dir must stay within 107 characters.
    workdir = Path(tempfile.mkdtemp(prefix="kvmesh-ray-"))
    token = workdir / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = dict(os.environ, **auth, RAY_USAGE_STATS_ENABLED="0",
               VLLM_ENABLE_V1_MULTIPROCESSING="1")  # the executor users run
    saved = {k: os.environ.get(k) for k in auth}
    _use_token(auth)
    port = free_port(HEAD_IP)
    memory = ["--memory", str(4 << 30), "--object-store-memory", str(160 << 20)]
    ray_cmd = _ray_command()
    try:
        _run([ray_cmd, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}",
              '--resources={"prefill": 1}', f"--temp-dir={workdir / 'ray'}", "--num-cpus=2",
              "--dashboard-host", HEAD_IP, "--dashboard-port", str(free_port(HEAD_IP)),
              "--disable-usage-stats", *memory], env, timeout_s=120)
        _run([ray_cmd, "start", f"--address={HEAD_IP}:{port}", f"--node-ip-address={NODE_IP}",
              '--resources={"decode": 1}', "--num-cpus=2", "--disable-usage-stats", *memory],
             env, timeout_s=120)
        yield f"{HEAD_IP}:{port}"
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([ray_cmd, "stop", "--force"], env=env, capture_output=True, timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return reference_table(tiny_model, PROMPTS, MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("colocated"))


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store-disk")


def two_node_config(model: str, disk_dir: Path, prefill_tp: int = 1, decode_tp: int = 1):
    """The shipped two-node config with ``model``, free ports, a small store and the
    groups' tensor-parallel sizes."""
    data = yaml.safe_load((REPO / "deploy/configs/two-node.yaml").read_text())
    ports = set()
    while len(ports) < 5:
        ports.add(free_port(HEAD_IP))
    prefill, decode, store, http, grpc_port = sorted(ports)
    data["model"].update(path=model, served_name="tiny", block_size=BLOCK)
    data["prefill"].update(port=prefill, tensor_parallel_size=prefill_tp)
    data["decode"].update(port=decode, tensor_parallel_size=decode_tp)
    data["stores"][0].update(port=store, host_bytes="64MiB", disk_bytes="64MiB", disk_dir=str(disk_dir))
    # Always disaggregate (but for prompts shorter than a block), so blocks cross nodes, and
    # no local prefix cache on the decode worker: every cached prefix comes through the store.
    data["router"].update(port=http, grpc_port=grpc_port, max_local_prefill_tokens=0,
                          max_decode_prefill_tokens=0)
    data["decode"].setdefault("engine", {})["enable_prefix_caching"] = False
    return parse_config(data, "two-node.yaml (test)")


@pytest.fixture(scope="module")
def config(tiny_model, disk_dir):
    """Prefill at TP=2 (two ranks, two bundles), decode at TP=1: KV saved by two shards,
    loaded whole (the reverse split has a test of its own, after ``down``)."""
    return two_node_config(tiny_model, disk_dir, prefill_tp=2, decode_tp=1)


@pytest.fixture(scope="module")
def secret():
    """The cluster secret ``up`` hands the actors (from its environment), so that the tests
    can ask the workers themselves."""
    from kvmesh.kv_store.auth import new_secret
    from kvmesh.kv_store.settings_base import SECRET_ENV

    with pytest.MonkeyPatch.context() as mp:
        value = new_secret()
        mp.setenv(SECRET_ENV, value)
        yield value


@pytest.fixture(scope="module")
def deployed(ray_cluster, config, reference, secret):
    from kvmesh.cluster import ray_deploy

    ray_deploy.connect(ray_cluster)
    started = time.monotonic()
    deployment = ray_deploy.up(config, ray_cluster, timeout_s=300)
    print(f"\nup took {time.monotonic() - started:.1f}s")
    try:
        yield deployment
    finally:
        ray_deploy.down(timeout_s=60, say=lambda m: None)


def complete(url: str, prompt: list[int], timeout_s: float = 60) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=timeout_s)
    assert r.status_code == 200, r.text
    return r.json()


def _rows() -> dict[str, dict]:
    from kvmesh.cluster import ray_deploy

    return {row["name"]: row for row in ray_deploy.status()}


def _engine_config(address: str, secret: str) -> dict:
    """What the worker at ``address`` reports its engine runs with (its health reply)."""
    import grpc

    from kvmesh.kv_store.auth import call_metadata
    from kvmesh_proto import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = worker_pb2_grpc.WorkerStub(channel).Health(
            worker_pb2.HealthRequest(), timeout=10, metadata=call_metadata(secret))
    return json.loads(reply.engine_config)


def _thread_cores(process) -> set[int]:
    """The cores the threads of ``process`` may run on, together."""
    cores: set[int] = set()
    for thread in process.threads():
        try:
            cores |= os.sched_getaffinity(thread.id)
        except OSError:  # the thread ended meanwhile
            pass
    return cores


def _running(processes) -> list[int]:
    """The pids of ``processes`` still running (an exited one not yet reaped is not)."""
    import psutil

    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def assert_gone(processes, timeout_s: float = 30.0) -> None:
    """Every one of ``processes`` exits within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while _running(processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(processes), "processes left running"


def _ranks(actor_pid: int, expected: int, timeout_s: float = 30.0) -> list:
    """The ``expected`` rank processes (vLLM's ``VLLM::Worker...``) under a worker actor's
    engine, waited for up to ``timeout_s`` (a rank names itself once it runs); fails
    listing every process under the actor if they never show."""
    import psutil

    found: list = []

    def all_found() -> bool:
        found.clear()
        for p in psutil.Process(actor_pid).children(recursive=True):
            try:
                if p.name().startswith("VLLM::Worker"):
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return len(found) == expected

    if wait_until(all_found, timeout_s, every_s=0.5):
        return found
    tree = []
    for p in [psutil.Process(actor_pid), *psutil.Process(actor_pid).children(recursive=True)]:
        try:
            tree.append((p.pid, p.ppid(), p.name(), p.cmdline()[:3]))
        except psutil.Error as e:
            tree.append((p.pid, type(e).__name__))
    raise AssertionError(f"{len(found)} rank processes under actor {actor_pid}, "
                         f"expected {expected}; its process tree: {tree}")


def check_worker_groups(rows: dict[str, dict], tp: dict[str, int], secret: str) -> list:
    """Each worker group's ranks are packed in one placement group (STRICT_PACK, a bundle
    per rank, the first with the role's resource, all on the worker's node); its engine
    reports the group's tensor-parallel size and runs that many rank processes, each
    bound to cores no other rank of it uses. Returns the worker actors' processes and
    everything under them."""
    import psutil
    from ray.util.placement_group import placement_group_table

    node_ids = {row["node_ip"]: row["node_id"] for row in rows.values()}
    groups = {pg["name"]: pg for pg in placement_group_table().values() if pg["state"] == "CREATED"}
    processes = []
    for role, ip in (("prefill", HEAD_IP), ("decode", NODE_IP)):
        row = rows[f"{role}-0"]
        pg = groups[f"kvmesh:{role}-0"]
        assert pg["strategy"] == "STRICT_PACK"
        assert list(pg["bundles"].values()) == [{"CPU": 1.0, role: 1.0}] + [{"CPU": 1.0}] * (tp[role] - 1)
        assert set(pg["bundles_to_node_id"].values()) == {node_ids[ip]} and row["node_ip"] == ip
        engine = _engine_config(row["address"], secret)
        assert engine["tensor_parallel_size"] == tp[role], engine
        ranks = _ranks(row["pid"], expected=tp[role])
        cores = [_thread_cores(p) for p in ranks]
        assert all(cores) and len(set().union(*cores)) == sum(map(len, cores)), (role, cores)
        actor = psutil.Process(row["pid"])
        processes += [actor, *actor.children(recursive=True)]
    return processes


def serves_the_colocated_tokens(url: str, prompts: list[list[int]], reference: dict) -> None:
    """Each prompt through the router: the colocated run's greedy tokens, its whole blocks
    loaded from the store."""
    for prompt in prompts:
        r = complete(url, prompt)
        assert r["choices"][0]["token_ids"] == reference[tuple(prompt)], len(prompt)
        # Whole blocks of the prompt (but its last token) came from the other node's store,
        # loaded (none failed) over the zero-copy backend a `kvmesh serve` decode worker
        # uses with its store on the same host: the store actor is built by the same
        # StoreNode and offers the same transfer sources.
        whole = (len(prompt) - 1) // BLOCK * BLOCK
        assert r["kvmesh"]["prefix_tokens_from_store"]["decode"] == whole
        assert r["kvmesh"]["kv_load_failed_tokens"] == 0
        if whole:
            assert r["kvmesh"]["kv_transfer"]["backend"] == "shm", r["kvmesh"]


def test_up_places_each_component_and_serves_the_colocated_tokens(deployed, config, reference, secret, capsys):
    rows = _rows()
    assert set(rows) == {"store-0", "prefill-0", "decode-0", "router-0"}
    where = {name: row["node_ip"] for name, row in rows.items()}
    assert where == {"store-0": NODE_IP, "decode-0": NODE_IP, "prefill-0": HEAD_IP, "router-0": HEAD_IP}
    assert rows["prefill-0"]["address"] == f"{HEAD_IP}:{config.prefill.port}"
    assert rows["decode-0"]["address"] == f"{NODE_IP}:{config.decode.port}"
    assert rows["store-0"]["address"] == f"{NODE_IP}:{config.stores[0].port}"
    assert all(row["health"] == "ok" and row["state"] == "ALIVE" for row in rows.values()), rows
    check_worker_groups(rows, {"prefill": 2, "decode": 1}, secret)

    url = deployed.router_urls[0]
    assert url == f"http://{HEAD_IP}:{config.router.port}"
    serves_the_colocated_tokens(url, PROMPTS, reference)  # saved by two TP ranks, loaded by one

    from kvmesh.cluster.ray_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    capsys.readouterr()
    args = parser.parse_args(["status"])
    args.func(args)
    table = capsys.readouterr().out
    for name, row in rows.items():
        assert any(line.split()[:3] == [name, row["kind"], row["node_ip"]] for line in table.splitlines()), table


def test_the_same_config_gives_the_same_components_under_serve_and_up(deployed, config):
    """``kvmesh up`` and ``kvmesh serve --config`` start each component from the same
    settings (``plan.py``): only where they bind, the addresses they are given and how the
    cluster secret reaches them differ (``serve`` writes it to a file in its run
    directory; ``up`` hands it to each actor, the next test checks they hold it)."""
    import ray

    from kvmesh.cluster.local import LocalCluster
    from kvmesh.cluster.ray_deploy import NAMESPACE

    local = {c.name: c.settings for c in LocalCluster(model=config.model.path, config=config,
                                                      verbose=False).components}
    on_ray = {name.replace("-0", ""): ray.get(ray.get_actor(name, namespace=NAMESPACE).started_with.remote())
              for name in ("store-0", "prefill-0", "decode-0", "router-0")}
    placed = {"host", "store", "prefill", "decode", "node_id", "disk_dir", "cluster_secret_file"}
    assert set(local) == set(on_ray)
    for name, settings in on_ray.items():
        assert type(settings) is type(local[name]), name
        assert settings.model_dump(exclude=placed) == local[name].model_dump(exclude=placed), name
    assert on_ray["store"].transfer == local["store"].transfer == ("shm", "nixl", "grpc")


def test_the_actors_refuse_internal_calls_without_the_cluster_secret(deployed):
    """``up`` handed every actor the cluster's secret (the requests above went through,
    so they share it); a caller without it is refused by the store and the workers."""
    import grpc

    from kvmesh.kv_store.client import StoreClient, StoreError
    from kvmesh_proto import worker_pb2, worker_pb2_grpc

    rows = _rows()
    for row in (r for r in rows.values() if r["kind"] == "store"):
        with StoreClient(row["address"], timeout_s=10) as stranger:
            with pytest.raises(StoreError, match="UNAUTHENTICATED"):
                stranger.lookup([[b"any prompt's block"]])
    for row in (r for r in rows.values() if r["kind"] in ("prefill", "decode")):
        with grpc.insecure_channel(row["address"]) as channel:
            with pytest.raises(grpc.RpcError) as e:
                worker_pb2_grpc.WorkerStub(channel).Health(worker_pb2.HealthRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_killed_decode_worker_comes_back_on_its_address_and_no_request_is_lost(deployed, reference):
    """Requests keep coming while the decode actor is killed. Ray restarts it (the engine
    loads again); every request is retried on a 5xx until it returns, and each must end
    with the colocated tokens. What failed on the way is printed."""
    import ray

    before = _rows()["decode-0"]
    url = deployed.router_urls[0]
    requests_per_sender, deadline = 8, time.monotonic() + 240
    results: dict[tuple[int, int], list[int]] = {}
    failures: list[tuple[float, int | str, str]] = []
    start = time.monotonic()

    def send(sender: int) -> None:
        for k in range(requests_per_sender):
            prompt = PROMPTS[(sender + k) % len(PROMPTS)]
            body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "return_token_ids": True}
            while time.monotonic() < deadline:
                try:
                    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
                except httpx.HTTPError as e:
                    failures.append((time.monotonic() - start, type(e).__name__, str(e)[:120]))
                else:
                    if r.status_code == 200:
                        results[sender, k] = r.json()["choices"][0]["token_ids"]
                        break
                    failures.append((time.monotonic() - start, r.status_code, r.text[:160]))
                    assert r.status_code >= 500, r.text
                time.sleep(0.5)
            time.sleep(0.3)

    senders = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in senders:
        t.start()
    time.sleep(1.0)
    killed_at = time.monotonic() - start
    ray.kill(ray.get_actor("decode-0", namespace="kvmesh"), no_restart=False)
    # While its engine loads again, status says it is not healthy (the others are).
    seen: list[tuple[str, str]] = []
    while time.monotonic() - start < killed_at + 20:
        rows = _rows()
        seen.append((rows["decode-0"]["state"], rows["decode-0"]["health"]))
        if rows["decode-0"]["health"] != "ok":
            assert rows["prefill-0"]["health"] == "ok" and rows["store-0"]["health"] == "ok"
            break
        time.sleep(0.5)
    for t in senders:
        t.join(max(1.0, deadline - time.monotonic()))
    total = time.monotonic() - start

    after = _rows()["decode-0"]
    statuses = sorted({str(f[1]) for f in failures})
    print(f"\nstatus of decode-0 after the kill: {seen[-1]}")
    print(f"killed decode-0 at {killed_at:.1f}s; {len(results)} of {2 * requests_per_sender} "
          f"requests done in {total:.1f}s; {len(failures)} failed attempts "
          f"(statuses {statuses}) from {failures[0][0] if failures else 0:.1f}s "
          f"to {failures[-1][0] if failures else 0:.1f}s")
    for f in {str(f[1]) + f[2][:60]: f for f in failures}.values():
        print(f"  {f[0]:6.1f}s  {f[1]}  {f[2]}")
    assert seen and seen[-1][1] != "ok", f"status never showed decode-0 unhealthy: {seen}"
    assert len(results) == 2 * requests_per_sender, "requests that never succeeded before the deadline"
    for (sender, k), tokens in results.items():
        assert tokens == reference[tuple(PROMPTS[(sender + k) % len(PROMPTS)])]
    assert after["restarted"] is True and after["pid"] != before["pid"]
    assert (after["address"], after["node_ip"]) == (before["address"], before["node_ip"])
    assert after["health"] == "ok" and after["state"] == "ALIVE"


def test_a_worker_whose_engine_dies_is_restarted_by_ray(deployed, reference):
    """The engine process of the prefill worker dies (the actor itself does not): the
    actor notices, exits, and Ray restarts it on the same address."""
    import psutil

    before = _rows()["prefill-0"]
    # The actor's children: multiprocessing's resource tracker and the engine process
    # (titled VLLM::EngineCore once it runs; told apart by not being the tracker).
    children = psutil.Process(before["pid"]).children()
    engines = [p for p in children if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(engines) == 1, [(p.pid, p.name(), p.cmdline()[:4]) for p in children]
    ranks = _ranks(before["pid"], expected=2)
    assert len(ranks) == 2  # prefill runs at TP=2
    engines[0].kill()
    killed = time.monotonic()
    deadline = killed + 150
    seen = []
    while True:
        after = _rows()["prefill-0"]
        seen.append((after["state"], after["health"][:60], after["pid"], after["restarted"]))
        if after["health"] == "ok" and after["pid"] != before["pid"]:
            break
        assert time.monotonic() < deadline, f"prefill-0 did not come back: {seen}"
        time.sleep(1)
    assert after["restarted"] is True, (before, seen)
    assert after["address"] == before["address"]
    assert not _running(ranks), "the dead engine's rank processes are left"
    # Until the router's connection to it is back, requests skip the failed prefill and
    # the decode worker computes the prompt: right tokens all along.
    back, prompt = time.monotonic(), PROMPTS[3]
    while True:
        r = complete(deployed.router_urls[0], prompt)
        assert r["choices"][0]["token_ids"] == reference[tuple(prompt)]
        if r["kvmesh"]["prefill_ok"]:
            break
        assert time.monotonic() < back + 120, "the router never used the restarted prefill worker"
        time.sleep(0.5)
    print(f"\nprefill-0 healthy again {back - killed:.1f}s after its engine died; the router "
          f"prefilled on it again {time.monotonic() - back:.1f}s later")


def test_a_killed_store_comes_back_on_its_address_and_serves_again(deployed, disk_dir, reference):
    """The store is a cache: killed, it restarts empty on the same address (removing the
    slab file its predecessor left), and requests go on with the right tokens."""
    import ray

    before = _rows()["store-0"]
    slabs = [f.name for f in disk_dir.iterdir()]
    assert len(slabs) == 1 and slabs[0].startswith(f"kvmesh-slab-{before['pid']}-")
    ray.kill(ray.get_actor("store-0", namespace="kvmesh"), no_restart=False)
    deadline = time.monotonic() + 90
    while True:
        after = _rows()["store-0"]
        if after["health"] == "ok" and after["pid"] != before["pid"]:
            break
        assert time.monotonic() < deadline, f"store-0 did not come back: {after}"
        time.sleep(0.5)
    assert after["restarted"] is True
    assert (after["address"], after["node_ip"]) == (before["address"], before["node_ip"])
    slabs = [f.name for f in disk_dir.iterdir()]  # its predecessor's is gone
    assert len(slabs) == 1 and slabs[0].startswith(f"kvmesh-slab-{after['pid']}-")
    back, prompt = time.monotonic(), PROMPTS[2]
    while True:  # until the workers' connections to the store are back: misses, recomputed
        r = complete(deployed.router_urls[0], prompt)
        assert r["choices"][0]["token_ids"] == reference[tuple(prompt)]
        if r["kvmesh"]["prefix_tokens_from_store"]["decode"] == (len(prompt) - 1) // BLOCK * BLOCK:
            assert r["kvmesh"]["kv_load_failed_tokens"] == 0
            break
        assert time.monotonic() < back + 120, "the workers never used the restarted store"
        time.sleep(0.5)
    print(f"\nstore-0 back; blocks served from it again {time.monotonic() - back:.1f}s later")


def test_down_removes_every_actor_and_placement_group(deployed):
    import psutil
    import ray
    from ray.util.placement_group import placement_group_table

    from kvmesh.cluster import ray_deploy

    actors = [psutil.Process(row["pid"]) for row in _rows().values()]
    processes = actors + [p for a in actors for p in a.children(recursive=True)]  # engines, ranks
    removed = ray_deploy.down(timeout_s=60, say=lambda m: None)
    assert set(removed["actors"]) == {"deployment", "store-0", "prefill-0", "decode-0", "router-0"}
    assert sorted(removed["placement_groups"]) == ["kvmesh:decode-0", "kvmesh:prefill-0"]
    assert [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "kvmesh"] == []
    assert {pg["state"] for pg in placement_group_table().values()
            if pg["name"].startswith("kvmesh:")} == {"REMOVED"}
    assert ray_deploy.status() == []
    assert_gone(processes)


def test_the_reverse_split_prefill_tp1_decode_tp2_serves_the_colocated_tokens(
        ray_cluster, tiny_model, reference, secret, tmp_path):
    """The reverse of the deployment above, on the same Ray cluster after its ``down``:
    prefill at TP=1, decode at TP=2 (its two ranks packed on the decode node); each
    decode rank reads its KV head out of the blocks one rank saved, and ``down`` leaves
    no actor, placement group or process."""
    from kvmesh.cluster import ray_deploy

    ray_deploy.connect(ray_cluster)
    if ray_deploy.status():  # the tests above ran without their down
        ray_deploy.down(timeout_s=60, say=lambda m: None)
    config = two_node_config(tiny_model, tmp_path, prefill_tp=1, decode_tp=2)
    started = time.monotonic()
    deployment = ray_deploy.up(config, ray_cluster, timeout_s=300, say=lambda m: None)
    print(f"\nup (prefill TP=1, decode TP=2) took {time.monotonic() - started:.1f}s")
    try:
        processes = check_worker_groups(_rows(), {"prefill": 1, "decode": 2}, secret)
        serves_the_colocated_tokens(deployment.router_urls[0], PROMPTS[1:3], reference)
    except BaseException:
        ray_deploy.down(timeout_s=60, say=lambda m: None)
        raise
    removed = ray_deploy.down(timeout_s=60, say=lambda m: None)
    assert sorted(removed["placement_groups"]) == ["kvmesh:decode-0", "kvmesh:prefill-0"]
    assert ray_deploy.status() == [] and not ray_deploy._placement_groups()
    assert_gone(processes)


def test_auto_cpu_bind_gives_each_role_and_rank_its_own_cores(monkeypatch):
    from kvmesh.cluster.ray_deploy import auto_cpu_bind

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert auto_cpu_bind("prefill", 1) == "0,1,2,3" and auto_cpu_bind("decode", 1) == "4,5,6,7"
    assert auto_cpu_bind("prefill", 2) == "0,1|2,3" and auto_cpu_bind("decode", 4) == "4|5|6|7"
    assert auto_cpu_bind("decode", 8) == "0|1|2|3|4|5|6|7"  # more ranks than half: all cores
    assert auto_cpu_bind("decode", 16) is None              # too few cores: vLLM decides
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "3")
    assert auto_cpu_bind("decode", 1) is None               # the user's binding is kept


def test_a_router_bound_to_one_address_is_reached_there():
    from kvmesh.cluster.ray_deploy import reachable_host

    assert reachable_host("127.0.0.1", "10.0.0.5") == "127.0.0.1"  # health-checked where it listens
    assert reachable_host("0.0.0.0", "10.0.0.5") == "10.0.0.5"
    assert reachable_host("::", "10.0.0.5") == "10.0.0.5"


def test_a_local_ray_start_names_its_own_address_and_leaves_nothing_when_it_fails(monkeypatch):
    """``up`` without ``--address`` starts a head: it connects to that head even with a
    stale ``RAY_ADDRESS`` set, and a start that times out stops what it began (a later
    ``up`` would otherwise find "a Ray cluster already runs")."""
    import subprocess

    from kvmesh.cluster import ray_deploy
    from kvmesh.cluster.ray_deploy import DeployError, _start_local_ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing answers there
    calls, ports = [], []

    def started(cmd, **kw):
        calls.append(cmd[1])
        ports.extend(a.split("=")[1] for a in cmd if a.startswith("--port="))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(ray_deploy.subprocess, "run", started)
    address = _start_local_ray({}, say=lambda m: None)
    assert calls == ["start"] and address.rsplit(":", 1)[1] == ports[0]

    calls.clear()

    def times_out(cmd, **kw):
        calls.append(cmd[1])
        if cmd[1] == "start":
            raise subprocess.TimeoutExpired(cmd, 120)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(ray_deploy.subprocess, "run", times_out)
    with pytest.raises(DeployError, match="could not start"):
        _start_local_ray({}, say=lambda m: None)
    assert calls == ["start", "stop"]
