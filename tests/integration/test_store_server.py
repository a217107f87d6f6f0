"""The store server and client over real gRPC on loopback."""

import concurrent.futures as cf
import socket
import time
from typing import NamedTuple

import pytest
import torch

from kvmesh.decode_workers.layer_loader import LayerLoad, ReaderCache
from kvmesh.kv_store.client import StoreClient, StoreError
from kvmesh.kv_store.index import EmbeddedBlockIndex
from kvmesh.kv_store.integrity import checksum
from kvmesh.kv_store.keys import KeySpace, chain_hashes, namespace
from kvmesh.kv_store.server import start_store_server
from kvmesh.kv_store.store_node import PeerBlocks
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.tiers import HostTier


def one_mib_store():
    return TieredStore([HostTier(1 << 20, page_bytes=1 << 20)])


@pytest.fixture
def server():
    srv, port = start_store_server("127.0.0.1", 0, one_mib_store(), allow_fault_injection=True)
    yield f"127.0.0.1:{port}"
    srv.stop(0)


def test_put_lookup_get_drop(server):
    with StoreClient(server) as c:
        assert c.put([(b"a", b"1" * 10), (b"b", b"2" * 10)]) == 2
        assert c.lookup([[b"a"], [b"b"], [b"c"]]) == 2
        got = c.get([b"a", b"c", b"b"])
        assert {k: b.data for k, b in got.blocks.items()} == {b"a": b"1" * 10, b"b": b"2" * 10}
        assert got.corrupt == 0 and got.blocks[b"a"].checksum == checksum(b"1" * 10)
        assert c.drop([b"a"]) == 1
        assert c.lookup([[b"a"]]) == 0
        assert c.stats().blocks == 1


def test_large_blocks_pass_the_raised_message_limit(server):
    big = bytes(range(256)) * (6 * 4096)  # 6 MiB, over gRPC's 4 MiB default
    with StoreClient(server) as c:
        assert c.put([(b"big", big[: 900 * 1024])]) == 1  # fits the 1 MiB store
        assert c.get([b"big"]).blocks[b"big"].data == big[: 900 * 1024]
        assert c.put([(b"huge", big)]) == 0  # larger than the store: rejected, not an error


@pytest.mark.parametrize("mode,corrupt,returned", [("flip", 1, 0), ("vanish", 0, 0), ("noise", 0, 1)])
def test_faults_are_seen_by_the_reader(server, mode, corrupt, returned):
    with StoreClient(server) as c:
        c.put([(b"k", b"\x01\x02" * 64)])
        assert c.inject_fault(mode, [b"k"]) == 1
        assert c.lookup([[b"k"]]) == 1  # still listed
        got = c.get([b"k"])
        assert got.corrupt == corrupt and len(got.blocks) == returned
        if returned:
            assert got.blocks[b"k"].data != b"\x01\x02" * 64  # noise: valid checksum, other bytes


def test_fault_injection_is_refused_by_default():
    srv, port = start_store_server("127.0.0.1", 0, one_mib_store())
    try:
        with StoreClient(f"127.0.0.1:{port}") as c:
            with pytest.raises(StoreError, match="PERMISSION_DENIED"):
                c.inject_fault("flip")
    finally:
        srv.stop(0)


