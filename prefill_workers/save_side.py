"""The connector's save side: what makes an engine a KV producer.

``save_layer`` (vLLM's ``save_kv_layer``) copies each layer's newly finished blocks out of
the paged cache as soon as the layer has run and sends them to the store in the
background, while the next layer computes. A request that loads blocks in the same step
has its saves held until its load is done (``settle``), and dropped if the load failed
(``prefill_workers.step_saves``): KV computed over a block that failed to load is never
saved. ``wait`` (vLLM's ``wait_for_save``) waits for the sends with a deadline; a save
that fails or misses it is logged and becomes a future miss.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Collection

import torch

from kvmesh.engine_host.connector_settings import ConnectorSettings
from kvmesh.engine_host.metadata import KvmeshConnectorMetadata
from kvmesh.engine_host.paged_layout import PagedCaches, read_blocks
from kvmesh.kv_store.client import StoreClient
from kvmesh.kv_store.keys import KeySpace
from kvmesh.prefill_workers.step_saves import StepSaves


class SaveSide:
    def __init__(self, settings: ConnectorSettings, store: StoreClient, caches: PagedCaches,
                 space: KeySpace):
        self.caches, self.space = caches, space
        self._sender = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvmesh-save")
        self._saves = StepSaves(store.put, self._sender, settings.timeout_s)

    def save_layer(self, layer_name: str, kv_layer: torch.Tensor,
                   meta: KvmeshConnectorMetadata) -> None:
        if not meta.saves or layer_name not in self.caches.layers:
            return
        layer = self.caches.layers[layer_name]
        dim = self.caches.block_dims[layer_name]
        loading = {t.req_id for t in meta.loads}
        now = []
        for transfer in meta.saves:
            data = read_blocks(kv_layer, dim, transfer.block_ids)
            parents = [transfer.parent, *transfer.hashes[:-1]]
            items = [(self.space.key(h, layer), d, p and self.space.key(p, layer))
                     for h, d, p in zip(transfer.hashes, data, parents)]
            if transfer.req_id in loading:
                self._saves.add(items, held_for=transfer.req_id)
            else:
                now.extend(items)
        self._saves.add(now)

    def settle(self, failed: Collection[str]) -> None:
        """Once the step's load is finished: send the held saves of requests whose load
        went well, drop the others'."""
        self._saves.settle(failed)

    def wait(self) -> None:
        self._saves.wait()

    def shutdown(self) -> None:
        self._sender.shutdown(wait=False, cancel_futures=True)
