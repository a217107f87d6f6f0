"""What a running ``LocalCluster`` holds, read from outside: the figures a fault or a soak
must leave as they were (each store tier's bytes and blocks, the store's leases, each
engine's free KV blocks and running requests, the router's gauges, the ``/dev/shm``
segments of its processes) and each component's resident memory."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import httpx

from kvmesh.cluster import shm_reclaim
from kvmesh.kv_store.auth import call_metadata
from kvmesh.kv_store.client import StoreClient, StoreError
from kvmesh_proto import worker_pb2, worker_pb2_grpc

ROUTER_GAUGES = ("kvmesh_router_inflight", "kvmesh_router_queued")


def worker_health(cluster, address: str) -> worker_pb2.HealthReply:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Health(
            worker_pb2.HealthRequest(), timeout=5, metadata=call_metadata(cluster.secret))


def router_metric(cluster, name: str) -> float:
    text = httpx.get(cluster.router_url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    if m is None:
        raise AssertionError(f"the router exports no {name}")
    return float(m.group(1))


def stores_answer(cluster) -> bool:
    """Whether every store answers a Stats call."""
    try:
        store_figures(cluster)
    except StoreError:
        return False
    return True


def store_figures(cluster) -> dict[str, int]:
    """Per store: its leases, and each tier's used bytes and blocks."""
    out = {}
    for address in cluster.store_addresses:
        with StoreClient(address, secret=cluster.secret) as store:
            stats = store.stats()
        out[f"store {address} leases"] = stats.leases
        for tier in stats.tiers:
            out[f"store {address} {tier.name} used_bytes"] = tier.used_bytes
            out[f"store {address} {tier.name} blocks"] = tier.blocks
    return out


def engine_figures(cluster) -> dict[str, int]:
    """Per worker: requests running and its engine's free KV blocks (and how many it has)."""
    out = {}
    for address in cluster.prefill_addresses + cluster.decode_addresses:
        h = worker_health(cluster, address)
        out[f"{h.role} {address} running"] = h.running
        out[f"{h.role} {address} kv_blocks_free"] = h.kv_blocks_free
        out[f"{h.role} {address} kv_blocks_total"] = h.kv_blocks_total
    return out


def idle_engines(cluster) -> bool:
    """Whether every worker runs nothing and has all its KV blocks free."""
    figures = engine_figures(cluster)
    return all(v == 0 for k, v in figures.items() if k.endswith(" running")) and all(
        figures[k] == figures[k.replace("_free", "_total")] > 0
        for k in figures if k.endswith("kv_blocks_free"))


def router_gauges(cluster) -> dict[str, float]:
    return {name: router_metric(cluster, name) for name in ROUTER_GAUGES}


def shm_segments(cluster) -> set[str]:
    """``/dev/shm`` segments the cluster's processes (and their engines) hold, and the
    store arenas named after them."""
    pids = [pid for proc in cluster.processes for pid in shm_reclaim.group_pids(proc.popen.pid)]
    return shm_reclaim.held_segments(pids) | shm_reclaim.named_after(pids)


def figures(cluster) -> dict[str, object]:
    """Every figure above, in one dict (what must come back to its baseline)."""
    return {**store_figures(cluster), **engine_figures(cluster), **router_gauges(cluster),
            "shm segments": sorted(shm_segments(cluster))}


def rss_bytes(cluster) -> dict[str, int]:
    """Resident memory of each component: its process and its engine's (its group's)."""
    out = {}
    for proc in cluster.processes:
        total = 0
        for pid in shm_reclaim.group_pids(proc.popen.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
            total += int(m.group(1)) * 1024 if m else 0
        out[proc.name] = total
    return out
