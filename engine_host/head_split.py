"""How a model's KV heads split over tensor-parallel ranks, for keys and re-slicing.

vLLM gives tensor-parallel rank ``r`` of ``t`` ranks the KV heads of a model with ``H``
of them as follows (``QKVParallelLinear``): with ``t <= H`` (``t`` divides ``H``), the
aligned range ``[r*H/t, (r+1)*H/t)``; with ``t > H`` (``H`` divides ``t``), every head
is replicated on ``t/H`` consecutive ranks, rank ``r`` holding head ``r // (t/H)``.

kvmesh stores each rank's KV under the keys of its own head range (its **shard**), so
every shard a writer with ``t`` ranks stores is an aligned range of ``max(1, H/t)`` heads:
the **shard size** of that split. A replicated head is written by the first rank of its
replicas only, so it is stored once.

A reader with another split finds its heads in the shards of any shard size ``s``
(a divisor of ``H``): ``covering`` lists, for its own range, each shard of size ``s``
it overlaps and the part of it the reader takes. One shard covers a reader with fewer
heads (it takes a slice); several cover one with more (it gathers them).
"""

from __future__ import annotations

from typing import NamedTuple


class Part(NamedTuple):
    """One shard a reader needs: the shard's head range and, inside it, the heads taken
    (``lo``, ``hi``: offsets from the shard's first head)."""

    shard: tuple[int, int]
    lo: int
    hi: int


def check_split(total_heads: int, tp: int) -> None:
    """Raises ``ValueError`` where vLLM could not split ``total_heads`` over ``tp`` ranks."""
    if total_heads <= 0 or tp <= 0:
        raise ValueError(f"heads ({total_heads}) and ranks ({tp}) must be positive")
    if total_heads % tp and tp % total_heads:
        raise ValueError(f"{total_heads} KV heads cannot split over {tp} tensor-parallel ranks")


def shard_size(total_heads: int, tp: int) -> int:
    """Heads per shard of a ``tp``-rank split."""
    check_split(total_heads, tp)
    return max(1, total_heads // tp)


def rank_heads(rank: int, tp: int, total_heads: int) -> tuple[int, int]:
    """The KV-head range tensor-parallel ``rank`` of ``tp`` holds (vLLM's assignment)."""
    check_split(total_heads, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} out of {tp}")
    if tp <= total_heads:
        size = total_heads // tp
        return rank * size, (rank + 1) * size
    head = rank // (tp // total_heads)
    return head, head + 1


def rank_writes(rank: int, tp: int, total_heads: int) -> bool:
    """Whether ``rank`` stores its shard: every rank does but a replica of a head that a
    lower rank holds too (a replicated head is stored once)."""
    check_split(total_heads, tp)
    return tp <= total_heads or rank % (tp // total_heads) == 0


def shards(total_heads: int, size: int) -> list[tuple[int, int]]:
    """Every shard of shard size ``size``, in head order."""
    if size <= 0 or total_heads % size:
        raise ValueError(f"shard size {size} does not divide {total_heads} KV heads")
    return [(start, start + size) for start in range(0, total_heads, size)]


def shard_sizes(total_heads: int, own: int) -> list[int]:
    """The shard sizes some split could have written (the divisors of ``total_heads``),
    ``own`` first, then the others from the largest (fewest keys per block) down."""
    sizes = [s for s in range(total_heads, 0, -1) if total_heads % s == 0]
    return [own, *(s for s in sizes if s != own)]


def covering(heads: tuple[int, int], size: int) -> list[Part]:
    """The shards of size ``size`` that hold the heads ``heads``, in head order, and the
    part of each taken: concatenated along the head axis they make exactly ``heads``."""
    start, end = heads
    if size <= 0 or not 0 <= start < end:
        raise ValueError(f"bad head range {heads} or shard size {size}")
    parts = []
    for first in range(start // size * size, end, size):
        lo, hi = max(start, first), min(end, first + size)
        parts.append(Part((first, first + size), lo - first, hi - first))
    return parts
