"""kvmesh's vLLM KV connector: vLLM's paged KV cache <-> the kvmesh store.

``KvmeshConnector`` is a thin facade (the shape of vLLM's NIXL connector package): vLLM
builds it once per role, and it hands each call to the object of that role.

* **Scheduler side** (the engine core): ``engine_host.scheduler`` hashes prompts, asks
  the store for the longest cached prefix and plans each step's loads and saves.
* **Worker side** (the model runner): ``engine_host.worker`` hands the step's loads to
  the load side (``decode_workers.load_side``, in an engine that consumes KV) and its
  saves to the save side (``prefill_workers.save_side``, in an engine that produces KV),
  and holds a request's saves until its load is done. The facade picks the sides by the
  engine's ``kv_role``.

Why this module imports the role folders. vLLM imports exactly one module of ours,
``kv_connector_module_path`` (this one), in every process that builds a connector: the
engine core and each worker rank, started with fork or spawn, in a Ray actor or not. So
the code that picks the sides must reach them by importing them from here. Letting the
role folders register their sides instead would need code of theirs to run in each of
those processes first; the only such hook is vLLM's plugin entry points, which
``VLLM_PLUGINS`` can switch off, leaving an engine without its save or load side. This
module is therefore the one place in ``engine_host`` that imports upward, and the top of
that chain: nothing of ours imports it, and nothing the role folders import from
``engine_host`` (settings, metadata, the paged layout, the worker service) imports it, so
there is no cycle.

The connector declares vLLM's ``SupportsHMA``: vLLM keeps its hybrid allocator on for a
model with windowed and full-attention layers, and every KV-cache group moves with its
own block table (``engine_host.kv_groups``; the scheduler side says how). A draft
model's layers (speculative decoding) are saved and loaded with the target's, keyed in
the draft's own namespace. What the connector cannot carry (group kinds other than
attention KV, a speculative method whose draft reads the target's hidden states, a
KV-cache dtype it does not carry) is refused in the constructor, so the engine does not
start (``engine_host.model_support``).

Failure contract: the store is a cache. A lookup that fails counts as zero hits; a block
that is missing or fails its checksum at load time is reported through
``get_block_ids_with_load_errors`` and vLLM recomputes it (the engine must run with
``kv_load_failure_policy="recompute"``; with several KV-cache groups or a windowed one,
the request's load runs outside the steps and a failed one is reported through
``get_transfer_results``' ``failed_recving``: vLLM computes the whole request); a save
that fails or misses its deadline is logged and becomes a future miss; KV computed over
a block that failed to load is never saved. No call here waits without a deadline.

Configuration (``kv_connector_extra_config``): ``store_address`` (required),
``model_id`` (defaults to the model path), ``timeout_s`` (per store call and per step's
load, default 5), ``transfer_preference`` (default ``"shm,nixl,grpc"``: the first backend
the store offers and this worker can use carries the loads; ``Get`` when none),
``cluster_secret_file`` (the file of the secret every store call and transfer read
carries; default: ``KVMESH_CLUSTER_SECRET`` from the environment, ``kv_store.auth``).
``layerwise`` (default true: each layer's KV is waited for just before its attention;
false: the forward pass starts once every layer's KV is in the paged cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvmesh.decode_workers.load_side import LoadSide
from kvmesh.engine_host.connector_settings import ConnectorSettings
from kvmesh.engine_host.kv_groups import kv_groups
from kvmesh.engine_host.metadata import KvmeshConnectorMetadata, KvmeshWorkerMetadata
from kvmesh.engine_host.model_support import check_vllm_config
from kvmesh.engine_host.scheduler import ConnectorScheduler
from kvmesh.engine_host.worker import ConnectorWorker
from kvmesh.prefill_workers.save_side import SaveSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class KvmeshConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_vllm_config(vllm_config, kv_cache_config)  # what cannot be carried never starts
        settings = ConnectorSettings.from_vllm_config(vllm_config)
        self._scheduler: ConnectorScheduler | None = None
        self._worker: ConnectorWorker | None = None
        if role == KVConnectorRole.WORKER:
            self._worker = ConnectorWorker(settings, kv_cache_config,
                                           load_side=LoadSide if settings.can_load else None,
                                           save_side=SaveSide if settings.can_save else None)
        else:
            self._scheduler = ConnectorScheduler(settings, kv_groups(kv_cache_config, settings.num_layers))

    # ------------------------------------------------------------------ scheduler side

    def on_new_request(self, request: "Request") -> None:
        assert self._scheduler is not None
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KvmeshConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request: "Request",
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    # ------------------------------------------------------------------ worker side

    def _metadata(self) -> KvmeshConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvmeshConnectorMetadata)
        return meta

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_load_kv(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        if self.has_connector_metadata():
            self._worker.save_kv_layer(layer_name, kv_layer, self._metadata())

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sent, loaded, failed = self._worker.get_finished()
        return KVConnectorTransferResults(finished_sending=sent, finished_recving=loaded, failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KvmeshWorkerMetadata | None:
        assert self._worker is not None
        return self._worker.build_connector_worker_meta()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()
