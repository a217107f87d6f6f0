"""What the connector's two sides tell each other, once per engine step.

vLLM carries both across processes (pickled): ``KvmeshConnectorMetadata`` from the
scheduler side to the workers (the blocks to load and to save this step), and
``KvmeshWorkerMetadata`` back (prompt tokens whose load failed, and how the loaded KV
came in).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class BlockTransfer:
    """Blocks of one request to move this step: paged block ids and their chain hashes, for
    the layers of one KV-cache group (``engine_host.kv_groups``; a request's block ids
    differ from group to group)."""

    req_id: str
    block_ids: list[int]
    hashes: list[bytes]
    parent: bytes | None = None  # chain hash of the block before ``hashes[0]``
    group: int = 0               # index of the KV-cache group whose layers move
    session: str | None = None   # id of the request's session (``kv_store.sessions``), if any
    # a load's: the shard size (``engine_host.head_split``) the blocks are stored in;
    # 0: each rank's own shards
    shard_heads: int = 0


# The key of a request's ``kv_transfer_params`` (vLLM's sampling ``extra_args``) that names
# its session id: the worker sets it, the connector's scheduler side reads it.
SESSION_PARAM = "kvmesh_session"


def session_of(request) -> str | None:
    """The session id a vLLM request carries, or None."""
    return (getattr(request, "kv_transfer_params", None) or {}).get(SESSION_PARAM) or None


# vLLM's block pool hands out its first block, id 0, as the null block, and a sliding-window
# KV-cache group points the blocks that left the window at it (they are never read again).
NULL_BLOCK_ID = 0


def skip_null_blocks(transfer: BlockTransfer) -> BlockTransfer | None:
    """``transfer`` without its leading null blocks (a window's blocks that left it: nothing
    to save, nothing to load), its ``parent`` the hash before the first block kept; None
    when no block is left."""
    skip = 0
    while skip < len(transfer.block_ids) and transfer.block_ids[skip] == NULL_BLOCK_ID:
        skip += 1
    if skip == len(transfer.block_ids):
        return None
    if skip == 0:
        return transfer
    return replace(transfer, block_ids=transfer.block_ids[skip:], hashes=transfer.hashes[skip:],
                   parent=transfer.hashes[skip - 1])


@dataclass
class KvmeshConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    # Loads of requests waiting for their KV outside the steps (an engine of several
    # KV-cache groups, where vLLM can recompute only a whole request whose load failed):
    # the worker side reports each request done through ``get_finished``.
    async_loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)
    # Blocks of requests that finished (their generated tokens' full blocks, and any
    # computed block not saved yet), to save before vLLM frees them: vLLM keeps them
    # until the worker reports the request in ``get_finished``.
    finished_saves: list[BlockTransfer] = field(default_factory=list)


class LoadStats(NamedTuple):
    """Per request: how its KV came in (figures of the step's whole load, which is one
    request's unless several requests load in the same step).

    ``transfer_s`` and ``placed_s`` start at the lease (the ``Locate`` call, included);
    ``transfer_s`` ends when the loader thread has read and verified the last layer's
    bytes, ``placed_s`` when the last block is copied into the paged cache. Under
    layer-wise loading ``placed_s`` spans the forward pass up to the last layer's
    attention; with ``layerwise`` off it is the load alone. ``locate_s``, ``read_s``,
    ``verify_s`` and ``copy_s`` are the time spent in each part (summed over layers)."""

    backend: str          # "shm", "nixl", "grpc" (transfer) or "get" (plain store API)
    nbytes: int
    transfer_s: float     # from the lease to the last layer's bytes, verified
    wait_s: float         # of that, time the forward pass waited for bytes
    placed_s: float = 0.0  # from the lease to the last block in the paged cache
    locate_s: float = 0.0  # the Locate call (the lease)
    read_s: float = 0.0    # the transfer backend's reads (or the Get calls)
    verify_s: float = 0.0  # checksums
    copy_s: float = 0.0    # copies into the paged cache


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
