"""Loads across tensor-parallel splits from a real store server (gRPC, shared memory):
blocks a writer of one split stored are read by ranks of another, and the scheduler
side's lookup counts a block only when every shard the reading ranks need is there.

The paged caches are plain CPU tensors of vLLM's CPU layout (``[blocks, kv_heads, tokens,
2*head_dim]``), each rank's holding its own heads of one full-model cache.
"""

from __future__ import annotations

import concurrent.futures as cf
import uuid
from typing import NamedTuple

import pytest
import torch

from kvmesh.decode_workers.layer_loader import LayerLoad, ReaderCache
from kvmesh.engine_host import head_split
from kvmesh.engine_host.connector_settings import ConnectorSettings
from kvmesh.engine_host.paged_layout import gather_heads, place_heads, read_blocks
from kvmesh.engine_host.scheduler import ConnectorScheduler
from kvmesh.kv_store.client import StoreClient
from kvmesh.kv_store.keys import KeySpace, chain_hashes, namespace
from kvmesh.kv_store.server import start_store_server
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.tiers import HostTier
from kvmesh.kv_store.transfer import open_source

HEADS, LAYERS, NUM_BLOCKS, TOKENS, CHANNELS = 4, 2, 16, 4, 8
NS = namespace("test-model", "cpu|bf16")
NAMES = {f"model.layers.{i}.self_attn.attn": i for i in range(LAYERS)}


class Transfer(NamedTuple):
    req_id: str
    block_ids: list[int]
    hashes: list[bytes]
    parent: bytes | None = None
    shard_heads: int = 0


@pytest.fixture(params=["shm", "get"])
def store(request):
    """A store offering shared memory (``shm``) or no transfer backend (plain ``Get``)."""
    shm = {"shm_name": "kvmesh-test-" + uuid.uuid4().hex[:8]} if request.param == "shm" else {}
    tiered = TieredStore([HostTier(8 << 20, page_bytes=1 << 16, **shm)])
    source = open_source("shm", tiered.tiers[0]) if request.param == "shm" else None
    offers = {"shm": source.descriptor()} if source else {}
    server, port = start_store_server("127.0.0.1", 0, tiered, offers=offers)
    with StoreClient(f"127.0.0.1:{port}", timeout_s=5) as client:
        yield request.param, client
    server.stop(0)
    if source:
        source.close()
    tiered.close()


def full_caches() -> dict[str, torch.Tensor]:
    """What a prefill of every head computed, per layer."""
    gen = torch.Generator().manual_seed(3)
    return {n: torch.randn(NUM_BLOCKS, HEADS, TOKENS, CHANNELS, generator=gen).to(torch.bfloat16)
            for n in NAMES}


def write_split(client: StoreClient, full, tp: int, hashes: list[bytes], block_ids: list[int]) -> None:
    """Every writing rank of a ``tp``-rank split puts its shard of ``block_ids``."""
    for rank in range(tp):
        if not head_split.rank_writes(rank, tp, HEADS):
            continue
        start, end = head_split.rank_heads(rank, tp, HEADS)
        space = KeySpace(NS, (start, end))
        for name, layer in NAMES.items():
            data = read_blocks(full[name][:, start:end].contiguous(), 0, block_ids)
            assert client.put([(space.key(h, layer), d) for h, d in zip(hashes, data)]) == len(hashes)


def load_rank(client: StoreClient, rank: int, tp: int, hashes, block_ids, shard_heads: int):
    """Rank ``rank`` of a ``tp``-rank reader loads ``hashes`` into ``block_ids`` from shards
    of ``shard_heads``; returns its caches and the block ids that failed."""
    start, end = head_split.rank_heads(rank, tp, HEADS)
    caches = {n: torch.zeros(NUM_BLOCKS, end - start, TOKENS, CHANNELS, dtype=torch.bfloat16) for n in NAMES}
    executor = cf.ThreadPoolExecutor(1)
    readers = ReaderCache(["shm"])
    try:
        load = LayerLoad(client, readers, KeySpace(NS, (start, end)), NAMES, caches,
                         {n: 0 for n in NAMES}, executor, 5.0)
        load.start([Transfer("r", block_ids, hashes, shard_heads=shard_heads)])
        failed = []
        stats = load.finish(lambda req_id, ids: failed.extend(ids))
    finally:
        executor.shutdown()
        readers.close()
    return caches, failed, stats["r"]


HASHES = chain_hashes(list(range(3 * TOKENS)), TOKENS)
IDS = [3, 4, 7]


@pytest.mark.parametrize("writer_tp,reader_tp", [(2, 1), (1, 2), (4, 2), (2, 4), (1, 4)])
def test_a_rank_of_another_split_loads_exactly_its_heads(store, writer_tp, reader_tp):
    backend, client = store
    full = full_caches()
    write_split(client, full, writer_tp, HASHES, IDS)
    for rank in range(reader_tp):
        caches, failed, stats = load_rank(client, rank, reader_tp, HASHES, IDS,
                                          head_split.shard_size(HEADS, writer_tp))
        assert failed == [] and stats.backend == backend
        start, end = head_split.rank_heads(rank, reader_tp, HEADS)
        for name in NAMES:
            assert torch.equal(caches[name][IDS], full[name][IDS, start:end])
            others = [i for i in range(NUM_BLOCKS) if i not in IDS]
            assert not caches[name][others].any()  # nothing else written


