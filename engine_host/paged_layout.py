"""Reading and writing whole blocks of vLLM's paged KV cache tensors.

vLLM's per-layer cache tensor has one dimension indexed by block id; where it sits
depends on the attention backend (the CPU backend uses
``[num_blocks, kv_heads, block_size, 2*head_dim]``, flash-attention
``[2, num_blocks, block_size, kv_heads, head_dim]``). Inside a block the bytes can be
packed in a kernel-specific way, so kvmesh always copies *whole* blocks, never token rows.
``PagedCaches`` is the engine's cache as vLLM registers it with the connector, which both
of the connector's worker-side halves (loads and saves) read.

**Layout contract per device, for re-slicing by KV head.** A block as stored (``read_blocks``)
is the cache's slice at one block id, the block dimension removed, in the cache's
dimension order. A tensor-parallel rank's block holds its own KV heads only; a reader of
another split rebuilds its block from the writers' shards along the block's **head axis**
(``head_axis``, ``gather_heads``), and needs nothing else of the packing:

* CPU (vLLM's ``CPU_ATTN``, layout ``LBHNC``): a block is ``[kv_heads, block_size,
  2*head_dim]``, head-major; the kernels pack K within each head's rows by instruction
  set (part of the keys' namespace), never across heads. The head axis is the block's
  first, so a head range is one contiguous byte range and gathering is concatenation.
* CUDA, flash-attention (``NHD``): a block is ``[2, block_size, kv_heads, head_dim]``
  (K and V, then tokens); the head axis is the third, so each head range is strided
  (``2*block_size`` runs of ``heads*head_dim`` elements), gathered by a strided copy.
* Any other layout is not re-sliced: ``head_axis`` raises ``ValueError`` and a load from
  another split's shards counts as a miss (the engine recomputes), while a load of the
  rank's own shards is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from typing import Sequence

import numpy as np
import torch


def block_dim(cache: torch.Tensor, num_blocks: int) -> int:
    """The dimension of ``cache`` indexed by block id."""
    for dim, size in enumerate(cache.shape):
        if size == num_blocks:
            return dim
    raise ValueError(f"no dimension of size {num_blocks} in KV cache of shape {tuple(cache.shape)}")


def read_blocks(cache: torch.Tensor, dim: int, block_ids: Sequence[int]) -> list[bytes]:
    """Copy the given blocks out of ``cache``: one ``bytes`` per block, in order."""
    if not block_ids:
        return []
    ids = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
    picked = cache.index_select(dim, ids).movedim(dim, 0).contiguous().cpu()
    raw = picked.view(torch.uint8).reshape(len(block_ids), -1)
    return [row.numpy().tobytes() for row in raw]


def block_nbytes(cache: torch.Tensor, dim: int) -> int:
    return cache.numel() // cache.shape[dim] * cache.element_size()


def _runs(block_ids: Sequence[int], starts: Sequence[int], step: int) -> list[tuple[int, int, int]]:
    """``(first block id, first start, count)`` per run of consecutive block ids whose
    ``starts`` follow one another by ``step``."""
    runs = []
    i, n = 0, len(block_ids)
    while i < n:
        j = i + 1
        while j < n and block_ids[j] == block_ids[j - 1] + 1 and starts[j] == starts[j - 1] + step:
            j += 1
        runs.append((block_ids[i], starts[i], j - i))
        i = j
    return runs


def _plain(cache: torch.Tensor, dim: int) -> bool:
    """Whether blocks of ``cache`` are copied as plain memory on this thread, through numpy
    views (a copy per block costs about a microsecond; torch splits a large copy over its
    threads, which on a busy CPU, a loader thread beside them, took 40 times as long)."""
    return cache.device.type == "cpu" and dim == 0 and cache.is_contiguous()


def place_at(cache: torch.Tensor, dim: int, block_ids: Sequence[int], data, offsets: Sequence[int]) -> None:
    """Copy the whole block at byte offset ``offsets[i]`` of the buffer ``data`` (as
    ``read_blocks`` lays a block out) into block ``block_ids[i]`` of ``cache``: one copy
    per run of consecutive block ids whose bytes follow one another in ``data``, straight
    from ``data``'s memory, which may be read-only (a mapped store arena). Every block
    must lie within ``data`` (``ValueError`` otherwise, before anything is copied)."""
    if not block_ids:
        return
    nbytes = block_nbytes(cache, dim)
    raw = np.frombuffer(data, dtype=np.uint8)
    if min(offsets) < 0 or max(offsets) + nbytes > raw.size:
        raise ValueError(f"a block at offsets {min(offsets)}..{max(offsets)} goes past a "
                         f"{raw.size}-byte buffer")
    runs = _runs(block_ids, offsets, nbytes)
    if _plain(cache, dim):
        dst = cache.view(torch.uint8).numpy().reshape(cache.shape[0], -1)
        for block, at, count in runs:
            dst[block:block + count] = raw[at:at + count * nbytes].reshape(count, nbytes)
        return
    shape = [n for d, n in enumerate(cache.shape) if d != dim]
    with warnings.catch_warnings():  # read-only memory is only read here
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(raw)
    for block, at, count in runs:
        run = src[at:at + count * nbytes].view(cache.dtype).reshape(count, *shape).movedim(0, dim)
        cache.narrow(dim, block, count).copy_(run)  # across devices too


def write_blocks(cache: torch.Tensor, dim: int, block_ids: Sequence[int],
                 blocks: Sequence[bytes]) -> None:
    """Copy ``blocks`` (as produced by ``read_blocks`` for the same layout) into ``cache``.

    Raises ``ValueError`` if a block has the wrong size; nothing is written then.
    """
    if not block_ids:
        return
    size = block_nbytes(cache, dim)
    if any(len(b) != size for b in blocks):
        raise ValueError(f"block size mismatch: expected {size} bytes")
    joined = bytearray(size * len(blocks))
    view = memoryview(joined)
    for i, b in enumerate(blocks):
        view[i * size:(i + 1) * size] = b
    place_at(cache, dim, block_ids, joined, range(0, size * len(blocks), size))


def head_axis(cache: torch.Tensor, dim: int, kv_heads: int) -> int:
    """The axis of a block (``cache`` without its block dimension ``dim``) that indexes KV
    heads, by the device's layout (above); ``ValueError`` when the layout is not one of
    those or that axis is not ``kv_heads`` long."""
    block_shape = [n for d, n in enumerate(cache.shape) if d != dim]
    if cache.device.type == "cpu" and len(block_shape) == 3:
        axis = 0                      # [kv_heads, block_size, 2*head_dim]
    elif cache.device.type == "cuda" and len(block_shape) == 4 and dim == 1:
        axis = 2                      # [2, block_size, kv_heads, head_dim]
    else:
        raise ValueError(f"no known head axis in a {cache.device.type} KV cache of shape {tuple(cache.shape)}")
    if block_shape[axis] != kv_heads:
        raise ValueError(f"KV cache of shape {tuple(cache.shape)}: axis {axis} of a block is not "
                         f"{kv_heads} heads")
    return axis


def gather_heads(cache: torch.Tensor, dim: int, axis: int, shard_heads: int, pieces) -> torch.Tensor:
    """One block of ``cache``'s layout built from shards of ``shard_heads`` heads each:
    ``pieces`` is ``(bytes, part)`` per shard in head order (``head_split.covering``), the
    bytes a whole shard's block (as ``read_blocks`` makes them, at ``shard_heads``), the
    part the heads taken. Returns a new tensor of the block's shape, on the CPU;
    ``ValueError`` when a shard's bytes are not of that size."""
    shape = [n for d, n in enumerate(cache.shape) if d != dim]
    shape[axis] = shard_heads
    expected = cache.element_size()
    for n in shape:
        expected *= n
    taken = []
    for data, part in pieces:
        raw = torch.frombuffer(data, dtype=torch.uint8)
        if raw.numel() != expected:
            raise ValueError(f"a shard block of {raw.numel()} bytes, expected {expected}")
        taken.append(raw.view(cache.dtype).reshape(shape).narrow(axis, part.lo, part.hi - part.lo))
    return torch.cat(taken, dim=axis)


