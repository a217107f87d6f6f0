"""Internal traffic is authenticated: a real store node (``StoreNode``, as ``kvmesh store``
runs it) with a cluster secret refuses whoever lacks it, its leases cannot be guessed,
its gRPC transfer source serves only leased blocks, and it listens only on its host."""

from __future__ import annotations

import os
import socket

import grpc
import pytest

from kvmesh.kv_store.auth import METADATA_KEY, write_secret
from kvmesh.kv_store.client import StoreClient, StoreError
from kvmesh.kv_store.node import StoreNode
from kvmesh.kv_store.settings import StoreSettings
from kvmesh.kv_store.transfer import Extent, TransferError, open_reader
from kvmesh_proto import store_pb2, store_pb2_grpc

SECRET = "the-cluster-secret-of-this-test"
A, B = b"tenant-a/block", b"tenant-b/block"
A_BYTES, B_BYTES = b"\xaa" * 4096, b"\xbb" * 4096


@pytest.fixture
def node(tmp_path):
    path = tmp_path / "secret"
    write_secret(str(path), SECRET + "\n")  # surrounding whitespace is not part of it
    settings = StoreSettings(host="127.0.0.1", port=0, host_bytes=8 << 20, page_bytes=1 << 20,
                             transfer=("grpc",), cluster_secret_file=str(path))
    node = StoreNode.start(settings)
    with StoreClient(node.address, secret=SECRET) as owner:
        assert owner.put([(A, A_BYTES), (B, B_BYTES)]) == 2
    yield node
    node.close()


def _contents(address: str) -> dict[bytes, bytes]:
    with StoreClient(address, secret=SECRET) as owner:
        return {k: b.data for k, b in owner.get([A, B]).blocks.items()}


# ------------------------------------------------------------------ the store API

ATTACKS = {
    "put over a block": lambda c: c.put([(A, b"poison" * 100)]),
    "get another tenant's KV": lambda c: c.get([B]),
    "lookup whether a prompt was sent": lambda c: c.lookup([[A]]),
    "drop everything": lambda c: c.drop(None),
    "locate (lease) blocks": lambda c: c.locate([A], lease_s=5),
    "stats": lambda c: c.stats(),
}


@pytest.mark.parametrize("secret", [None, "a-wrong-secret", SECRET + "x", SECRET[:-1]])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_store_refuses_every_call_without_the_secret(node, secret, attack):
    with StoreClient(node.address, secret=secret) as stranger:
        with pytest.raises(StoreError, match="UNAUTHENTICATED"):
            ATTACKS[attack](stranger)
    assert _contents(node.address) == {A: A_BYTES, B: B_BYTES}  # nothing written, nothing dropped


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_with_the_secret_the_same_calls_succeed(node, attack):
    """The negative control: the refusal above is the secret's doing, not the call's."""
    with StoreClient(node.address, secret=SECRET) as member:
        ATTACKS[attack](member)


