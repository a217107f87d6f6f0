"""The store's Prometheus metrics, read from a real store at scrape time, and the Grafana
dashboard, whose every query must name metrics that the store or the router export."""

import json
import re
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.kv_store.encoding import f32_to_bf16, make_encoding
from kvmesh.kv_store.integrity import checksum
from kvmesh.kv_store.store_metrics import StoreCollector
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.tiers import DiskTier, HostTier
from kvmesh.router.metrics import RouterMetrics

PAGE = 64 * 1024
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kvmesh.json"


def scrape(registry) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def kv(i: int) -> bytes:
    rng = np.random.default_rng(i)
    return f32_to_bf16(rng.standard_normal(4096).astype(np.float32)).tobytes()  # 8 KiB


def test_hit_ratios_fragmentation_and_bytes_saved(tmp_path):
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE),  # 8 blocks
                         DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE, encoding=make_encoding("zstd"))])
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    try:
        for i in range(20):
            store.put(b"k%d" % i, kv(i), checksum(kv(i)))
        on_disk = [b"k%d" % i for i in range(20) if store.tier_of(b"k%d" % i) == "disk"]
        in_host = [b"k%d" % i for i in range(20) if store.tier_of(b"k%d" % i) == "host"]
        store.get_many(on_disk[:3] + in_host[:2] + [b"absent1", b"absent2"])
        m = scrape(registry)
        stats = store.stats()
        host, disk = stats.tiers
        assert (host.hits, disk.hits, stats.misses) == (2, 3, 2)
        assert m[("kvmesh_store_hit_ratio", (("tier", "disk"),))] == 3 / 7
        assert m[("kvmesh_store_hit_ratio", (("tier", "host"),))] == 2 / 7
        assert m[("kvmesh_store_overall_hit_ratio", ())] == 5 / 7
        assert m[("kvmesh_store_hits_total", (("tier", "disk"),))] == 3
        assert m[("kvmesh_store_misses_total", ())] == 2
        saved = m[("kvmesh_store_compression_saved_bytes", (("tier", "disk"),))]
        assert saved == disk.block_bytes - disk.used_bytes > 0  # real bf16 values compress
        assert m[("kvmesh_store_compression_saved_bytes", (("tier", "host"),))] == 0
        assert m[("kvmesh_store_block_bytes", (("tier", "disk"),))] == disk.block_bytes
        assert m[("kvmesh_store_encoding_info", (("encoding", "zstd"), ("tier", "disk")))] == 1
        assert m[("kvmesh_store_fragmentation_ratio", (("tier", "disk"),))] == disk.fragmentation > 0
    finally:
        store.close()


def exported_names() -> set[str]:
    """Every sample name the store and the router can export (a histogram's _bucket, a
    counter's _total, ...), from their own collectors."""
    names = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "_created"), "info": ("_info",)}
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE)])
    try:
        for collector in (StoreCollector(store), RouterMetrics().registry):
            for family in collector.collect():
                names.update(family.name + s for s in suffixes[family.type])
    finally:
        store.close()
    return names


def test_every_dashboard_query_names_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    known = exported_names()
    used = {name for e in exprs for name in re.findall(r"\bkvmesh_[a-z0-9_]+", e)}
    assert not used - known, f"queries name metrics nobody exports: {sorted(used - known)}"
    # what the dashboard is for: the store's hit ratios, fragmentation and bytes saved,
    # with the router's time to first token and throughput
    for name in ("kvmesh_store_hits_total", "kvmesh_store_misses_total", "kvmesh_store_fragmentation_ratio",
                 "kvmesh_store_compression_saved_bytes", "kvmesh_router_time_to_first_token_seconds_bucket",
                 "kvmesh_router_generated_tokens_total", "kvmesh_store_sessions_resident"):
        assert name in used
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])


def test_the_check_catches_a_query_of_a_metric_nobody_exports():
    assert "kvmesh_store_hit_ratio" in exported_names()
    assert "kvmesh_store_hits" not in exported_names()  # a counter is exported as _total
    assert "kvmesh_router_time_to_first_token_seconds_bucket" in exported_names()
