"""The router's Prometheus metrics, in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvmesh_router_requests", "Completion requests by outcome",
                                ["outcome"], registry=r)
        self.prompt_tokens = Counter("kvmesh_router_prompt_tokens", "Prompt tokens received",
                                     registry=r)
        self.generated_tokens = Counter("kvmesh_router_generated_tokens", "Tokens generated",
                                        registry=r)
        self.tokens_from_store = Counter(
            "kvmesh_router_prefix_tokens_from_store",
            "Prompt tokens whose KV a worker loaded from the store instead of computing",
            ["stage"], registry=r)
        self.tokens_load_failed = Counter(
            "kvmesh_router_kv_load_failed_tokens",
            "Prompt tokens whose KV load failed and were recomputed", ["stage"], registry=r)
        self.prefill_failures = Counter(
            "kvmesh_router_prefill_failures", "Prefills that failed; decode computed the prompt",
            registry=r)
        self.prefill_skipped = Counter(
            "kvmesh_router_prefill_skipped",
            "Requests sent straight to decode (conditional disaggregation)", registry=r)
        self.inflight = Gauge("kvmesh_router_inflight", "Requests holding an admission slot",
                              registry=r)
        self.queued = Gauge("kvmesh_router_queued", "Requests waiting for an admission slot",
                            registry=r)
        self.decode_retries = Counter(
            "kvmesh_router_decode_retries",
            "Decode attempts repeated because a worker was unreachable", registry=r)
        self.routing = Counter("kvmesh_router_routing_decisions",
                               "Decode worker choices by reason", ["reason"], registry=r)
        self.decode_requests = Counter("kvmesh_router_decode_requests",
                                       "Requests sent to each decode worker", ["worker"], registry=r)
        self.queue_time = Histogram("kvmesh_router_queue_seconds", "Time waiting for admission",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kvmesh_router_inter_token_latency_seconds",
                             "Time between streamed tokens", buckets=LATENCY_BUCKETS, registry=r)
        self.kv_loads = Counter("kvmesh_router_kv_loads",
                                "Decode-side KV loads by transfer backend", ["backend"], registry=r)
        self.kv_bytes = Counter("kvmesh_router_kv_load_bytes",
                                "Bytes of KV loaded by decode workers", ["backend"], registry=r)
        self.kv_hidden = Histogram(
            "kvmesh_router_kv_transfer_hidden_ratio",
            "Share of a KV load's transfer time the forward pass did not wait for",
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0), registry=r)
        self.ttft = Histogram("kvmesh_router_time_to_first_token_seconds",
                              "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kvmesh_router_request_seconds", "End-to-end request latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.stages = Histogram(
            "kvmesh_router_stage_seconds",
            "Where a request's time to first token went, by stage (router_queue, prefill, "
            "prefill_engine_queue, prefill_compute, lookup, load, load_waited, "
            "decode_engine_queue, decode_first_step)", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_saved = Counter(
            "kvmesh_router_tokens_saved_at_finish",
            "Generated tokens whose KV the decode workers saved for the next turn", registry=r)
