"""The connector's worker side, in each model runner: the step's loads go to the load side,
its saves to the save side, and this orders the two.

* The **load side** (``decode_workers.load_side``, an engine that consumes KV) leases the
  planned blocks and reads them layer by layer while the forward pass runs, and reports
  the blocks that did not load.
* The **save side** (``prefill_workers.save_side``, an engine that produces KV) copies
  each layer's finished blocks out as soon as the layer has run, sends them to the store
  in the background, and waits for those sends at the end of the step.

A request that loads blocks in the step has its saves held until its load is done, and
dropped if the load failed (``prefill_workers.step_saves``): each time a step's load is
finished, the save side settles its held saves with the requests whose load failed.
An engine without one of the roles has no such side; the scheduler side plans nothing
for it.

The sides come in as classes (the facade picks them by the engine's ``kv_role``), each
built with the same arguments: the settings, the store client, the paged cache and this
rank's key space (its own KV heads, ``engine_host.head_split``); the save side also with
whether this rank stores its shard (of ranks that hold a replicated head, one does).
A pipeline-parallel stage registers only its own layers' caches, so it reads and writes
only those; the scheduler side looks up every layer of every stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from kvmesh.engine_host.connector_settings import ConnectorSettings
from kvmesh.engine_host.kv_groups import kv_groups
from kvmesh.engine_host.metadata import KvmeshConnectorMetadata, KvmeshWorkerMetadata
from kvmesh.engine_host.paged_layout import PagedCaches
from kvmesh.kv_store.client import StoreClient
from kvmesh.kv_store.keys import KeySpace

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import KVCacheConfig

SideFactory = Callable[[ConnectorSettings, StoreClient, PagedCaches, KeySpace], Any]


class ConnectorWorker:
    def __init__(self, settings: ConnectorSettings, kv_cache_config: "KVCacheConfig | None",
                 load_side: SideFactory | None, save_side: SideFactory | None):
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.store = settings.store_client()
        rank = get_tensor_model_parallel_rank() if settings.tensor_parallel_size > 1 else 0
        space = settings.rank_space(rank)
        groups = kv_groups(kv_cache_config, settings.num_layers)
        self.caches = PagedCaches(kv_cache_config.num_blocks if kv_cache_config is not None else 0,
                                  {name: g for g, group in enumerate(groups) for name in group.layer_names},
                                  {name: layer for group in groups
                                   for name, layer in zip(group.layer_names, group.layers)})
        self.loads = load_side(settings, self.store, self.caches, space) if load_side else None
        self.saves = (save_side(settings, self.store, self.caches, space, writes=settings.rank_writes(rank))
                      if save_side else None)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.caches.register(kv_caches)

    def start_load_kv(self, meta: KvmeshConnectorMetadata) -> None:
        if meta.finished_saves and self.saves is not None:
            self.saves.save_finished(meta.finished_saves)
        if meta.async_loads and self.loads is not None:
            self.loads.start_async(meta.async_loads)
        if not meta.loads:
            return
        self._settle_saves()  # a previous step's load, if its finish was skipped
        self.loads.start(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.loads is not None:
            self.loads.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      meta: KvmeshConnectorMetadata) -> None:
        if self.saves is not None:
            self.saves.save_layer(layer_name, kv_layer, meta)

    def wait_for_save(self) -> None:
        self._settle_saves()
        if self.saves is not None:
            self.saves.wait()

    def _settle_saves(self) -> None:
        """Finish the step's load; then send the held saves of requests whose load went
        well, and drop the others'."""
        failed: set[str] = set()
        if self.loads is not None:
            self.loads.finish()
            failed = self.loads.take_failed_requests()
        if self.saves is not None:
            self.saves.settle(failed)

    def get_finished(self) -> tuple[set[str], set[str], set[str]]:
        """Finished requests whose blocks vLLM may free now (their save is over); requests
        whose load outside the steps is over; of those, the ones whose load failed."""
        sent = self.saves.take_finished() if self.saves is not None else set()
        loaded, failed = self.loads.take_async_finished() if self.loads is not None else (set(), set())
        return sent, loaded, failed

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.loads.block_ids_with_load_errors() if self.loads is not None else set()

    def build_connector_worker_meta(self) -> KvmeshWorkerMetadata | None:
        return self.loads.worker_meta() if self.loads is not None else None

    def shutdown(self) -> None:
        if self.saves is not None:
            self.saves.shutdown()
        if self.loads is not None:
            self.loads.shutdown()
        self.store.close()