def test_the_store_serves_on_ipv6_and_a_busy_port_is_a_clear_error():
    srv, port = start_store_server("::", 0, one_mib_store())
    try:
        with StoreClient(f"[::1]:{port}") as c:
            assert c.lookup([[b"k"]]) == 0
        with pytest.raises(RuntimeError, match="cannot bind the store server"):
            start_store_server("::", port, one_mib_store())  # a live store's port is not shared
    finally:
        srv.stop(0)
    with socket.socket(socket.AF_INET6) as busy:  # no SO_REUSEPORT: gRPC cannot share it
        busy.bind(("::", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"cannot bind the store server to \[::\]:{taken}"):
            start_store_server("::", taken, one_mib_store())


def test_unreachable_store_fails_within_the_deadline():
    with StoreClient("127.0.0.1:9", timeout_s=0.5) as c:
        start = time.monotonic()
        with pytest.raises(StoreError):
            c.lookup([[b"k"]])
        assert time.monotonic() - start < 5


def test_blocks_a_reply_carries_unasked_are_ignored():
    """A misbehaving peer (a store servicer that adds a block of its own to every reply):
    the client keeps only what it asked for, so a node never stores a peer's extra keys."""
    from concurrent import futures

    import grpc

    from kvmesh_proto import store_pb2, store_pb2_grpc
    from kvmesh.kv_store.server import StoreService

    class Chatty(StoreService):
        def Get(self, request, context):
            reply = super().Get(request, context)
            reply.blocks.append(store_pb2.Block(key=b"unasked", data=b"x" * 10, checksum=checksum(b"x" * 10)))
            return reply

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    store_pb2_grpc.add_KVStoreServicer_to_server(Chatty(one_mib_store(), False, None, None, None), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        with StoreClient(f"127.0.0.1:{port}") as c:
            assert c.put([(b"a", b"1" * 10)]) == 1
            got = c.get([b"a", b"b"])
            assert set(got.blocks) == {b"a"} and got.corrupt == 0
    finally:
        srv.stop(0)


# Loads larger than one message: the message limit is lowered on both ends, so that a few
# 16 KiB blocks pass it.

LIMIT = 64 << 10
BLOCK = 16 << 10
SPACE = KeySpace(namespace("tiny", "test"), (0, 1))


def counting_gets(client: StoreClient) -> list[int]:
    """Record the number of keys of every Get call ``client`` makes."""
    calls: list[int] = []
    real = client._stub.Get

    def get(request, timeout, metadata=()):
        calls.append(len(request.keys))
        return real(request, timeout=timeout, metadata=metadata)

    client._stub.Get = get
    return calls


def block_bytes(h: bytes, layer: int) -> bytes:
    return (h + bytes([layer])) * (BLOCK // (len(h) + 1)) + bytes(BLOCK % (len(h) + 1))


class Transfer(NamedTuple):
    req_id: str
    block_ids: list[int]
    hashes: list[bytes]


def test_a_get_load_larger_than_one_message_goes_in_several_calls():
    store = TieredStore([HostTier(4 << 20, page_bytes=1 << 20)])
    srv, port = start_store_server("127.0.0.1", 0, store, max_message_bytes=LIMIT)
    hashes = chain_hashes(list(range(6 * 4)), 4)  # 6 blocks x 2 layers x 16 KiB = 192 KiB
    names = {"model.layers.0.attn": 0, "model.layers.1.attn": 1}
    for h in hashes:
        for layer in names.values():
            data = block_bytes(h, layer)
            assert store.put(SPACE.key(h, layer), data, checksum(data))
    caches = {name: torch.zeros(8, 8, BLOCK // 8, dtype=torch.uint8) for name in names}
    executor = cf.ThreadPoolExecutor(1)
    try:
        with StoreClient(f"127.0.0.1:{port}", max_message_bytes=LIMIT) as client:
            calls = counting_gets(client)
            load = LayerLoad(client, ReaderCache(["shm"]), SPACE, names, caches,
                             {name: 0 for name in names}, executor, timeout_s=5.0)
            load.start([Transfer("r", [2, 3, 4, 5, 6, 7], hashes)])
            failed = []
            stats = load.finish(lambda req_id, ids: failed.append((req_id, ids)))
        assert failed == [] and stats["r"].backend == "get"
        assert len(calls) == 4 and sum(calls) == 12  # three blocks of 16 KiB fit in 64 KiB
        for name, layer in names.items():
            for block_id, h in zip(range(2, 8), hashes):
                assert caches[name][block_id].numpy().tobytes() == block_bytes(h, layer)
    finally:
        executor.shutdown()
        srv.stop(0)


def test_a_peer_fetch_larger_than_one_message_goes_in_several_calls():
    index = EmbeddedBlockIndex()
    holder = TieredStore([HostTier(4 << 20, page_bytes=1 << 20)])
    srv, port = start_store_server("127.0.0.1", 0, holder, max_message_bytes=LIMIT)
    keys = [SPACE.key(h, 0) for h in chain_hashes(list(range(10 * 4)), 4)]  # 160 KiB
    for k in keys:
        assert holder.put(k, block_bytes(k[:16], 0), checksum(block_bytes(k[:16], 0)))
    index.register_node("holder", f"127.0.0.1:{port}")
    index.register_node("asker", "elsewhere")
    index.add("holder", "host", keys)
    peers = PeerBlocks(index, "asker", max_block_bytes=BLOCK, max_message_bytes=LIMIT)
    try:
        calls = counting_gets(peers._client(f"127.0.0.1:{port}"))
        found = peers.fetch(keys)
        assert {k: b.data for k, b in found.items()} == {k: block_bytes(k[:16], 0) for k in keys}
        assert calls == [3, 3, 3, 1]
    finally:
        peers.close()
        srv.stop(0)
