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

Each KV-cache group (``engine_host.kv_groups``) moves with its own block table: a
full-attention group every block, a windowed group only the blocks its window still
reads (saved: those a hit of the prompt's full blocks, or one fewer, reads; loaded: those
vLLM did not point at its null block). A lookup reports a hit only as far as every
group can supply it. With several groups or a windowed one, loads run outside the steps
(the lookup says so to vLLM; the worker side reports each request loaded or failed
through ``get_finished``), where a request whose load failed is computed from its first
token (vLLM cannot recompute single blocks of several groups, and a window recomputed
from a failed block would read blocks never loaded) and never looked up again.

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
from typing import TYPE_CHECKING, Any, Sequence

from kvmesh.engine_host.connector_settings import ConnectorSettings
from kvmesh.engine_host.kv_groups import KvGroup, kv_groups
from kvmesh.engine_host.metadata import (
    BlockTransfer, KvmeshConnectorMetadata, LoadStats, session_of, skip_null_blocks,
)
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
    session: str | None = None            # its session's id: its saves and lookups name it
    block_ids: list[list[int]] = field(default_factory=list)  # per KV-cache group
    load: tuple[int, int] | None = None  # (first block, number of blocks) to load
    shard_heads: int = 0                  # the shard size the load reads
    load_pending: bool = False
    load_failed: bool = False             # a load outside the steps failed: compute it all
    saved_blocks: int = 0                 # leading blocks already in the store or sent
    matched: tuple[int, int] = (0, 0)     # (local computed tokens, store tokens) last seen
    tokens_from_store: int = 0
    tokens_load_failed: int = 0
    load_stats: LoadStats | None = None
    lookup_s: float = 0.0                 # time spent asking the store


