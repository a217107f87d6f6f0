"""Whole blocks in and out of paged KV cache tensors (``engine_host.paged_layout``), for
the block dimension first (vLLM's CPU layout) and second (flash attention's)."""

from __future__ import annotations

import pytest
import torch

from kvmesh.engine_host.paged_layout import place_at, read_blocks, write_blocks

NUM_BLOCKS = 12


def caches(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = [NUM_BLOCKS, 2, 4, 8] if dim == 0 else [2, NUM_BLOCKS, 4, 8]
    torch.manual_seed(dim)
    return torch.randn(shape).to(torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)


@pytest.mark.parametrize("dim", [0, 1])
def test_blocks_land_from_their_offsets_in_a_read_only_buffer(dim):
    """Blocks at scattered byte offsets of a read-only buffer (a mapped arena), some
    adjacent, go to block ids with gaps: each block gets its own bytes, no other block
    is touched, and an offset past the buffer is refused before anything is copied."""
    source, cache = caches(dim)
    size = len(read_blocks(source, dim, [0])[0])
    arena = bytearray(10 * size + 6)
    stored = {1: 6, 2: 6 + size, 3: 6 + 2 * size, 7: 4 * size, 8: 9 * size}  # block -> offset
    for block, offset in stored.items():
        arena[offset:offset + size] = read_blocks(source, dim, [block])[0]
    data = memoryview(bytes(arena))  # read-only
    targets = [4, 5, 6, 9, 2]
    offsets = [stored[1], stored[2], stored[3], stored[8], stored[7]]
    place_at(cache, dim, targets, data, offsets)
    for target, block in zip(targets, [1, 2, 3, 8, 7]):
        assert torch.equal(cache.select(dim, target), source.select(dim, block))
    untouched = [b for b in range(NUM_BLOCKS) if b not in targets]
    assert not cache.index_select(dim, torch.tensor(untouched)).any()
    before = cache.clone()
    with pytest.raises(ValueError, match="goes past"):
        place_at(cache, dim, [0, 1], data, [0, len(data) - size + 1])
    assert torch.equal(cache, before)


@pytest.mark.parametrize("dim", [0, 1])
def test_write_blocks_round_trips_read_blocks(dim):
    source, cache = caches(dim)
    write_blocks(cache, dim, [5, 3], read_blocks(source, dim, [0, 1]))
    assert torch.equal(cache.select(dim, 5), source.select(dim, 0))
    assert torch.equal(cache.select(dim, 3), source.select(dim, 1))
    with pytest.raises(ValueError, match="block size mismatch"):
        write_blocks(cache, dim, [1], [b"short"])