def place_heads(cache: torch.Tensor, dim: int, axis: int, block_ids: Sequence[int], shards: torch.Tensor,
                picked: Sequence[int], lo: int, hi: int, at: int) -> None:
    """Copy heads ``[lo, hi)`` of rows ``picked`` of ``shards`` (whole shard blocks, a row
    each, the head axis ``axis`` of a block) into heads ``[at, at + hi - lo)`` of blocks
    ``block_ids`` of ``cache``: one copy for all the blocks. The CPU layout's head range is
    a contiguous byte range of each block, copied with numpy on this thread (as
    ``place_at`` does); others by torch, across devices too."""
    n = hi - lo
    if _plain(cache, dim) and axis == 0:
        dst = cache.view(torch.uint8).numpy().reshape(cache.shape[0], -1)
        src = shards.view(torch.uint8).numpy().reshape(shards.shape[0], -1)
        per_head = src.shape[1] // shards.shape[1]
        dst[list(block_ids), at * per_head:(at + n) * per_head] = src[list(picked), lo * per_head:hi * per_head]
        return
    rows = torch.tensor(list(picked), dtype=torch.long)
    ids = torch.tensor(list(block_ids), dtype=torch.long, device=cache.device)
    src = shards.index_select(0, rows).narrow(axis + 1, lo, n).movedim(0, dim).to(cache.device)
    cache_axis = axis if axis < dim else axis + 1
    cache.narrow(cache_axis, at, n).index_copy_(dim, ids, src)


@dataclass
class PagedCaches:
    """The paged KV cache of one model runner, layer by layer: each layer's tensor, its
    id (``engine_host.kv_groups.layer_id``: its index in the model; a draft model's layers
    after the target's), the tensor's block dimension and its KV-cache group (each group
    has block tables of its own; under vLLM's hybrid allocator layers of different groups
    share one tensor, each group using the blocks it was given). Filled by ``register``."""

    num_blocks: int = 0  # from the engine's KV-cache config; 0: each tensor's first dimension
    groups: dict[str, int] = field(default_factory=dict)  # layer name -> group (absent: 0)
    ids: dict[str, int] = field(default_factory=dict)     # layer name -> layer id (absent: its index)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)
    block_dims: dict[str, int] = field(default_factory=dict)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take vLLM's per-layer cache tensors (``register_kv_caches``)."""
        from vllm.model_executor.models.utils import extract_layer_index

        for name, cache in kv_caches.items():
            self.tensors[name] = cache
            self.layers[name] = self.ids[name] if name in self.ids else extract_layer_index(name)
            self.block_dims[name] = block_dim(cache, self.num_blocks or cache.shape[0])
