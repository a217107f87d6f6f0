"""Block encodings at rest: lossless ones give back exactly the bytes, int8 and int4
within half a quantization step per group; headers name the encoding; the store checks the encoded
bytes against their checksum before decoding."""

import contextlib
import os
import time
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.kv_store.encoding import (
    ENCODINGS, HEADER, LOSSY, MAGIC, Int4, Int8, SHUFFLED, bf16_to_f32, f32_to_bf16, heads_of, make_encoding,
)
from kvmesh.kv_store.integrity import checksum
from kvmesh.kv_store.keys import BlockKey
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.tiers import DiskTier, HostTier

LOSSLESS = [name for name in ENCODINGS if name not in LOSSY]
PAGE = 64 * 1024


def kv_block(seed: int, heads: int = 2, values: int = 4096) -> bytes:
    """bf16 values as a KV block holds them: each head its own magnitude."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 8.0, size=(heads, 1))
    return f32_to_bf16((rng.standard_normal((heads, values // heads)) * scale).astype(np.float32)).tobytes()


@pytest.mark.parametrize("name", LOSSLESS)
@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=20000))
def test_lossless_round_trip(name, data):
    enc = make_encoding(name)
    assert enc.decode(enc.encode(data)) == data


@pytest.mark.parametrize("name", [n for n in ENCODINGS if n != "none"])
def test_header_names_the_encoding_and_the_length(name):
    enc, data = make_encoding(name), kv_block(1)
    blob = enc.encode(data, heads=2)
    magic, code, flags, length = HEADER.unpack_from(blob)
    assert magic == b"KVE1" and code == enc.code and length == len(data)
    assert flags == (SHUFFLED if name in LOSSLESS else 0)
    for other in ENCODINGS:
        if other not in ("none", name):
            with pytest.raises(ValueError, match="not a"):
                make_encoding(other).decode(blob)
    with pytest.raises(ValueError):
        enc.decode(blob[:HEADER.size - 1])


def test_lossless_codecs_shrink_kv_bytes():
    data = kv_block(2)
    for name in ("zstd", "lz4"):
        assert len(make_encoding(name).encode(data)) < len(data)


def test_int8_scales_each_head_on_its_own():
    small = np.full(64, 0.01, np.float32)
    big = np.linspace(-100, 100, 64, dtype=np.float32)
    data = f32_to_bf16(np.concatenate([small, big])).tobytes()
    out = bf16_to_f32(np.frombuffer(make_encoding("int8").decode(make_encoding("int8").encode(data, 2)), np.uint16))
    assert np.allclose(out[:64], 0.01, rtol=0.01)  # one scale for both would round these to 0


def test_int8_scales_each_group_of_a_head_on_its_own():
    """Within one head, a group of small values next to a group with an outlier keeps
    its precision (one scale for the head would round the small ones to 0)."""
    small = np.full(64, 0.01, np.float32)
    outlier = np.zeros(64, np.float32)
    outlier[3] = 500.0
    data = f32_to_bf16(np.concatenate([small, outlier, small, small])).tobytes()  # one head
    enc = make_encoding("int8")
    blob = enc.encode(data, heads=1)
    out = bf16_to_f32(np.frombuffer(enc.decode(blob), np.uint16))
    assert np.allclose(out[:64], 0.01, rtol=0.01) and np.allclose(out[128:], 0.01, rtol=0.01)
    assert out[67] == 500.0


def test_int8_head_that_is_not_whole_groups_is_one_group():
    data = f32_to_bf16(np.linspace(-3, 3, 2 * 96, dtype=np.float32)).tobytes()  # 96 values a head
    enc = make_encoding("int8")
    out = bf16_to_f32(np.frombuffer(enc.decode(enc.encode(data, heads=2)), np.uint16))
    assert np.abs(out - np.linspace(-3, 3, 192)).max() <= 3 / 127


def cpu_block(k: np.ndarray, v: np.ndarray) -> bytes:
    """K and V (``[heads, tokens, head_dim]``) as vLLM's CPU cache holds a block with its
    ``vec`` kernels: each head's K channel-major, then its V token by token."""
    heads = k.shape[0]
    return f32_to_bf16(np.concatenate([k.transpose(0, 2, 1).reshape(heads, -1),
                                       v.reshape(heads, -1)], axis=1)).tobytes()


