"""Choosing the prefill and decode worker of a request.

The router remembers where prefixes went, in a block index of its own (an
``EmbeddedBlockIndex``, bounded by ``capacity_blocks``): under the node ``"store"`` the
chain hashes of every prompt prefilled into the shared store, and, when decode workers
keep a local prefix cache (``decode_local_cache``, or a worker's ``local_cache`` as its
health reports it), under each decode worker the prompts it has served. A
request's overlap with each node is then one ``longest_prefix`` call.

* ``kv_aware`` (default): the decode worker with the longest local overlap wins unless it
  is busier than the least-loaded worker by more than ``load_slack`` requests; otherwise
  the least loaded. Prefill goes to the least-loaded prefill worker.
* ``round_robin``: cache-blind rotation, the baseline to compare against.
* **Conditional disaggregation**: when the part of the prompt neither the chosen decode
  worker nor the store already holds is at most ``max_local_prefill_tokens`` (and always
  for a prompt shorter than one block), the request skips prefill and goes straight to
  decode. So does a part of at most ``max_decode_prefill_tokens`` while every prefill
  worker has at least that many tokens of other prompts still to compute: queueing
  behind them would take longer than computing it on the decode worker.
  But while the chosen decode worker is streaming at least ``busy_decode_streams`` other
  requests and a prefill worker is idle, a prompt with at least one uncached block goes
  to that prefill worker after all: computed on the decode worker, its uncached part
  would lengthen the step every stream there is waiting on (each one's inter-token
  latency), while the idle prefill worker computes it at the cost of this request's own
  first token alone (the decode worker then loads its blocks and computes only the last
  partial block). One stream held up costs about what the detour costs this request, so
  the default is two.
* **Every turn counts**: a request that succeeded credits the store (and, with local
  caches, its decode worker) with its prompt *and* the tokens it generated, which the
  decode worker saved: the next turn of a conversation finds its whole history cached.

The table is a hint: a worker may have evicted a prefix it is credited with; that costs
time (the worker loads or computes it), never correctness.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from kvmesh.kv_store.index import EmbeddedBlockIndex
from kvmesh.kv_store.keys import chain_hashes

STORE_NODE = "store"
ROUTING_POLICIES = ("kv_aware", "round_robin")


@dataclass(eq=False)
class Worker:
    address: str
    client: object          # router.workers.WorkerClient
    inflight: int = 0
    pending_tokens: int = 0   # prompt tokens of the prefills it runs, still to compute
    healthy: bool = True
    health_timeouts: int = 0  # Health calls that timed out in a row
    local_cache: bool = False  # keeps vLLM's local prefix cache (as its health reports)


class Route(NamedTuple):
    prefill: Worker | None  # None: prefill skipped (conditional disaggregation, or no prefill worker)
    decode: Worker
    reason: str             # "prefix_affinity", "least_loaded", "round_robin"
    cached_tokens: int      # prompt tokens the decode side is expected to find
    hashes: tuple[bytes, ...]


@dataclass
class RoutingPolicy:
    prefill: list[Worker]
    decode: list[Worker]
    block_size: int = 32
    policy: str = "kv_aware"
    decode_local_cache: bool = False
    max_local_prefill_tokens: int = 64
    max_decode_prefill_tokens: int = 0
    busy_decode_streams: int = 0  # 0: never take a short part off a busy decode worker
    load_slack: int = 4
    capacity_blocks: int = 200_000
    _index: EmbeddedBlockIndex = field(default_factory=lambda: EmbeddedBlockIndex(heartbeat_timeout_s=1e12))
    _held: OrderedDict = field(default_factory=OrderedDict)  # (node, hash) -> None, oldest first
    _turn: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}; use {' or '.join(ROUTING_POLICIES)}")
        for node in [STORE_NODE] + [w.address for w in self.decode]:
            self._index.register_node(node, node)

    def set_members(self, role: str, workers: list[Worker]) -> list[Worker]:
        """Make ``workers`` the pool of ``role`` (keeping the state of those already in it);
        returns the workers dropped, for the caller to close once idle."""
        pool = self.prefill if role == "prefill" else self.decode
        known = {w.address: w for w in pool}
        wanted = {w.address for w in workers}
        dropped = [w for w in pool if w.address not in wanted]
        pool[:] = [known.get(w.address, w) for w in workers]
        if role == "decode":
            for w in pool:
                if w.address not in known:
                    self._index.register_node(w.address, w.address)
            for w in dropped:
                self._index.unregister_node(w.address)
        return dropped

    def _caches(self, worker: Worker) -> bool:
        return self.decode_local_cache or worker.local_cache

    def _overlap(self, hashes: Sequence[bytes]) -> dict[str, int]:
        if not hashes:
            return {}
        return self._index.longest_prefix([[h] for h in hashes[:4096]])

    def _next(self, workers: list[Worker]) -> Worker:
        """The next healthy worker in rotation (any, when none is healthy)."""
        for _ in range(len(workers)):
            worker = workers[next(self._turn) % len(workers)]
            if worker.healthy:
                return worker
        return workers[next(self._turn) % len(workers)]

    @staticmethod
    def _least_loaded(workers: list[Worker]) -> Worker:
        healthy = [w for w in workers if w.healthy] or workers
        return min(healthy, key=lambda w: w.inflight)

    def choose(self, token_ids: Sequence[int], salt: str | None = None) -> Route | None:
        """The route of a request, or None when there is no decode worker at all."""
        if not self.decode:
            return None
        hashes = tuple(chain_hashes(token_ids, self.block_size, salt))
        overlap = self._overlap(hashes)
        if self.policy == "round_robin":
            prefill = self._next(self.prefill) if self.prefill else None
            return Route(prefill, self._next(self.decode), "round_robin", 0, hashes)
        least = self._least_loaded(self.decode)
        decode, reason = least, "least_loaded"
        caching = [w for w in self.decode if self._caches(w)]
        if caching:
            best = max(caching, key=lambda w: (overlap.get(w.address, 0), -w.inflight))
            if overlap.get(best.address, 0) and best.healthy and \
                    best.inflight <= least.inflight + self.load_slack:
                decode, reason = best, "prefix_affinity"
        local = overlap.get(decode.address, 0) if self._caches(decode) else 0
        cached = max(local, overlap.get(STORE_NODE, 0)) * self.block_size
        uncached = len(token_ids) - cached
        skip = (len(token_ids) < self.block_size or uncached <= self.max_local_prefill_tokens
                or not self.prefill)
        prefill = None if skip else min(
            [w for w in self.prefill if w.healthy] or self.prefill, key=lambda w: w.pending_tokens)
        if prefill is not None and uncached <= self.max_decode_prefill_tokens \
                and prefill.pending_tokens >= uncached:
            prefill, reason = None, reason + "+prefill_busy"
        if prefill is None and self.prefill and self.busy_decode_streams \
                and decode.inflight >= self.busy_decode_streams and uncached >= self.block_size:
            idle = [w for w in self.prefill if w.healthy and w.inflight == 0]
            if idle:
                prefill, reason = idle[0], reason + "+decode_busy"
        return Route(prefill, decode, reason, cached, hashes)

    def uncached_tokens(self, route: Route, num_tokens: int) -> int:
        """Prompt tokens of ``route`` its prefill worker is expected to compute."""
        return max(0, num_tokens - route.cached_tokens)

    def record(self, route: Route, decode_address: str | None = None,
               hashes: Sequence[bytes] | None = None) -> None:
        """Credit the request's blocks to where they now are (call after it succeeded):
        the store (the prefill worker saved the prompt, the decode worker what it
        computed), and with ``decode_local_cache`` the decode worker that served it
        (``decode_address``; default the route's), while it is still in the pool — one
        that left meanwhile is credited nothing. ``hashes``: the chain hashes of every
        token whose KV was computed (prompt and generated), default the prompt's. Never
        raises for a worker that left: the request it served has succeeded."""
        hashes = list(hashes if hashes is not None else route.hashes)
        if not hashes:
            return
        nodes = [STORE_NODE]
        served = decode_address or route.decode.address
        if any(w.address == served and self._caches(w) for w in self.decode):
            nodes.append(served)
        for node in nodes:
            self._index.add(node, "gpu" if node != STORE_NODE else "host", hashes)
            for h in hashes:
                self._held[(node, h)] = None
                self._held.move_to_end((node, h))
        while len(self._held) > self.capacity_blocks:
            (node, h), _ = self._held.popitem(last=False)
            self._index.remove(node, [h])