def test_a_missing_shard_fails_its_block_and_every_later_one(store):
    _, client = store
    full = full_caches()
    write_split(client, full, 2, HASHES, IDS)
    assert client.drop([KeySpace(NS, (2, 4)).key(HASHES[1], 1)]) == 1  # rank 1's, block 1, layer 1
    caches, failed, _ = load_rank(client, 0, 1, HASHES, IDS, 2)
    assert failed == IDS[1:]
    for name in NAMES:
        assert torch.equal(caches[name][IDS[0]], full[name][IDS[0]])


def test_the_lookup_finds_another_split_and_stops_at_a_missing_shard(store):
    """The scheduler side of a TP=1 and of a TP=2 reader over blocks a TP=2 writer stored,
    then one shard dropped: the prefix ends at that block, for both."""
    _, client = store
    write_split(client, full_caches(), 2, HASHES, IDS)
    for tp in (1, 2):
        settings = ConnectorSettings(
            store_address=client.address, timeout_s=5, transfer_preference=("shm",), can_load=True,
            can_save=False, block_size=TOKENS, namespace=NS, total_heads=HEADS,
            heads_per_rank=head_split.shard_size(HEADS, tp), tensor_parallel_size=tp, num_layers=LAYERS)
        scheduler = ConnectorScheduler(settings)
        try:
            assert scheduler._lookup(HASHES, 0, len(HASHES)) == (3, 2)
            client.drop([KeySpace(NS, (0, 2)).key(HASHES[2], 0)])
            assert scheduler._lookup(HASHES, 0, len(HASHES)) == (2, 2)
            client.drop([KeySpace(NS, (2, 4)).key(HASHES[0], 1)])
            assert scheduler._lookup(HASHES, 0, len(HASHES))[0] == 0
        finally:
            scheduler.shutdown()
        write_split(client, full_caches(), 2, HASHES, IDS)


def test_the_lookup_takes_the_split_with_the_longest_prefix(store):
    _, client = store
    full = full_caches()
    write_split(client, full, 1, HASHES[:1], IDS[:1])  # TP=1 wrote block 0 only
    write_split(client, full, 2, HASHES, IDS)          # TP=2 all three
    settings = ConnectorSettings(
        store_address=client.address, timeout_s=5, transfer_preference=("shm",), can_load=True,
        can_save=False, block_size=TOKENS, namespace=NS, total_heads=HEADS, heads_per_rank=4,
        tensor_parallel_size=1, num_layers=LAYERS)
    scheduler = ConnectorScheduler(settings)
    try:
        assert scheduler._lookup(HASHES, 0, len(HASHES)) == (3, 2)
        assert scheduler._lookup(HASHES[:1], 0, 1) == (1, 4)  # its own split first
    finally:
        scheduler.shutdown()


def test_gathering_heads_in_the_flash_attention_layout():
    """The CUDA flash-attention block, ``[2, tokens, kv_heads, head_dim]``: heads strided."""
    full = torch.randn(2, NUM_BLOCKS, TOKENS, HEADS, CHANNELS)
    mine = torch.zeros(2, NUM_BLOCKS, TOKENS, 2, CHANNELS)  # a reader of heads 1..3
    shards = [read_blocks(full[:, :, :, s:e].contiguous(), 1, [5])[0] for s, e in head_split.shards(HEADS, 1)]
    parts = head_split.covering((1, 3), 1)
    block = gather_heads(mine, 1, 2, 1, [(bytearray(shards[p.shard[0]]), p) for p in parts])
    assert torch.equal(block, full[:, 5, :, 1:3])


def test_placing_heads_in_the_flash_attention_layout():
    """The same, a part at a time for several blocks (the load's path for a transfer
    backend), through torch's copy: a reader of heads 1..3 from one-head shards."""
    full = torch.randn(2, NUM_BLOCKS, TOKENS, HEADS, CHANNELS)
    mine = torch.zeros(2, NUM_BLOCKS, TOKENS, 2, CHANNELS)
    blocks = [5, 9]
    at = 0
    for part in head_split.covering((1, 3), 1):
        first = part.shard[0]
        rows = full[:, blocks, :, first:first + 1].movedim(1, 0).contiguous()  # a shard block a row
        place_heads(mine, 1, 2, blocks, rows, [0, 1], part.lo, part.hi, at)
        at += part.hi - part.lo
    assert torch.equal(mine[:, blocks], full[:, blocks, :, 1:3])
    assert not mine[:, [b for b in range(NUM_BLOCKS) if b not in blocks]].any()
