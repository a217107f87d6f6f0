"""The connector's save side: what makes an engine a KV producer.

``save_layer`` (vLLM's ``save_kv_layer``) copies each layer's newly finished blocks out of
the paged cache as soon as the layer has run and sends them to the store in the
background, while the next layer computes. A request that loads blocks in the same step
has its saves held until its load is done (``settle``), and dropped if the load failed
(``prefill_workers.step_saves``): KV computed over a block that failed to load is never
saved. ``wait`` (vLLM's ``wait_for_save``) waits for the sends with a deadline; a save
that fails or misses it is logged and becomes a future miss.

Each transfer carries the blocks of one KV-cache group, saved for that group's layers.

``save_finished`` saves the blocks of requests that finished (every layer at once: no
forward pass runs over them any more) in the background; ``take_finished`` never blocks
and names each such request once, when its save is done, has failed, or has missed its
deadline — then vLLM may free its blocks.

A rank built with ``writes`` false (a replica of a KV head another rank stores) copies
and sends nothing, and names each finished request at once: vLLM waits for every rank.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from typing import Collection, Sequence

import torch

from kvmesh.engine_host.connector_settings import ConnectorSettings
from kvmesh.engine_host.metadata import BlockTransfer, KvmeshConnectorMetadata
from kvmesh.engine_host.paged_layout import PagedCaches, read_blocks
from kvmesh.kv_store.client import StoreClient, StoreError
from kvmesh.kv_store.keys import KeySpace
from kvmesh.prefill_workers.step_saves import Item, StepSaves

log = logging.getLogger("kvmesh.connector")

_DONE: cf.Future = cf.Future()  # a save with nothing to send
_DONE.set_result(0)


class SaveSide:
    def __init__(self, settings: ConnectorSettings, store: StoreClient, caches: PagedCaches,
                 space: KeySpace, writes: bool = True):
        self.caches, self.space, self.writes = caches, space, writes
        self.store, self.timeout_s = store, settings.timeout_s
        self._sender = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvmesh-save")
        self._saves = StepSaves(store.put, self._sender, settings.timeout_s)
        self._finishing: dict[str, tuple[cf.Future, float]] = {}  # request -> (its save, deadline)

    def _items(self, transfer: BlockTransfer, layer: int, data: Sequence[bytes]) -> list[Item]:
        parents = [transfer.parent, *transfer.hashes[:-1]]
        return [(self.space.key(h, layer), d, p and self.space.key(p, layer), transfer.session)
                for h, d, p in zip(transfer.hashes, data, parents)]

    def save_layer(self, layer_name: str, kv_layer: torch.Tensor,
                   meta: KvmeshConnectorMetadata) -> None:
        if not self.writes or not meta.saves or layer_name not in self.caches.layers:
            return
        layer = self.caches.layers[layer_name]
        dim = self.caches.block_dims[layer_name]
        group = self.caches.groups.get(layer_name, 0)
        loading = {t.req_id for t in meta.loads}
        now = []
        for transfer in meta.saves:
            if transfer.group != group:  # another group's blocks: not this layer's
                continue
            items = self._items(transfer, layer, read_blocks(kv_layer, dim, transfer.block_ids))
            if transfer.req_id in loading:
                self._saves.add(items, held_for=transfer.req_id)
            else:
                now.extend(items)
        self._saves.add(now)

    def save_finished(self, transfers: Sequence[BlockTransfer]) -> None:
        """Copy out every layer of each finished request's blocks now (they are not freed
        until ``take_finished`` names the request) and send them in the background."""
        for transfer in transfers:
            if not self.writes:
                self._finishing[transfer.req_id] = (_DONE, 0.0)
                continue
            items = []
            for name, cache in self.caches.tensors.items():
                if self.caches.groups.get(name, 0) != transfer.group:
                    continue
                data = read_blocks(cache, self.caches.block_dims[name], transfer.block_ids)
                items += self._items(transfer, self.caches.layers[name], data)
            future = self._sender.submit(self.store.put, items)
            self._finishing[transfer.req_id] = (future, time.monotonic() + self.timeout_s)

    def take_finished(self) -> set[str]:
        """Requests whose finished save is over (done, failed or past its deadline), each
        named once."""
        now, done = time.monotonic(), set()
        for req_id, (future, deadline) in list(self._finishing.items()):
            if future.done():
                try:
                    future.result()
                except StoreError as e:
                    log.warning("saving the KV of finished request %s failed; it will miss: %s", req_id, e)
            elif now < deadline:
                continue
            else:
                log.warning("saving the KV of finished request %s missed its %.1fs deadline", req_id,
                            self.timeout_s)
            done.add(req_id)
            del self._finishing[req_id]
        return done

    def settle(self, failed: Collection[str]) -> None:
        """Once the step's load is finished: send the held saves of requests whose load
        went well, drop the others'."""
        self._saves.settle(failed)

    def wait(self) -> None:
        self._saves.wait()

    def shutdown(self) -> None:
        self._sender.shutdown(wait=False, cancel_futures=True)