def test_the_refusal_is_the_servers_own_for_a_raw_grpc_caller(node):
    """A caller that is not ``StoreClient`` (any gRPC stub, metadata of its choosing)."""
    with grpc.insecure_channel(node.address) as channel:
        stub = store_pb2_grpc.KVStoreStub(channel)
        for metadata in ((), ((METADATA_KEY, "guess"),), (("authorization", f"Bearer {SECRET}"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Drop(store_pb2.DropRequest(), timeout=5, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Stats(store_pb2.StatsRequest(), timeout=5, metadata=((METADATA_KEY, SECRET),)).blocks == 2


# ------------------------------------------------------------------ leases


def test_lease_ids_are_random_and_a_guessed_release_is_harmless(node):
    with StoreClient(node.address, secret=SECRET) as member:
        first, second = member.locate([A], lease_s=30), member.locate([A], lease_s=30)
        assert len(first.lease_id) == 16 and first.lease_id != second.lease_id
        assert int.from_bytes(first.lease_id, "big") > 1 << 64  # not a counter (2^-64 to fail by chance)
        guesses = [b"", (1).to_bytes(8, "big"), (1).to_bytes(16, "big"), bytes(16),
                   first.lease_id[:-1] + bytes([first.lease_id[-1] ^ 1])]
        assert not any(member.release(g) for g in guesses)
        assert node.store.lease_covers(first.lease_id, [first.extents[A][:2]])  # still held
        assert member.release(first.lease_id) and not member.release(first.lease_id)
        assert member.release(second.lease_id)


# ------------------------------------------------------------------ the gRPC transfer source


def _read(reader, extents, lease: bytes) -> bytes:
    dest = bytearray(sum(size for _, size in extents))
    reader.read([Extent(o, n) for o, n in extents], dest, deadline_s=10, lease=lease)
    return bytes(dest)


def test_the_grpc_transfer_source_serves_only_leased_bytes_to_the_lease_holder(node):
    with StoreClient(node.address, secret=SECRET) as member:
        located = member.locate([A], lease_s=30)
        other = member.locate([B], lease_s=30)
        a = located.extents[A][:2]
        b = other.extents[B][:2]
        with open_reader(located.offers["grpc"], secret=SECRET) as reader:
            assert _read(reader, [a], located.lease_id) == A_BYTES  # the control: the holder reads
            for extents, lease in (([a], b""),                                  # no lease
                                   ([a], bytes(16)),                            # a guessed one
                                   ([b], located.lease_id),                     # another's block
                                   ([(0, reader.region_bytes)], located.lease_id),  # the whole arena
                                   ([(a[0], a[1] + 1)], located.lease_id)):     # one byte past it
                with pytest.raises(TransferError, match="PERMISSION_DENIED"):
                    _read(reader, extents, lease)
            assert member.release(located.lease_id)
            with pytest.raises(TransferError, match="PERMISSION_DENIED"):
                _read(reader, [a], located.lease_id)  # a released lease reads nothing
        for secret in (None, "a-wrong-secret"):
            with open_reader(other.offers["grpc"], secret=secret) as stranger:
                with pytest.raises(TransferError, match="UNAUTHENTICATED"):
                    _read(stranger, [b], other.lease_id)  # even holding a valid lease id


# ------------------------------------------------------------------ listeners


def _listening() -> set[tuple[str, int]]:
    """The TCP sockets this process listens on: (address, port)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, port = fields[1].split(":")
                raw = bytes.fromhex(hexaddr)  # host-order 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                host = socket.inet_ntop(family, raw).removeprefix("::ffff:")  # IPv4-mapped
                found.add((host, int(port, 16)))
    return found


def _external_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    from kvmesh.kv_store.transfer.nixl_backend import _ipv4_interfaces

    return next((str(i.ip) for _, i in _ipv4_interfaces() if not i.ip.is_loopback), None)


def test_every_listener_of_a_store_binds_only_its_host(tmp_path):
    from kvmesh.kv_store.transfer import available_backends

    before = _listening()
    settings = StoreSettings(host="127.0.0.1", port=0, host_bytes=8 << 20, page_bytes=1 << 20,
                             metrics_port=_free_port(), transfer=tuple(available_backends()))
    node = StoreNode.start(settings)
    try:
        opened = _listening() - before
    finally:
        node.close()
    expected = 3 + ("nixl" in settings.transfer)  # API, metrics, grpc transfer (+ UCX)
    assert len(opened) >= expected, opened
    assert {host for host, _ in opened} == {"127.0.0.1"}, opened


def test_without_a_host_nixl_listens_on_the_external_address_too():
    """The negative control of the test above: UCX's own default is every interface."""
    pytest.importorskip("nixl")
    from kvmesh.kv_store.transfer.nixl_backend import NixlSource

    external = _external_address()
    if external is None:
        pytest.skip("this machine has no non-loopback address")
    before = _listening()
    source = NixlSource(bytearray(1 << 20), host=None)
    try:
        opened = _listening() - before
    finally:
        source.close()
    assert external in {host for host, _ in opened}, opened


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
