"""The connector's scheduler side, in the engine core.

It hashes each new request's prompt into chain hashes (``on_new_request``), asks the
store how many leading blocks it holds (``get_num_new_matched_tokens``: a block counts
only when every layer of every shard some reading rank needs is there, in the shards of
this engine's own tensor-parallel split or, failing that, of another split that could
have written them, ``engine_host.head_split``; the load reads the split with the longest
prefix, and a block missing any piece ends the prefix), remembers what
was allocated for them (``update_state_after_alloc``) and, every step, tells the workers
which blocks to load and which newly computed full blocks to save
(``build_connector_meta``). A lookup that fails counts as zero hits; prompt tokens whose
load failed (``update_connector_output``) have their blocks planned for saving again, so
the recomputed KV replaces what did not load.

Every turn's KV is kept: when a request finishes in an engine that saves, the full blocks
it computed beyond its prompt (the generated tokens, so the next turn of a conversation
finds its whole history in the store) and any computed block not saved yet go out in
the next step's ``finished_saves``; ``request_finished`` then returns True, so vLLM keeps
those blocks until the worker side reports the request done sending (``get_finished``:
after the save, or once it failed or missed its deadline — never later).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmesh.engine_host.connector_settings import ConnectorSettings
from kvmesh.engine_host.metadata import BlockTransfer, KvmeshConnectorMetadata, LoadStats, skip_null_blocks
from kvmesh.kv_store.client import StoreError
from kvmesh.kv_store.keys import chain_hashes

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvmesh.connector")


@dataclass
class _RequestState:
    """Scheduler-side bookkeeping of one request, dropped when it finishes."""

    hashes: list[bytes]
    block_ids: list[int] = field(default_factory=list)
    load: tuple[int, int] | None = None  # (first block, number of blocks) to load
    shard_heads: int = 0                  # the shard size the load reads
    load_pending: bool = False
    saved_blocks: int = 0                 # leading blocks already in the store or sent
    matched: tuple[int, int] = (0, 0)     # (local computed tokens, store tokens) last seen
    tokens_from_store: int = 0
    tokens_load_failed: int = 0
    load_stats: LoadStats | None = None
    lookup_s: float = 0.0                 # time spent asking the store


class ConnectorScheduler:
    def __init__(self, settings: ConnectorSettings):
        self.store = settings.store_client()
        self.block_size = settings.block_size
        self.can_save = settings.can_save
        self.can_load = settings.can_load
        self._own_size = settings.heads_per_rank
        self._splits = {size: settings.split_spaces(size) for size in settings.lookup_sizes()}
        self._all_layers = list(range(settings.num_layers))
        self._requests: dict[str, _RequestState] = {}
        self._finished_saves: list[BlockTransfer] = []

    def _groups(self, hashes: list[bytes], size: int) -> list[list[bytes]]:
        """Per block, every key a full load from shards of ``size`` heads needs: all layers
        of all shards (together every KV head, which the reading ranks need between them)."""
        return [[k for space in self._splits[size] for k in space.block_group(h, self._all_layers)]
                for h in hashes]

    def _lookup(self, hashes: list[bytes]) -> tuple[int, int]:
        """(leading blocks held, their shard size): this engine's own split first, then the
        others, until one holds every block; the longest prefix wins."""
        best = (0, self._own_size)
        for size in self._splits:
            hits = self.store.lookup(self._groups(hashes, size))
            if hits > best[0]:
                best = (hits, size)
            if hits == len(hashes):
                break
        return best

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
        # Blocks vLLM's own prefix cache holds were computed (and saved) here before.
        state.saved_blocks = max(state.saved_blocks, num_computed_tokens // self.block_size)
        if not self.can_load or not state.hashes:
            return 0, False
        # At least one prompt token must be left for the engine to compute.
        loadable = min(len(state.hashes), (request.num_prompt_tokens - 1) // self.block_size)
        first = num_computed_tokens // self.block_size
        if loadable <= first:
            return 0, False
        started = time.monotonic()
        try:
            hits, state.shard_heads = self._lookup(state.hashes[first:loadable])
        except StoreError as e:
            log.warning("store lookup failed, computing locally: %s", e)
            return 0, False
        finally:
            state.lookup_s += time.monotonic() - started
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
        meta = KvmeshConnectorMetadata(finished_saves=self._finished_saves)
        self._finished_saves = []
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
            load = skip_null_blocks(BlockTransfer(req_id, state.block_ids[first:first + count],
                                                  state.hashes[first:first + count],
                                                  shard_heads=state.shard_heads))
            if load is not None:
                meta.loads.append(load)
            state.load_pending = False
        if self.can_save:
            full = min(len(state.hashes), computed_after_step // self.block_size,
                       len(state.block_ids))
            if full > state.saved_blocks:
                first = state.saved_blocks
                save = skip_null_blocks(BlockTransfer(req_id, state.block_ids[first:full],
                                                      state.hashes[first:full],
                                                      state.hashes[first - 1] if first else None))
                if save is not None:
                    meta.saves.append(save)
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
                "tokens_load_failed": state.tokens_load_failed, "lookup_s": state.lookup_s}
        if state.load_stats is not None:
            info.update(state.load_stats._asdict())
            info["load_path_s"] = state.lookup_s + state.load_stats.placed_s
        save = self._save_at_finish(request, state, block_ids)
        info["tokens_saved_at_finish"] = len(save.hashes) * self.block_size if save else 0
        if save is None:
            return False, {"kvmesh": info}
        self._finished_saves.append(save)
        return True, {"kvmesh": info}

    def _save_at_finish(self, request: "Request", state: _RequestState,
                        block_ids: list[int]) -> BlockTransfer | None:
        """The full blocks ``request`` computed that are not in the store yet (its
        generated tokens'), or None. Only tokens whose KV was computed count: the last
        sampled token never went through the model."""
        if not self.can_save:
            return None
        tokens = list(request.all_token_ids)[:request.num_computed_tokens]
        if len(tokens) // self.block_size <= state.saved_blocks:
            return None
        hashes = chain_hashes(tokens, self.block_size, getattr(request, "cache_salt", None))
        full = min(len(hashes), len(block_ids))
        first = state.saved_blocks
        if full <= first:
            return None
        return skip_null_blocks(BlockTransfer(request.request_id, list(block_ids[first:full]),
                                              hashes[first:full], hashes[first - 1] if first else None))

    def shutdown(self) -> None:
        self.store.close()