class ConnectorScheduler:
    """``groups``: the engine's KV-cache groups (``engine_host.kv_groups``; None: one
    full-attention group of every layer). With several, or with a windowed one, loads run
    outside the steps (vLLM's asynchronous loading), where a failed load has vLLM
    recompute the whole request: vLLM cannot recompute single blocks of an engine of
    several groups, and recomputing a window from a failed block on would read the blocks
    before it, which were never loaded."""

    def __init__(self, settings: ConnectorSettings, groups: Sequence[KvGroup] | None = None):
        self.store = settings.store_client()
        self.block_size = settings.block_size
        self.can_save = settings.can_save
        self.can_load = settings.can_load
        self.groups = tuple(groups or kv_groups(None, settings.num_layers))
        self.load_async = len(self.groups) > 1 or any(g.window is not None for g in self.groups)
        self._own_size = settings.heads_per_rank
        self._splits = {size: settings.split_spaces(size) for size in settings.lookup_sizes()}
        self._requests: dict[str, _RequestState] = {}
        self._finished_saves: list[BlockTransfer] = []
        self._async_loads: list[BlockTransfer] = []

    def _keys(self, groups: Sequence[KvGroup], chain_hash: bytes, size: int) -> list[bytes]:
        """Every key of one block in ``groups``' layers, of all shards of ``size`` heads
        (together every KV head, which the reading ranks need between them)."""
        return [k for space in self._splits[size] for g in groups for k in space.block_group(chain_hash, g.layers)]

    def _lookup(self, hashes: list[bytes], first: int, loadable: int,
                session: str | None = None) -> tuple[int, int]:
        """(leading blocks from ``first`` every group can supply, their shard size): this
        engine's own split first, then the others, until one holds every block; the longest
        prefix wins. Raises ``StoreError``."""
        best = (0, self._own_size)
        for size in self._splits:
            hits = self._hits(hashes, first, loadable, session, size)
            if hits > best[0]:
                best = (hits, size)
            if hits == loadable - first:
                break
        return best

    def on_new_request(self, request: "Request") -> None:
        tokens = list(request.prompt_token_ids or [])
        self._requests[request.request_id] = _RequestState(
            hashes=chain_hashes(tokens, self.block_size, getattr(request, "cache_salt", None)),
            session=session_of(request))

    def _state(self, request: "Request") -> _RequestState:
        if request.request_id not in self._requests:
            self.on_new_request(request)
        return self._requests[request.request_id]

    def _hits(self, hashes: list[bytes], first: int, loadable: int, session: str | None = None,
              size: int | None = None) -> int:
        """How many leading blocks (at most ``loadable``, the first ``first`` held already)
        every group can supply in shards of ``size`` heads (None: this engine's own):
        full-attention groups every block from ``first`` on, a windowed group the blocks
        its window still reads when the hit ends. Raises ``StoreError``."""
        size = size or self._own_size
        full = [g for g in self.groups if g.window is None]
        windowed = [g for g in self.groups if g.window is not None]
        end = loadable
        if full:
            end = first + self.store.lookup([self._keys(full, h, size) for h in hashes[first:loadable]], session)
        while windowed and end > first:
            # the window's blocks, last first: how many of them, up to the hit's end, are held
            needed = [(i, [g for g in windowed if i >= g.first_needed(end, self.block_size)])
                      for i in range(end - 1, first - 1, -1)]
            needed = [(i, gs) for i, gs in needed if gs]
            held = self.store.lookup([self._keys(gs, hashes[i], size) for i, gs in needed], session)
            if held == len(needed):
                break
            end = needed[held][0]  # a shorter hit must end before the block missing
        return end - first

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        state = self._state(request)
        state.matched = (num_computed_tokens, 0)
        # Blocks vLLM's own prefix cache holds were computed (and saved) here before.
        state.saved_blocks = max(state.saved_blocks, num_computed_tokens // self.block_size)
        if not self.can_load or not state.hashes or state.load_failed:
            return 0, False
        # At least one prompt token must be left for the engine to compute.
        loadable = min(len(state.hashes), (request.num_prompt_tokens - 1) // self.block_size)
        first = num_computed_tokens // self.block_size
        if loadable <= first:
            return 0, False
        started = time.monotonic()
        try:
            hits, state.shard_heads = self._lookup(state.hashes, first, loadable, state.session)
        except StoreError as e:
            log.warning("store lookup failed, computing locally: %s", e)
            return 0, False
        finally:
            state.lookup_s += time.monotonic() - started
        state.matched = (num_computed_tokens, hits * self.block_size)
        return hits * self.block_size, self.load_async and hits > 0

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
        if self.load_async:  # the request waits for its KV outside the steps
            state.block_ids = [list(ids) for ids in blocks.get_block_ids()]
            self._async_loads.extend(self._loads(request.request_id, state))
            state.load_pending = False

    def _loads(self, req_id: str, state: _RequestState) -> list[BlockTransfer]:
        """The planned load, one transfer per group: the blocks each group reads."""
        first, count = state.load
        end = first + count
        return self._transfers(req_id, state.block_ids, state.hashes,
                               [max(first, g.first_needed(end, self.block_size)) for g in self.groups], end,
                               state.session, state.shard_heads)

    def _transfers(self, req_id: str, block_ids: Sequence[Sequence[int]], hashes: list[bytes],
                   starts: Sequence[int], end: int, session: str | None = None,
                   shard_heads: int = 0) -> list[BlockTransfer]:
        """Per group ``g``, blocks ``starts[g]`` to ``end`` (short of vLLM's null blocks);
        a load's read from shards of ``shard_heads`` heads."""
        out = []
        for g, (ids, start) in enumerate(zip(block_ids, starts)):
            stop = min(end, len(ids), len(hashes))
            if stop <= start:
                continue
            transfer = skip_null_blocks(BlockTransfer(req_id, list(ids[start:stop]), hashes[start:stop],
                                                      hashes[start - 1] if start else None, g, session,
                                                      shard_heads))
            if transfer is not None:
                out.append(transfer)
        return out

    def _saves(self, req_id: str, block_ids: Sequence[Sequence[int]], hashes: list[bytes],
               first: int, full: int, session: str | None = None) -> list[BlockTransfer]:
        """Blocks ``first`` to ``full`` to save, per group: a windowed group only those its
        window reads for a hit of ``full`` or ``full - 1`` blocks (a reader of this very
        prompt leaves its last block to compute)."""
        starts = [max(first, g.first_needed(max(0, full - 1), self.block_size)) for g in self.groups]
        return self._transfers(req_id, block_ids, hashes, starts, full, session)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KvmeshConnectorMetadata:
        meta = KvmeshConnectorMetadata(finished_saves=self._finished_saves, async_loads=self._async_loads)
        self._finished_saves, self._async_loads = [], []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = [list(ids) for ids in new.block_ids]
            self._plan(new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids or not state.block_ids:
                    state.block_ids = [list(ids) for ids in new_ids]
                else:
                    for mine, more in zip(state.block_ids, new_ids):
                        mine.extend(more)
            self._plan(req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), meta)
        return meta

    def _plan(self, req_id: str, state: _RequestState, computed_after_step: int,
              meta: KvmeshConnectorMetadata) -> None:
        if state.load_pending and state.load is not None:
            meta.loads.extend(self._loads(req_id, state))
            state.load_pending = False
        if self.can_save:
            full = min([len(state.hashes), computed_after_step // self.block_size,
                        *(len(ids) for ids in state.block_ids)])
            if full > state.saved_blocks:
                meta.saves.extend(self._saves(req_id, state.block_ids, state.hashes, state.saved_blocks, full,
                                              state.session))
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
            if self.load_async and state.load is not None:
                # vLLM computes the whole request again: every loaded token; never look it up again
                state.load_failed = True
                n = state.load[1] * self.block_size
            state.tokens_load_failed += n
            if state.load is not None:  # recomputed blocks get saved again, replacing bad ones
                first, count = state.load
                state.saved_blocks = min(state.saved_blocks, first + count - n // self.block_size)

    def request_finished(self, request: "Request",
                         block_ids: Sequence[Sequence[int]]) -> tuple[bool, dict[str, Any] | None]:
        """``block_ids``: the request's blocks, one list per group."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        info = {"tokens_from_store": state.tokens_from_store,
                "tokens_load_failed": state.tokens_load_failed, "lookup_s": state.lookup_s}
        if state.load_stats is not None:
            info.update(state.load_stats._asdict())
            info["load_path_s"] = state.lookup_s + state.load_stats.placed_s
        saves, info["tokens_saved_at_finish"] = self._save_at_finish(request, state, block_ids)
        if not saves:
            return False, {"kvmesh": info}
        self._finished_saves.extend(saves)
        return True, {"kvmesh": info}

    def _save_at_finish(self, request: "Request", state: _RequestState,
                        block_ids: Sequence[Sequence[int]]) -> tuple[list[BlockTransfer], int]:
        """The full blocks ``request`` computed that are not in the store yet (its
        generated tokens'), per group, and how many tokens they hold. Only tokens whose KV
        was computed count: the last sampled token never went through the model."""
        if not self.can_save:
            return [], 0
        tokens = list(request.all_token_ids)[:request.num_computed_tokens]
        if len(tokens) // self.block_size <= state.saved_blocks:
            return [], 0
        hashes = chain_hashes(tokens, self.block_size, getattr(request, "cache_salt", None))
        full = min([len(hashes), *(len(ids) for ids in block_ids)])
        first = state.saved_blocks
        if full <= first:
            return [], 0
        return (self._saves(request.request_id, block_ids, hashes, first, full, state.session),
                (full - first) * self.block_size)

    def shutdown(self) -> None:
        self.store.close()
