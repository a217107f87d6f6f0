"""Reading and writing whole blocks of vLLM's paged KV cache tensors.

vLLM's per-layer cache tensor has one dimension indexed by block id; where it sits
depends on the attention backend (the CPU backend uses
``[num_blocks, kv_heads, block_size, 2*head_dim]``, flash-attention
``[2, num_blocks, block_size, kv_heads, head_dim]``). Inside a block the bytes can be
packed in a kernel-specific way, so kvmesh always copies *whole* blocks, never token rows.
``PagedCaches`` is the engine's cache as vLLM registers it with the connector, which both
of the connector's worker-side halves (loads and saves) read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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
    shape = list(cache.shape)
    del shape[dim]
    src = torch.frombuffer(bytearray(b"".join(blocks)), dtype=torch.uint8)
    src = src.view(cache.dtype).reshape(len(blocks), *shape).movedim(0, dim)
    ids = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
    cache.index_copy_(dim, ids, src.to(cache.device))


@dataclass
class PagedCaches:
    """The paged KV cache of one model runner, layer by layer: each layer's tensor, its
    index in the model and the tensor's block dimension. Filled by ``register``."""

    num_blocks: int = 0  # from the engine's KV-cache config; 0: each tensor's first dimension
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)
    block_dims: dict[str, int] = field(default_factory=dict)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take vLLM's per-layer cache tensors (``register_kv_caches``)."""
        from vllm.model_executor.models.utils import extract_layer_index

        for name, cache in kv_caches.items():
            self.tensors[name] = cache
            self.layers[name] = extract_layer_index(name)
            self.block_dims[name] = block_dim(cache, self.num_blocks or cache.shape[0])
