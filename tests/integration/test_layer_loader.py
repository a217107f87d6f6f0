"""One step's KV loads (``decode_workers.layer_loader``) from a real store server, over NIXL.

The paged KV cache is a plain CPU tensor of the layout vLLM's CPU backend uses per
layer; the store, its gRPC API and the NIXL transfer are the real ones.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import NamedTuple

import pytest
import torch

from kvmesh.decode_workers.layer_loader import LayerLoad, ReaderCache
from kvmesh.engine_host.paged_layout import read_blocks
from kvmesh.kv_store.client import StoreClient
from kvmesh.kv_store.keys import KeySpace, namespace
from kvmesh.kv_store.server import start_store_server
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.tiers import HostTier
from kvmesh.kv_store.transfer import TransferError, open_source

LAYERS, NUM_BLOCKS, BLOCK_SHAPE = 2, 64, (2, 4, 16)  # per block: K/V x tokens x head dims


class Transfer(NamedTuple):
    req_id: str
    block_ids: list[int]
    hashes: list[bytes]


@pytest.fixture
def nixl_store():
    store = TieredStore([HostTier(8 << 20, page_bytes=1 << 16)])
    try:
        source = open_source("nixl", store.tiers[0])
    except TransferError as e:
        store.close()
        pytest.fail(f"NIXL is not usable here: {e}", pytrace=False)
    server, port = start_store_server("127.0.0.1", 0, store, offers={"nixl": source.descriptor()})
    with StoreClient(f"127.0.0.1:{port}", timeout_s=5) as client:
        yield client
    server.stop(0)
    source.close()
    store.close()


def test_loads_of_any_size_land_in_one_kept_registered_buffer(nixl_store):
    """Loads of 1 to 24 blocks, one after another: each lands whole in the cache, and the
    NIXL reader holds one registration, of the buffer in use, not one per freed buffer."""
    space = KeySpace(namespace("test-model", "cpu|f32"), (0, 1))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    layers = {name: i for i, name in enumerate(names)}
    source = {n: torch.randn(NUM_BLOCKS, *BLOCK_SHAPE) for n in names}  # what a prefill computed
    caches = {n: torch.zeros(NUM_BLOCKS, *BLOCK_SHAPE) for n in names}
    readers = ReaderCache(["nixl"])
    executor = cf.ThreadPoolExecutor(1)
    try:
        for step, count in enumerate([1, 24, 3, 16, 2, 24, 5]):
            ids = list(range(count))
            hashes = [b"step%d-block%d" % (step, i) for i in ids]
            for name in names:
                data = read_blocks(source[name], 0, ids)
                assert nixl_store.put([(space.key(h, layers[name]), d) for h, d in zip(hashes, data)]) == count
            load = LayerLoad(nixl_store, readers, space, layers, caches, {n: 0 for n in names}, executor, 5.0)
            load.start([Transfer("r", ids, hashes)])
            failed = []
            stats = load.finish(lambda req_id, blocks: failed.append(blocks))
            assert failed == [] and stats["r"].backend == "nixl"
            for name in names:
                assert torch.equal(caches[name][:count], source[name][:count])
                caches[name].zero_()
            reader = next(iter(readers._readers.values()))
            assert reader.stats()["registered"] == 1
            nixl_store.drop()
    finally:
        executor.shutdown()
        readers.close()


@pytest.fixture
def shm_store():
    import uuid

    store = TieredStore([HostTier(8 << 20, page_bytes=1 << 16, shm_name="kvmesh-test-" + uuid.uuid4().hex[:8])])
    source = open_source("shm", store.tiers[0])
    server, port = start_store_server("127.0.0.1", 0, store, offers={"shm": source.descriptor()})
    with StoreClient(f"127.0.0.1:{port}", timeout_s=5) as client:
        yield store, client
    server.stop(0)
    source.close()
    store.close()


@pytest.mark.parametrize("everything_first", [False, True])
def test_blocks_land_in_place_and_bad_ones_are_reported(shm_store, everything_first):
    """Two requests over shared memory, into scattered paged blocks, one layer at a time
    or every layer first: good blocks land whole; a block whose bytes fail their
    checksum in one layer, and one stored at another size, fail with every block after
    them in their request; the statistics cover each part of the load path."""
    from kvmesh.kv_store.integrity import checksum

    store, client = shm_store
    space = KeySpace(namespace("test-model", "cpu|f32"), (0, 1))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    layers = {name: i for i, name in enumerate(names)}
    source = {n: torch.randn(NUM_BLOCKS, *BLOCK_SHAPE) for n in names}
    caches = {n: torch.zeros(NUM_BLOCKS, *BLOCK_SHAPE) for n in names}
    a = Transfer("a", [10, 11, 12, 3, 4, 40], [b"a%d" % i for i in range(6)])
    b = Transfer("b", [20, 21, 22, 23], [b"b%d" % i for i in range(4)])
    for t in (a, b):
        for name in names:
            for block_id, h, data in zip(t.block_ids, t.hashes, read_blocks(source[name], 0, t.block_ids)):
                key = space.key(h, layers[name])
                if t is a and h == b"a4" and name == names[1]:  # damaged in the store
                    assert store.put(key, data, checksum(data) ^ 1)
                elif t is b and h == b"b2" and name == names[0]:  # another layout's size
                    assert store.put(key, data[:-4], checksum(data[:-4]))
                else:
                    assert store.put(key, data, checksum(data))
    readers = ReaderCache(["shm"])
    executor = cf.ThreadPoolExecutor(1)
    try:
        load = LayerLoad(client, readers, space, layers, caches, {n: 0 for n in names}, executor, 5.0)
        load.start([a, b])
        if everything_first:
            load.write_all()
        else:
            for name in names:
                load.write_layer(name)
        failed = {}
        stats = load.finish(lambda req_id, ids: failed.setdefault(req_id, ids))
        assert len(readers._scratch) == 0  # read in place: nothing went through the receive buffer
    finally:
        executor.shutdown()
        readers.close()
    assert failed == {"a": [4, 40], "b": [22, 23]}
    for name in names:
        for block_id in (10, 11, 12, 3, 20, 21):
            assert torch.equal(caches[name][block_id], source[name][block_id])
    assert not caches[names[1]][4].any()  # the block whose checksum failed was never copied
    s = stats["a"]
    assert s.backend == "shm" and s.nbytes > 0
    assert s.placed_s >= s.transfer_s >= s.locate_s > 0
    assert s.read_s > 0 and s.verify_s > 0 and s.copy_s > 0
    assert client.stats().leases == 0
