"""A supervised local cluster (``LocalCluster(restart=...)``, what ``kvmesh serve`` runs)
on the tiny model: a decode worker killed with SIGKILL — its process alone, as a crash
of the worker would be — comes back on its address, leaves no engine process and no
``/dev/shm`` segment behind, and serves the colocated engine's tokens afterwards; a
killed store shows in the router's /health until it is back, its arena freed; and
``kvmesh serve`` gives up on a component that keeps dying, exiting with an error."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from kvmesh.cluster import shm_reclaim
from kvmesh.cluster.local import LocalCluster
from kvmesh.cluster.supervisor import RestartPolicy
from tests.colocated import reference_table
from tests.waiting import wait_until

BLOCK = 32
MAX_TOKENS = 8
PROMPTS = [[rng.randrange(10, 1000) for _ in range(n)]
           for rng, n in ((random.Random(31), 150), (random.Random(32), 170), (random.Random(33), 190))]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return reference_table(tiny_model, PROMPTS, MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("ref"))


def complete(cluster, prompt) -> dict:
    r = httpx.post(cluster.router_url + "/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()


def health(cluster) -> dict:
    return httpx.get(cluster.router_url + "/health", timeout=10).json()


BACKOFF_S = 3.0  # long enough for the router's health poll (every 2 s) to see a store down


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      restart=RestartPolicy(backoff_s=BACKOFF_S),
                      run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


def test_a_killed_decode_worker_is_restarted_clean_and_serves(cluster, reference):
    assert complete(cluster, PROMPTS[0])["choices"][0]["token_ids"] == reference[tuple(PROMPTS[0])]
    proc = next(p for p in cluster.processes if p.name == "decode")
    leader = proc.popen.pid
    group = shm_reclaim.group_pids(leader)
    assert len(group) > 1, "the worker's engine runs in a process of its own"
    held = shm_reclaim.held_segments(group) | shm_reclaim.named_after(group)
    others = [p for p in shm_reclaim.all_pids() if p not in group]
    shared = shm_reclaim.held_segments(others)  # e.g. the store's arena: not the worker's own
    own = held - shared
    print(f"decode group {group}: its own segments {sorted(own)}, shared {sorted(held & shared)}")

    os.kill(leader, signal.SIGKILL)  # the worker process only; its engine must not outlive it
    assert wait_until(lambda: proc.popen.pid != leader, 60), proc.log_tail()
    assert not shm_reclaim.group_pids(leader), "the dead worker's engine process was left running"
    left = {name for name in own if os.path.exists(f"/dev/shm/{name}")}
    assert not left, f"segments of the dead worker left in /dev/shm: {left}"

    assert wait_until(lambda: health(cluster)["status"] == "ok", 300, every_s=1.0), health(cluster)
    assert proc.popen.poll() is None and cluster.supervisor.restarted == {"decode": 1}
    assert shm_reclaim.group_pids(proc.popen.pid)  # the new worker, on the same address
    r = complete(cluster, PROMPTS[1])
    assert r["choices"][0]["token_ids"] == reference[tuple(PROMPTS[1])]
    assert not cluster.failed


def test_a_killed_store_is_reported_by_health_then_restarted_and_its_arena_freed(cluster, reference):
    assert wait_until(lambda: health(cluster)["status"] == "ok", 60, every_s=1.0), health(cluster)
    proc = next(p for p in cluster.processes if p.name == "store")
    leader = proc.popen.pid
    arenas = shm_reclaim.named_after([leader])
    assert arenas, "the store's host arena is a named /dev/shm segment"
    os.kill(leader, signal.SIGKILL)
    name = f"store {cluster.store_address}"
    seen = []
    assert wait_until(lambda: seen.append(health(cluster)) or seen[-1]["status"] == "degraded",
                      2 * BACKOFF_S, every_s=0.2), seen[-1]
    assert seen[-1]["workers"][name].startswith("unavailable"), seen[-1]
    assert wait_until(lambda: proc.popen.pid != leader, 30), proc.log_tail()
    left = {a for a in arenas if os.path.exists(f"/dev/shm/{a}")}
    assert not left, f"the dead store's arena is left in /dev/shm: {left}"
    assert wait_until(lambda: health(cluster)["status"] == "ok", 120, every_s=1.0), health(cluster)
    assert health(cluster)["workers"][name] == "ok"
    r = complete(cluster, PROMPTS[2])
    assert r["choices"][0]["token_ids"] == reference[tuple(PROMPTS[2])]
    assert cluster.supervisor.restarted["store"] == 1 and not cluster.failed


def test_serve_gives_up_on_a_component_that_keeps_dying_and_exits_non_zero(tiny_model, tmp_path):
    """``kvmesh serve --max-restarts 1``: a decode worker killed once is restarted; killed
    again within the window, serve says it gives up, stops the cluster (no component
    process left) and exits with an error naming it."""
    from kvmesh.cluster.local import free_port

    serve = subprocess.Popen(
        [sys.executable, "-m", "kvmesh.cluster.cli", "serve", "--model", tiny_model,
         "--port", str(free_port()), "--max-restarts", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(serve.stdout), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: any("Press Ctrl-C to stop" in line for line in lines), 300), "".join(lines)
        groups = set()

        def kill_decode() -> None:
            decode = [p for p in shm_reclaim.all_pids() if _is_component(p, serve.pid, "decode")]
            assert len(decode) == 1, decode
            groups.add(decode[0])
            os.kill(decode[0], signal.SIGKILL)

        kill_decode()
        assert wait_until(lambda: any("decode restarted" in line for line in lines), 60), "".join(lines)
        components = [p for p in shm_reclaim.all_pids() if _parent(p) == serve.pid]
        kill_decode()
        serve.wait(120)
        reader.join(10)
        out = "".join(lines)
        assert serve.returncode == 1, out
        assert "GIVING UP on decode: exited with code -9" in out
        assert "kvmesh: stopped: decode exited with code -9" in out
        assert len(components) == 4  # store, prefill, decode, router
        assert not any(shm_reclaim.group_pids(g) for g in groups | set(components)), out
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(30)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _is_component(pid: int, serve_pid: int, kind: str) -> bool:
    """Whether ``pid`` is a ``kind`` component that the serve process ``serve_pid`` started."""
    if _parent(pid) != serve_pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"kvmesh.cluster.cli" in argv and kind.encode() in argv


def test_killing_serve_leaves_no_process_behind(tiny_model, tmp_path):
    """``kvmesh serve`` SIGKILLed: its components stop (they follow their parent), and
    an engine whose worker was SIGKILLed at the same moment — nobody left to stop it in
    order — goes too: it follows its worker (``vllm_plugin.die_with_parent``)."""
    from kvmesh.cluster.local import free_port

    serve = subprocess.Popen(
        [sys.executable, "-m", "kvmesh.cluster.cli", "serve", "--model", tiny_model,
         "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(serve.stdout), daemon=True)
    reader.start()
    components: list[int] = []
    left = lambda: [p for g in components for p in shm_reclaim.group_pids(g)]
    try:
        assert wait_until(lambda: any("Press Ctrl-C to stop" in line for line in lines), 300), "".join(lines)
        components += [p for p in shm_reclaim.all_pids() if _parent(p) == serve.pid]
        decode = [p for p in components if _is_component(p, serve.pid, "decode")]
        assert len(components) == 4 and len(decode) == 1, (components, decode)
        engines = [p for p in shm_reclaim.group_pids(decode[0]) if p != decode[0]]
        assert engines, "the decode worker's engine runs in a process of its own"
        os.kill(serve.pid, signal.SIGKILL)
        os.kill(decode[0], signal.SIGKILL)
        serve.wait(10)
        assert wait_until(lambda: not left(), 60), f"still running: {left()}"
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(30)
        for group in components:  # what the test found left, not to burden the next
            if shm_reclaim.group_pids(group):
                os.killpg(group, signal.SIGKILL)
