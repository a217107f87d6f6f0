"""A supervised local cluster (``LocalCluster(restart=...)``, what ``kvmesh serve`` runs)
on the tiny model: a decode worker killed with SIGKILL — its process alone, as a crash
of the worker would be — comes back on its address, leaves no engine process and no
``/dev/shm`` segment behind, and serves the colocated engine's tokens afterwards."""

from __future__ import annotations

import os
import random
import signal

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
           for rng, n in ((random.Random(31), 150), (random.Random(32), 170))]


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


def test_a_killed_decode_worker_is_restarted_clean_and_serves(tiny_model, reference, tmp_path):
    with LocalCluster(model=tiny_model, served_model_name="tiny", block_size=BLOCK,
                      restart=RestartPolicy(backoff_s=0.5), run_dir=tmp_path / "run") as cluster:
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

        os.kill(leader, signal.SIGKILL)  # the worker process only; its engine lives on
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
