"""kvmesh's vLLM KV connector: vLLM's paged KV cache <-> the kvmesh store.

vLLM runs a connector in two places, and this module keeps them apart:

* **Scheduler side** (the engine core): hashes each new request's prompt into chain
  hashes (``on_new_request``), asks the store how many leading blocks it holds
  (``get_num_new_matched_tokens``), remembers what was allocated for them
  (``update_state_after_alloc``) and, every step, tells the workers which blocks to load
  and which newly computed full blocks to save (``build_connector_meta``).
* **Worker side** (the model runner): leases the planned blocks and reads them layer by
  layer while the forward pass runs, each layer waited for just before its attention
  (``start_load_kv``, ``wait_for_layer_load``; ``kv_store.layer_loader``), copies each layer's finished blocks out as
  soon as the layer has run and sends them to the store in the background
  (``save_kv_layer``), and waits for those sends at the end of the step
  (``wait_for_save``). A request that loads blocks in the step has its saves held until
  its load is done, and dropped if the load failed (``kv_store.step_saves``).

Failure contract: the store is a cache. A lookup that fails counts as zero hits; a block
that is missing or fails its checksum at load time is reported through
``get_block_ids_with_load_errors`` and vLLM recomputes it (the engine must run with
``kv_load_failure_policy="recompute"``); a save that fails or misses its deadline is
logged and becomes a future miss; KV computed over a block that failed to load is never
saved. No call here waits without a deadline.

Configuration (``kv_connector_extra_config``): ``store_address`` (required),
``model_id`` (defaults to the model path), ``timeout_s`` (per store call and per step's
load, default 5), ``transfer_preference`` (default ``"shm,nixl,grpc"``: the first backend
the store offers and this worker can use carries the loads; ``Get`` when none).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.model_executor.models.utils import extract_layer_index

from kvmesh.kv_store.client import StoreClient, StoreError
from kvmesh.kv_store.keys import KeySpace, chain_hashes, namespace
from kvmesh.kv_store.layer_loader import LayerLoad, LoadStats, ReaderCache
from kvmesh.kv_store.paged_layout import block_dim, read_blocks
from kvmesh.kv_store.step_saves import StepSaves

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvmesh.connector")


@dataclass
class BlockTransfer:
    """Blocks of one request to move this step: paged block ids and their chain hashes."""

    req_id: str
    block_ids: list[int]
    hashes: list[bytes]
    parent: bytes | None = None  # chain hash of the block before ``hashes[0]``


@dataclass
class KvmeshConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


@dataclass
class KvmeshWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per request: prompt tokens whose load failed this step, and how
    the loaded KV came in. (The scheduler sees it with the step's output; a request that
    finishes in the very step that loaded it is reported without load statistics.)"""

    failed_tokens: dict[str, int] = field(default_factory=dict)
    loads: dict[str, LoadStats] = field(default_factory=dict)

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "KvmeshWorkerMetadata":
        merged = dict(self.failed_tokens)
        for req_id, n in getattr(other, "failed_tokens", {}).items():
            merged[req_id] = max(merged.get(req_id, 0), n)
        return KvmeshWorkerMetadata(merged, {**self.loads, **getattr(other, "loads", {})})


def layout_fingerprint(vllm_config: "VllmConfig") -> str:
    """What must match for a block's bytes to mean the same thing to another worker."""
    from vllm.platforms import current_platform

    model = vllm_config.model_config
    cache = vllm_config.cache_config
    dtype = model.dtype if cache.cache_dtype == "auto" else cache.cache_dtype
    device = current_platform.device_type
    if device == "cpu":  # the CPU kernels pack K by instruction set
        device += "-" + torch.backends.cpu.get_cpu_capability()
    return f"{device}|{dtype}|bs{cache.block_size}|hd{model.get_head_size()}"


@dataclass
class _RequestState:
    """Scheduler-side bookkeeping of one request, dropped when it finishes."""

    hashes: list[bytes]
    block_ids: list[int] = field(default_factory=list)
    load: tuple[int, int] | None = None  # (first block, number of blocks) to load
    load_pending: bool = False
    saved_blocks: int = 0                 # leading blocks already in the store or sent
    matched: tuple[int, int] = (0, 0)     # (local computed tokens, store tokens) last seen
    tokens_from_store: int = 0
    tokens_load_failed: int = 0
    load_stats: LoadStats | None = None


class KvmeshConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        extra = cfg.kv_connector_extra_config or {}
        if "store_address" not in extra:
            raise ValueError("KvmeshConnector needs kv_connector_extra_config['store_address']")
        self.timeout_s = float(extra.get("timeout_s", 5.0))
        self.store = StoreClient(extra["store_address"], timeout_s=self.timeout_s)
        self.block_size = vllm_config.cache_config.block_size
        self.can_save = cfg.is_kv_producer
        self.can_load = cfg.is_kv_consumer

        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        model_id = str(extra.get("model_id") or model.model)
        ns = namespace(model_id, layout_fingerprint(vllm_config))
        total_heads = model.get_total_num_kv_heads()
        tp = parallel.tensor_parallel_size
        per_rank = max(1, total_heads // tp)
        shards = sorted({(r * per_rank % total_heads, r * per_rank % total_heads + per_rank)
                         for r in range(tp)})
        self._shard_spaces = [KeySpace(ns, heads) for heads in shards]
        self._all_layers = list(range(model.get_total_num_hidden_layers()))

        # Scheduler side.
        self._requests: dict[str, _RequestState] = {}

        # Worker side.
        if role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank() if tp > 1 else 0
            start = rank * per_rank % total_heads
            self._space = KeySpace(ns, (start, start + per_rank))
        self._caches: dict[str, torch.Tensor] = {}
        self._block_dims: dict[str, int] = {}
        self._layers: dict[str, int] = {}
        self._num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else 0
        self._sender = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvmesh-save")
        self._saves = StepSaves(self.store.put, self._sender, self.timeout_s)
        self._failed_block_ids: set[int] = set()
        self._failed_tokens: dict[str, int] = {}
        self._failed_loads: set[str] = set()  # requests whose load failed, until their saves settle
        self._loader = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-load")
        self._readers = ReaderCache(str(extra.get("transfer_preference", "shm,nixl,grpc")).split(","))
        self._load: LayerLoad | None = None
        self._load_stats: dict[str, LoadStats] = {}

    # ------------------------------------------------------------------ scheduler side

    def _groups(self, hashes: list[bytes]) -> list[list[bytes]]:
        """Per block, every key a full load needs: all layers of all head shards."""
        return [[k for space in self._shard_spaces for k in space.block_group(h, self._all_layers)]
                for h in hashes]

    def on_new_request(self, request: "Request") -> None:
        tokens = list(request.prompt_token_ids or [])
        self._requests[request.request_id] = _RequestState(
            hashes=chain_hashes(tokens, self.block_size, getattr(request, "cache_salt", None)))

    def _state(self, request: "Request") -> _RequestState:
        if request.request_id not in self._requests:
            self.on_new_request(request)
        return self._requests[request.request_id]

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        state = self._state(request)
        state.matched = (num_computed_tokens, 0)
        if not self.can_load or not state.hashes:
            return 0, False
        # At least one prompt token must be left for the engine to compute.
        loadable = min(len(state.hashes), (request.num_prompt_tokens - 1) // self.block_size)
        first = num_computed_tokens // self.block_size
        if loadable <= first:
            return 0, False
        try:
            hits = self.store.lookup(self._groups(state.hashes[first:loadable]))
        except StoreError as e:
            log.warning("store lookup failed, computing locally: %s", e)
            return 0, False
        state.matched = (num_computed_tokens, hits * self.block_size)
        return hits * self.block_size, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        state = self._state(request)
        if num_external_tokens <= 0:
            return
        first = state.matched[0] // self.block_size
        count = num_external_tokens // self.block_size
        state.load = (first, count)
        state.load_pending = True
        state.saved_blocks = max(state.saved_blocks, first + count)
        state.tokens_from_store += num_external_tokens

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KvmeshConnectorMetadata:
        meta = KvmeshConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan(new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    state.block_ids = list(new_ids[0])
                else:
                    state.block_ids.extend(new_ids[0])
            self._plan(req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), meta)
        return meta

    def _plan(self, req_id: str, state: _RequestState, computed_after_step: int,
              meta: KvmeshConnectorMetadata) -> None:
        if state.load_pending and state.load is not None:
            first, count = state.load
            meta.loads.append(BlockTransfer(req_id, state.block_ids[first:first + count],
                                            state.hashes[first:first + count]))
            state.load_pending = False
        if self.can_save:
            full = min(len(state.hashes), computed_after_step // self.block_size,
                       len(state.block_ids))
            if full > state.saved_blocks:
                first = state.saved_blocks
                meta.saves.append(BlockTransfer(req_id, state.block_ids[first:full],
                                                state.hashes[first:full],
                                                state.hashes[first - 1] if first else None))
                state.saved_blocks = full

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        worker_meta = connector_output.kv_connector_worker_meta
        for req_id, stats in getattr(worker_meta, "loads", {}).items():
            state = self._requests.get(req_id)
            if state is not None:
                state.load_stats = stats
        for req_id, n in getattr(worker_meta, "failed_tokens", {}).items():
            state = self._requests.get(req_id)
            if state is None:
                continue
            state.tokens_load_failed += n
            if state.load is not None:  # recomputed blocks get saved again, replacing bad ones
                first, count = state.load
                state.saved_blocks = min(state.saved_blocks, first + count - n // self.block_size)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        info = {"tokens_from_store": state.tokens_from_store,
                "tokens_load_failed": state.tokens_load_failed}
        if state.load_stats is not None:
            info.update(state.load_stats._asdict())
        return False, {"kvmesh": info}

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        for name, cache in kv_caches.items():
            self._caches[name] = cache
            self._layers[name] = extract_layer_index(name)
            self._block_dims[name] = block_dim(cache, self._num_blocks or cache.shape[0])

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvmeshConnectorMetadata)
        if not meta.loads:
            return
        self._finish_load()  # a previous step's load, if its finish was skipped
        self._settle_saves()
        self._load = LayerLoad(self.store, self._readers, self._space, self._layers, self._caches,
                               self._block_dims, self._loader, self.timeout_s)
        self._load.start(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._load is not None:
            self._load.write_layer(layer_name)

    def _finish_load(self) -> None:
        if self._load is None:
            return
        load, self._load = self._load, None

        def failed(req_id: str, block_ids: list[int]) -> None:
            self._failed_loads.add(req_id)
            self._failed_block_ids.update(block_ids)
            self._failed_tokens[req_id] = self._failed_tokens.get(req_id, 0) + len(block_ids) * self.block_size

        self._load_stats.update(load.finish(failed))

    def _settle_saves(self) -> None:
        """Once the step's load is finished: send the held saves of requests whose load
        went well, drop the others'."""
        self._saves.settle(self._failed_loads)
        self._failed_loads.clear()

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: Any, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvmeshConnectorMetadata)
        if not meta.saves or layer_name not in self._layers:
            return
        layer = self._layers[layer_name]
        dim = self._block_dims[layer_name]
        loading = {t.req_id for t in meta.loads}
        now = []
        for transfer in meta.saves:
            data = read_blocks(kv_layer, dim, transfer.block_ids)
            parents = [transfer.parent, *transfer.hashes[:-1]]
            items = [(self._space.key(h, layer), d, p and self._space.key(p, layer))
                     for h, d, p in zip(transfer.hashes, data, parents)]
            if transfer.req_id in loading:
                self._saves.add(items, held_for=transfer.req_id)
            else:
                now.extend(items)
        self._saves.add(now)

    def wait_for_save(self) -> None:
        self._finish_load()
        self._settle_saves()
        self._saves.wait()

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_load()
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def build_connector_worker_meta(self) -> KvmeshWorkerMetadata | None:
        if not self._failed_tokens and not self._load_stats:
            return None
        meta = KvmeshWorkerMetadata(self._failed_tokens, self._load_stats)
        self._failed_tokens, self._load_stats = {}, {}
        return meta

    def shutdown(self) -> None:
        self._sender.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._readers.close()
        self.store.close()