@pytest.mark.parametrize("name,at_rest,levels", [("int4", 0.3, 15), ("int8", 0.55, 255)])
def test_grouped_is_within_half_a_step_per_group_and_its_share_of_the_bytes(name, at_rest, levels):
    heads, tokens, dim = 3, 32, 64
    rng = np.random.default_rng(4)
    k, v = rng.standard_normal((2, heads, tokens, dim)).astype(np.float32) * 3
    data = cpu_block(k, v)
    enc = make_encoding(name)
    assert enc.lossy and name in LOSSY
    blob = enc.encode(data, heads=heads)
    assert len(blob) <= at_rest * len(data)
    before = bf16_to_f32(np.frombuffer(data, np.uint16)).reshape(heads, 2, -1)
    after = bf16_to_f32(np.frombuffer(enc.decode(blob), np.uint16)).reshape(heads, 2, -1)
    for half, group in ((0, 32), (1, 64)):  # K groups: one channel's 32 tokens; V: one token
        b, a = before[:, half].reshape(-1, group), after[:, half].reshape(-1, group)
        step = (b.max(axis=1, keepdims=True) - b.min(axis=1, keepdims=True)) / levels
        assert (np.abs(a - b) <= step / 2 * 1.01 + np.abs(b) / 128 + 1e-3).all()
    assert not np.array_equal(after, before)  # it is lossy


@pytest.mark.parametrize("name,levels", [("int4", 15), ("int8", 255)])
def test_grouped_keys_per_channel_and_values_per_token(name, levels):
    """An outlier channel of K (every token of it) widens only its own groups' steps,
    as does an outlier token of V: the other channels and tokens keep their precision
    (groups of consecutive K rows, or of channels across a token, would not)."""
    heads, tokens, dim = 1, 32, 64
    k = np.tile(np.linspace(-0.05, 0.05, dim, dtype=np.float32), (heads, tokens, 1))
    k[:, :, 5] = 300.0  # an outlier channel
    v = np.tile(np.linspace(-0.05, 0.05, dim, dtype=np.float32), (heads, tokens, 1))
    v[:, 7, :] = 300.0  # an outlier token
    data = cpu_block(k, v)
    enc = make_encoding(name)
    out = bf16_to_f32(np.frombuffer(enc.decode(enc.encode(data, heads)), np.uint16)).reshape(heads, 2, dim, tokens)
    back_k = out[:, 0].transpose(0, 2, 1)
    back_v = out[:, 1].reshape(heads, tokens, dim)
    keep_k = np.ones(dim, bool)
    keep_k[5] = False
    assert np.abs(back_k[:, :, keep_k] - k[:, :, keep_k]).max() <= 0.1 / levels + 2 ** -12
    assert np.allclose(back_k[:, :, 5], 300.0, rtol=0.01)
    keep_v = np.ones(tokens, bool)
    keep_v[7] = False
    assert np.abs(back_v[:, keep_v] - v[:, keep_v]).max() <= 0.1 / levels + 2 ** -12
    assert np.allclose(back_v[:, 7], 300.0, rtol=0.01)


@pytest.mark.parametrize("cls,within,sym_off", [
    (Int4, 0.1 / 30 + 2 ** -8, 0.02),  # half a step, then bf16 rounding; a scale only: up to 0.08
    (Int8, 0.0, 0.005),  # a step of 0.1/255 rounds back to the bf16 value put; a scale only: 1.1/254
])
def test_zero_point_keeps_an_offset_group_precise(cls, within, sym_off):
    """A group far from 0 and narrow (1 to 1.1) keeps steps of its range over the
    levels, not of its largest magnitude over half of them."""
    data = f32_to_bf16(np.linspace(1, 1.1, 128, dtype=np.float32)).tobytes()  # K, then V: one head
    values = bf16_to_f32(np.frombuffer(data, np.uint16))
    enc = cls()
    out = bf16_to_f32(np.frombuffer(enc.decode(enc.encode(data, 1)), np.uint16))
    assert np.abs(out - values).max() <= within
    sym = cls(asymmetric=False)  # the control: a scale only
    out = bf16_to_f32(np.frombuffer(sym.decode(sym.encode(data, 1)), np.uint16))
    assert np.abs(out - values).max() > sym_off


