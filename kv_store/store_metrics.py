"""Prometheus metrics of a store node, read from the store's counters at scrape time.

Every name is ``kvmesh_store_*``; per-tier ones carry a ``tier`` label (``gpu``, ``host``,
``disk``): a bounded set. Ratios since start are gauges (``hit_ratio``,
``overall_hit_ratio``); over a window, take ``rate`` of the ``hits`` and ``misses``
counters (as ``deploy/grafana/kvmesh.json`` does)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvmesh.kv_store.tiered_store import TieredStore


class StoreCollector(Collector):
    def __init__(self, store: TieredStore):
        self.store = store

    def collect(self):
        s = self.store.stats()
        labels = ["tier"]

        def family(kind, name, doc, value_of):
            metric = kind(f"kvmesh_store_{name}", doc, labels=labels)
            for t in s.tiers:
                metric.add_metric([t.name], value_of(t))
            return metric

        yield family(GaugeMetricFamily, "capacity_bytes", "Tier capacity", lambda t: t.capacity_bytes)
        yield family(GaugeMetricFamily, "used_bytes", "Bytes of blocks held", lambda t: t.used_bytes)
        yield family(GaugeMetricFamily, "free_bytes", "Capacity not holding blocks",
                     lambda t: t.capacity_bytes - t.used_bytes)
        yield family(GaugeMetricFamily, "blocks", "Blocks held", lambda t: t.blocks)
        yield family(GaugeMetricFamily, "fragmentation_ratio",
                     "Share of held slab pages not holding block bytes", lambda t: t.fragmentation)
        yield family(CounterMetricFamily, "hits", "Blocks served", lambda t: t.hits)
        yield family(CounterMetricFamily, "evictions", "Blocks dropped from the store", lambda t: t.evictions)
        yield family(CounterMetricFamily, "demotions", "Blocks moved to a slower tier", lambda t: t.demotions)
        yield family(CounterMetricFamily, "demotions_ahead",
                     "Blocks the demoter moved to a slower tier ahead of need", lambda t: t.demotions_ahead)
        yield family(CounterMetricFamily, "promotions", "Blocks moved into this tier from a slower one",
                     lambda t: t.promotions)
        yield family(CounterMetricFamily, "read_bytes", "Bytes read from the tier", lambda t: t.read_bytes)
        yield family(CounterMetricFamily, "write_bytes", "Bytes written to the tier", lambda t: t.write_bytes)
        yield family(GaugeMetricFamily, "read_bandwidth_bytes_per_second",
                     "Average read bandwidth while reading",
                     lambda t: t.read_bytes / t.read_seconds if t.read_seconds else 0.0)
        yield family(GaugeMetricFamily, "write_bandwidth_bytes_per_second",
                     "Average write bandwidth while writing",
                     lambda t: t.write_bytes / t.write_seconds if t.write_seconds else 0.0)
        yield family(GaugeMetricFamily, "sessions_resident",
                     "Sessions with at least one block held in the tier", lambda t: t.sessions)
        yield GaugeMetricFamily("kvmesh_store_sessions", "Sessions the store keeps",
                                value=self.store.sessions_tracked())
        yield family(GaugeMetricFamily, "block_bytes",
                     "Bytes of the blocks held, as put (used_bytes: as held at rest, encoded)",
                     lambda t: t.block_bytes)
        yield family(GaugeMetricFamily, "compression_saved_bytes",
                     "Bytes the tier's encoding saves at rest: block_bytes - (used_bytes - "
                     "lease_copy_bytes) (0 without an encoding; below 0 where encoding grew the blocks)",
                     lambda t: t.block_bytes - (t.used_bytes - t.lease_copy_bytes))
        yield family(GaugeMetricFamily, "lease_copy_bytes",
                     "Bytes of decoded copies of an encoded host tier's blocks that leases hold "
                     "(part of used_bytes; 0 elsewhere)", lambda t: t.lease_copy_bytes)
        info = GaugeMetricFamily("kvmesh_store_encoding_info", "How each tier holds blocks at rest (1)",
                                 labels=["tier", "encoding"])
        for t in s.tiers:
            info.add_metric([t.name, t.encoding], 1)
        yield info
        asked = s.hits + s.misses  # keys asked for by reads since the store started
        yield family(GaugeMetricFamily, "hit_ratio",
                     "Share of the keys asked for since start that this tier served",
                     lambda t: t.hits / asked if asked else 0.0)
        yield GaugeMetricFamily("kvmesh_store_overall_hit_ratio",
                                "Share of the keys asked for since start that the store served",
                                value=s.hits / asked if asked else 0.0)
        for name, doc, value in (("misses", "Keys asked for and not held", s.misses),
                                 ("corrupt", "Blocks whose checksum failed on read-back", s.corrupt),
                                 ("rejected", "Puts refused for lack of room", s.rejected),
                                 ("puts", "Blocks stored", s.puts)):
            yield CounterMetricFamily(f"kvmesh_store_{name}", doc, value=value)
