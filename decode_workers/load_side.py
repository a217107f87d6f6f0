"""The connector's load side: what makes an engine a KV consumer.

Each step that loads blocks, ``start`` leases them all in one call and reads them layer
by layer on a background thread, each layer waited for just before its attention
(``wait_for_layer``; ``decode_workers.layer_loader``); with the ``layerwise`` setting
off, ``start`` itself waits until every layer is in the paged cache, so the forward pass
computes nothing before the whole load is done. ``finish`` waits out the rest and
records what failed: the blocks, reported to vLLM through
``block_ids_with_load_errors`` (vLLM recomputes them; the engine must run with
``kv_load_failure_policy="recompute"``), the prompt tokens per request, reported to the
scheduler side (``worker_meta``, with how the loaded KV came in), and the requests, whose
saves this step must be dropped (``take_failed_requests``). Nothing here raises on a
store or transfer failure, and no wait is without the step's deadline.

An engine of several KV-cache groups, or of a windowed one, loads outside the steps
(``start_async``), where a failed load has vLLM recompute the whole request. Those loads
run one after another on a thread of their own, all layers at once, each within its own
deadline; ``take_async_finished`` names each such request once, when its load is over,
and says which failed (vLLM then computes them from their first token). Their failed
tokens and statistics go to the scheduler side as the steps' do.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from typing import Sequence

from kvmesh.decode_workers.layer_loader import LayerLoad, ReaderCache
from kvmesh.engine_host.connector_settings import ConnectorSettings
from kvmesh.engine_host.metadata import BlockTransfer, KvmeshWorkerMetadata, LoadStats
from kvmesh.engine_host.paged_layout import PagedCaches
from kvmesh.kv_store.client import StoreClient
from kvmesh.kv_store.keys import KeySpace

log = logging.getLogger("kvmesh.connector")


class LoadSide:
    def __init__(self, settings: ConnectorSettings, store: StoreClient, caches: PagedCaches,
                 space: KeySpace):
        self.store, self.caches, self.space = store, caches, space
        self.block_size = settings.block_size
        self.timeout_s = settings.timeout_s
        self.layerwise = settings.layerwise
        self._loader = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-load")
        self._readers = ReaderCache(settings.transfer_preference, secret=store.secret)
        self._load: LayerLoad | None = None
        self._failed_block_ids: set[int] = set()
        self._failed_tokens: dict[str, int] = {}
        self._failed_loads: set[str] = set()  # requests whose load failed, until their saves settle
        self._load_stats: dict[str, LoadStats] = {}
        self._async = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-load-async")
        self._async_lock = threading.Lock()
        # per finished load: its requests, the failed blocks of each (per transfer), statistics
        self._async_done: list[tuple[set[str], dict[str, list[list[int]]], dict[str, LoadStats]]] = []

    def _new_load(self) -> LayerLoad:
        return LayerLoad(self.store, self._readers, self.space, self.caches.layers, self.caches.tensors,
                         self.caches.block_dims, self._loader, self.timeout_s, self.caches.groups)

    def start(self, transfers: Sequence[BlockTransfer]) -> None:
        """Lease the step's blocks and start reading them, first layer first (the previous
        step's load must be finished)."""
        self._load = self._new_load()
        self._load.start(transfers)
        if not self.layerwise:
            self._load.write_all()

    def wait_for_layer(self, layer_name: str) -> None:
        if self._load is not None:
            self._load.write_layer(layer_name)

    def finish(self) -> None:
        """Finish the step's load, if any, and record what failed."""
        if self._load is None:
            return
        load, self._load = self._load, None

        def failed(req_id: str, block_ids: list[int]) -> None:
            self._failed_loads.add(req_id)
            self._failed_block_ids.update(block_ids)
            self._count_failed(req_id, block_ids)

        self._load_stats.update(load.finish(failed))

    def _count_failed(self, req_id: str, block_ids: list[int]) -> None:
        """The request's tokens to compute again: from the first failed block of any of its
        groups (each group's blocks end where the load ends)."""
        self._failed_tokens[req_id] = max(self._failed_tokens.get(req_id, 0), len(block_ids) * self.block_size)

    def start_async(self, transfers: Sequence[BlockTransfer]) -> None:
        """Load ``transfers`` outside the steps, after the loads started before them."""
        self._async.submit(self._load_async, list(transfers))

    def _load_async(self, transfers: list[BlockTransfer]) -> None:
        failed: dict[str, list[list[int]]] = {}
        stats: dict[str, LoadStats] = {}
        try:
            load = self._new_load()
            load.start(transfers)
            stats = load.finish(lambda req_id, block_ids: failed.setdefault(req_id, []).append(block_ids))
        except Exception:  # never leave vLLM waiting: the requests count as failed
            log.exception("a load outside the steps failed")
            for t in transfers:
                failed.setdefault(t.req_id, []).append(t.block_ids)
        with self._async_lock:
            self._async_done.append(({t.req_id for t in transfers}, failed, stats))

    def take_async_finished(self) -> tuple[set[str], set[str]]:
        """The requests whose load outside the steps is over since the last call, and of
        those the ones whose load failed."""
        with self._async_lock:
            done, self._async_done = self._async_done, []
        loaded, failed = set(), set()
        for req_ids, failures, stats in done:
            loaded |= req_ids
            failed |= set(failures)
            for req_id, per_transfer in failures.items():
                for block_ids in per_transfer:
                    self._count_failed(req_id, block_ids)
            self._load_stats.update(stats)
        return loaded, failed

    def take_failed_requests(self) -> set[str]:
        """The requests whose load failed since the last call."""
        failed, self._failed_loads = self._failed_loads, set()
        return failed

    def block_ids_with_load_errors(self) -> set[int]:
        """Finish the step's load; the paged blocks that failed since the last call."""
        self.finish()
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def worker_meta(self) -> KvmeshWorkerMetadata | None:
        """Failed prompt tokens and load statistics since the last call, per request."""
        if not self._failed_tokens and not self._load_stats:
            return None
        meta = KvmeshWorkerMetadata(self._failed_tokens, self._load_stats)
        self._failed_tokens, self._load_stats = {}, {}
        return meta

    def shutdown(self) -> None:
        self._async.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._readers.close()