@pytest.mark.parametrize("name", ["int4", "int8"])
def test_grouped_refuses_what_it_cannot_hold(name):
    enc = make_encoding(name)
    with pytest.raises(ValueError):  # not two equal halves per head
        enc.encode(b"\x00" * 12, heads=2)
    if name == "int4":
        with pytest.raises(ValueError):  # a half of an odd number of values
            enc.encode(b"\x00" * 12, heads=1)
    with pytest.raises(ValueError):
        enc.encode(f32_to_bf16(np.array([1.0, np.inf, 0, 0], np.float32)).tobytes())
    with pytest.raises(ValueError):  # a scale beyond float16
        enc.encode(f32_to_bf16(np.array([1e30, 1.0, 0, 0], np.float32)).tobytes())
    blob = enc.encode(f32_to_bf16(np.arange(8, dtype=np.float32)).tobytes())
    with pytest.raises(ValueError):  # cut short
        enc.decode(blob[:-1])


def test_int8_refuses_a_block_of_the_earlier_int8():
    """Blocks of the earlier int8 (code 3: one int8 per value after a float16 scale per
    64 values, no zero point) are not read as the present one: its header's code is not
    the present int8's, so decoding refuses it (a store drops it as corrupt)."""
    data = kv_block(5)
    groups = len(data) // 2 // 64
    earlier = (HEADER.pack(MAGIC, 3, 0, len(data)) + struct.pack(">HI", 2, 64)
               + np.ones(groups, "<f2").tobytes() + bytes(len(data) // 2))
    assert make_encoding("int8").code != 3
    with pytest.raises(ValueError, match="not a int8"):
        make_encoding("int8").decode(earlier)


def test_heads_come_from_the_key():
    key = BlockKey(b"n" * 8, b"c" * 16, (3, 4), (2, 6)).to_bytes()
    assert heads_of(key) == 4 and heads_of(b"k1") == 1


def test_unknown_encoding_names_the_choices():
    with pytest.raises(ValueError, match="zstd"):
        make_encoding("gzip9")


def encoded_store(tmp_path, name):
    return TieredStore([HostTier(PAGE, page_bytes=PAGE),  # 8 blocks of 8 KiB
                        DiskTier(tmp_path / "slab", 4 * PAGE, page_bytes=PAGE, encoding=make_encoding(name))])


@pytest.mark.parametrize("name", LOSSLESS)
def test_blocks_round_trip_through_an_encoded_disk_tier(tmp_path, name):
    store = encoded_store(tmp_path, name)
    try:
        blocks = {b"k%d" % i: kv_block(i) for i in range(24)}
        for key, data in blocks.items():
            assert store.put(key, data, checksum(data))
        on_disk = [k for k in blocks if store.tier_of(k) == "disk"]
        assert len(on_disk) >= 16
        disk = store.stats().tiers[1]
        assert disk.encoding == name and disk.block_bytes == len(on_disk) * 8192
        if name != "none":
            assert disk.used_bytes < disk.block_bytes  # held compressed
        got = store.get_many(on_disk[:4])  # read back, decoded, promoted
        assert {k: b.data for k, b in got.items()} == {k: blocks[k] for k in on_disk[:4]}
        assert all(b.checksum == checksum(b.data) for b in got.values())
        lease, where = store.lease(on_disk[4:8], seconds=5)  # promoted for a zero-copy read
        for key in on_disk[4:8]:
            offset, size, crc = where[key]
            assert store.tiers[0].view(store._entries[key].slot, size).tobytes() == blocks[key]
            assert crc == checksum(blocks[key])
        store.release(lease)
        for key, data in blocks.items():  # everything, wherever it went meanwhile
            got = store.get(key)
            assert got is None or got.data == data
        store.drop()
        assert all(t.used_bytes == 0 and t.held_bytes == 0 for t in store.stats().tiers)
    finally:
        store.close()


@pytest.mark.parametrize("name", ["zstd", "lz4", "int8", "int4"])
@pytest.mark.parametrize("where", [0, HEADER.size - 1, -1])  # header, its last byte, the payload's end
def test_the_checksum_covers_the_encoded_bytes(tmp_path, name, where):
    store = encoded_store(tmp_path, name)
    try:
        for i in range(12):
            data = kv_block(i)
            store.put(b"k%d" % i, data, checksum(data))
        entry = store._entries[b"k0"]
        assert store.tier_of(b"k0") == "disk" and entry.rest_size < entry.size
        offset = entry.slot.offset + (where % entry.rest_size)
        byte = os.pread(store.tiers[1]._fd, 1, offset)
        os.pwrite(store.tiers[1]._fd, bytes([byte[0] ^ 0x01]), offset)  # one bit at rest
        assert store.get(b"k0") is None
        assert store.stats().corrupt == 1 and b"k0" not in store.keys()
    finally:
        store.close()


@pytest.mark.parametrize("name,at_rest,levels,error_scale", [
    ("int8", 0.55, 255, 2),  # in slots of the encoded size; a group's range, not its absolute maximum, is split
    ("int4", 0.35, 15, 2),   # in 512-byte slots
])
def test_a_lossy_disk_tier_serves_close_bytes_with_their_own_checksum(tmp_path, name, at_rest, levels,
                                                                      error_scale):
    store = encoded_store(tmp_path, name)
    try:
        blocks = {b"k%d" % i: kv_block(i) for i in range(16)}
        for key, data in blocks.items():
            store.put(key, data, checksum(data))
        key = next(k for k in blocks if store.tier_of(k) == "disk")
        disk = store.stats().tiers[1]
        assert disk.encoding == name and disk.used_bytes <= at_rest * disk.block_bytes
        got = store.get(key)
        assert got.data != blocks[key] and got.checksum == checksum(got.data)
        a = bf16_to_f32(np.frombuffer(blocks[key], np.uint16))
        b = bf16_to_f32(np.frombuffer(got.data, np.uint16))
        assert np.abs(a - b).max() <= error_scale * np.abs(a).max() / levels
        assert store.tier_of(key) == "host" and store.get(key) == got  # promoted as decoded
        lease, where = store.lease([key], seconds=5)
        assert where[key][2] == got.checksum
        store.release(lease)
    finally:
        store.close()


def test_a_disk_only_store_encodes_its_puts(tmp_path):
    tier = DiskTier(tmp_path / "slab", 4 * PAGE, page_bytes=PAGE, encoding=make_encoding("zstd"))
    store = TieredStore([tier])
    try:
        data = kv_block(9)
        assert store.put(b"d", data, checksum(data))
        assert store.stats().tiers[0].used_bytes < len(data)
        assert store.get(b"d").data == data
    finally:
        store.close()


@pytest.mark.parametrize("name,other", [("zstd", 2), ("int8", 3)])  # lz4; the earlier int8
@pytest.mark.parametrize("how", ["header", "record"])
def test_a_block_in_another_encoding_than_its_tiers_is_corrupt(tmp_path, how, name, other):
    """The header of the bytes at rest and the store's record of them both name the
    encoding; where either names another than the tier's, the block is dropped as
    corrupt (and so recomputed), even though its checksum at rest holds."""
    store = encoded_store(tmp_path, name)
    try:
        for i in range(12):
            data = kv_block(i)
            store.put(b"k%d" % i, data, checksum(data))
        entry = store._entries[b"k0"]
        assert store.tier_of(b"k0") == "disk"
        assert entry.rest_encoding == make_encoding(name).code  # recorded as written
        fd = store.tiers[1]._fd
        if how == "header":  # the bytes name the other, their checksum made to match
            blob = bytearray(os.pread(fd, entry.rest_size, entry.slot.offset))
            blob[4] = other  # the header's encoding code
            os.pwrite(fd, bytes(blob), entry.slot.offset)
            entry.rest_checksum = checksum(bytes(blob))
        else:  # the record names the other, the bytes untouched
            entry.rest_encoding = other
        assert store.get(b"k0") is None
        assert store.stats().corrupt == 1 and b"k0" not in store.keys()
        assert store.get(b"k1") is not None  # the others still read back
    finally:
        store.close()


# ---------------------------------------------------------------- an encoded host tier

@contextlib.contextmanager
def host_encoded_store(tmp_path, host, disk="none", host_pages=8):
    """Host pages of 16 KiB (two 8 KiB blocks as put, more encoded): a lease's decoded
    copies need a page of their own size class, as in a host tier of many pages. Closed
    on leaving."""
    store = TieredStore([HostTier(host_pages * PAGE // 4, page_bytes=PAGE // 4, encoding=make_encoding(host)),
                         DiskTier(tmp_path / "slab", 8 * PAGE, page_bytes=PAGE, encoding=make_encoding(disk))])
    try:
        yield store
    finally:
        store.close()


def assert_all_freed(store):
    assert store.leases == 0 and store.lease_copy_bytes == 0
    assert all(t.used_bytes == 0 and t.held_bytes == 0 for t in store.stats().tiers)


@pytest.mark.parametrize("host", ["zstd", "lz4", "int8"])
def test_an_encoded_host_tier_serves_puts_gets_and_leases_from_decoded_copies(tmp_path, host):
    """Blocks in an encoded host tier are held encoded; a get decodes them; a lease hands
    out offsets of decoded copies in the host region, which it holds until released (a
    lossless tier's copies are the bytes put, a lossy one's close to them, with their own
    checksum); everything is freed afterwards."""
    with host_encoded_store(tmp_path, host) as store:
        blocks = {b"k%d" % i: kv_block(i) for i in range(6)}
        for key, data in blocks.items():
            assert store.put(key, data, checksum(data))
        assert all(store.tier_of(k) == "host" for k in blocks)
        tier = store.stats().tiers[0]
        assert tier.encoding == host and tier.used_bytes < tier.block_bytes == 6 * 8192
        assert {store._entries[k].rest_encoding for k in blocks} == {make_encoding(host).code}
        got = store.get_many(list(blocks))
        for key, block in got.items():
            assert block.checksum == checksum(block.data)
            if host == "int8":
                assert block.data != blocks[key] and len(block.data) == len(blocks[key])
            else:
                assert block.data == blocks[key]
        used = store.stats().tiers[0].used_bytes
        lease, where = store.lease([b"k1", b"k2", b"missing"], seconds=30)
        assert set(where) == {b"k1", b"k2"} and store.lease_copy_bytes == 2 * 8192
        assert store.stats().tiers[0].used_bytes == used + 2 * 8192
        assert store.stats().tiers[0].lease_copy_bytes == 2 * 8192
        region = store.tiers[0].buffer()
        for key, (offset, size, crc) in where.items():
            copy = bytes(region[offset:offset + size])
            assert copy == got[key].data and crc == checksum(copy)
            assert store._entries[key].slot.offset != offset  # not the encoded slot
        assert store.lease_covers(lease, [(o, n) for o, n, _ in where.values()])
        assert store.release(lease) and not store.release(lease)
        assert store.lease_copy_bytes == 0 and store.stats().tiers[0].used_bytes == used
        store.drop()
        assert_all_freed(store)


def test_an_expired_lease_frees_its_decoded_copies(tmp_path):
    with host_encoded_store(tmp_path, "zstd") as store:
        data = kv_block(1)
        store.put(b"a", data, checksum(data))
        lease, where = store.lease([b"a"], seconds=0.0)
        assert where and store.lease_copy_bytes == 8192
        time.sleep(0.01)
        assert not store.lease_covers(lease, [(where[b"a"][0], 8192)])
        assert store.expire_leases() == 1 and store.lease_copy_bytes == 0
        assert not store.release(lease)
        store.drop()
        assert_all_freed(store)


@pytest.mark.parametrize("host,disk", [("zstd", "lz4"), ("lz4", "none"), ("none", "zstd"),
                                       ("lz4", "int8"), ("int8", "zstd")])
def test_blocks_move_between_an_encoded_host_tier_and_a_differently_encoded_disk(tmp_path, host, disk):
    """Blocks demoted from the host tier are re-encoded for the disk's encoding, and
    promoted ones for the host's; lossless pairs read back exactly the bytes put, a lossy
    one its decoded bytes (the same ones on every later read); a lease after a promotion
    serves a decoded copy; everything is freed after."""
    lossy = "int8" in (host, disk)
    with host_encoded_store(tmp_path, host, disk, host_pages=6) as store:
        blocks = {b"k%d" % i: kv_block(i) for i in range(30)}
        for key, data in blocks.items():
            assert store.put(key, data, checksum(data))
        on_disk = [k for k in blocks if store.tier_of(k) == "disk"]
        assert len(on_disk) >= 8
        assert {store._entries[k].rest_encoding for k in on_disk} == {make_encoding(disk).code}
        got = store.get_many(on_disk[:3])  # read back, decoded, promoted: encoded for the host
        assert set(got) == set(on_disk[:3])
        for key, block in got.items():
            assert store.tier_of(key) == "host"
            assert store._entries[key].rest_encoding == make_encoding(host).code
            assert (block.data != blocks[key]) if lossy else block.data == blocks[key]
            again = store.get(key)
            assert again.data == block.data if host != "int8" else again is not None
        lease, where = store.lease(on_disk[3:5], seconds=30)  # promoted, then copied decoded
        region = store.tiers[0].buffer()
        for key, (offset, size, crc) in where.items():
            copy = bytes(region[offset:offset + size])
            assert crc == checksum(copy) and (lossy or copy == blocks[key])
        assert where and store.release(lease)
        for key, data in blocks.items():  # everything, wherever it went meanwhile
            block = store.get(key)
            assert block is None or lossy or block.data == data
        store.drop()
        assert_all_freed(store)


def test_the_checksum_covers_a_host_tiers_encoded_bytes(tmp_path):
    """One bit flipped in an encoded host slot: the block is neither served nor leased,
    it is dropped as corrupt (and so recomputed)."""
    with host_encoded_store(tmp_path, "lz4") as store:
        for key in (b"a", b"b"):
            data = kv_block(len(key) + key[0])
            store.put(key, data, checksum(data))
        for key, call in ((b"a", lambda k: store.get(k)), (b"b", lambda k: store.lease([k], 30)[1] or None)):
            entry = store._entries[key]
            view = store.tiers[0].view(entry.slot, entry.rest_size)
            view[entry.rest_size - 1] ^= 0x01
            view.release()
            assert call(key) is None and key not in store.keys()
        assert store.stats().corrupt == 2
        store.expire_leases()
        for lease_id in list(store._leases):
            store.release(lease_id)
        assert_all_freed(store)


def test_a_put_an_encoded_host_tier_cannot_hold_is_rejected(tmp_path):
    with host_encoded_store(tmp_path, "int8") as store:
        assert not store.put(b"odd", b"\x01" * 6, checksum(b"\x01" * 6))  # not bf16 K and V halves
        assert store.stats().rejected == 1 and b"odd" not in store.keys()
        assert_all_freed(store)


def test_a_block_with_no_room_for_its_decoded_copy_is_not_leased(tmp_path):
    """A host tier of one page, held by the encoded blocks being leased: no page is left
    for their copies' size class, so nothing is leased (the reader recomputes), and
    the blocks stay, unpinned, readable."""
    store = TieredStore([HostTier(PAGE, page_bytes=PAGE, encoding=make_encoding("zstd"))])
    try:
        for key in (b"a", b"b"):
            data = kv_block(key[0])
            store.put(key, data, checksum(data))
        lease, where = store.lease([b"a", b"b"], seconds=30)
        assert where == {} and store.lease_copy_bytes == 0
        assert all(store._entries[k].pins == 0 for k in (b"a", b"b"))
        assert store.release(lease)
        assert store.get(b"a").data == kv_block(b"a"[0])
        store.drop()
        assert_all_freed(store)
    finally:
        store.close()
