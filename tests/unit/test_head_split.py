"""How KV heads split over tensor-parallel ranks (``engine_host.head_split``)."""

import pytest

from kvmesh.engine_host import head_split
from kvmesh.engine_host.head_split import Part


def test_ranks_hold_vllm_s_head_ranges():
    assert [head_split.rank_heads(r, 2, 4) for r in range(2)] == [(0, 2), (2, 4)]
    assert [head_split.rank_heads(r, 1, 4) for r in range(1)] == [(0, 4)]
    # more ranks than heads: each head on t/H consecutive ranks (vLLM: rank // replicas)
    assert [head_split.rank_heads(r, 4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [head_split.rank_heads(r, 2, 1) for r in range(2)] == [(0, 1), (0, 1)]


def test_a_replicated_head_is_written_by_one_rank():
    assert [head_split.rank_writes(r, 4, 2) for r in range(4)] == [True, False, True, False]
    assert [head_split.rank_writes(r, 2, 1) for r in range(2)] == [True, False]
    assert all(head_split.rank_writes(r, 2, 4) for r in range(2))


def test_impossible_splits_are_refused():
    with pytest.raises(ValueError, match="cannot split"):
        head_split.rank_heads(0, 3, 4)
    with pytest.raises(ValueError):
        head_split.shards(4, 3)


def test_lookup_tries_the_own_shard_size_first_then_the_largest():
    assert head_split.shard_sizes(4, 2) == [2, 4, 1]
    assert head_split.shard_sizes(4, 4) == [4, 2, 1]
    assert head_split.shard_sizes(1, 1) == [1]
    assert head_split.shards(4, 2) == [(0, 2), (2, 4)]


@pytest.mark.parametrize("heads,size,parts", [
    ((0, 4), 2, [Part((0, 2), 0, 2), Part((2, 4), 0, 2)]),  # gather two shards
    ((2, 4), 4, [Part((0, 4), 2, 4)]),                      # slice one
    ((0, 2), 2, [Part((0, 2), 0, 2)]),                      # the same split
    ((4, 8), 3, [Part((3, 6), 1, 3), Part((6, 9), 0, 2)]),  # unaligned: parts of two
])
def test_covering_parts_make_exactly_the_reader_s_heads(heads, size, parts):
    got = head_split.covering(heads, size)
    assert got == parts
    taken = [h for p in got for h in range(p.shard[0] + p.lo, p.shard[0] + p.hi)]
    assert taken == list(range(*heads))
