from kvmesh.kv_store.keys import BlockKey, KeySpace, chain_hashes, namespace


def test_chain_hash_covers_full_blocks_only():
    assert len(chain_hashes(list(range(31)), 32)) == 0
    assert len(chain_hashes(list(range(32)), 32)) == 1
    assert len(chain_hashes(list(range(95)), 32)) == 2


def test_chain_hash_depends_on_the_whole_prefix():
    a = chain_hashes(list(range(96)), 32)
    b = chain_hashes([999] + list(range(1, 96)), 32)  # differs in block 0 only
    assert all(x != y for x, y in zip(a, b))  # so every later block differs too
    assert chain_hashes(list(range(64)), 32) == a[:2]  # and a prefix keeps its hashes


def test_salt_separates_tenants():
    tokens = list(range(64))
    assert chain_hashes(tokens, 32, "tenant-a") != chain_hashes(tokens, 32, "tenant-b")
    assert chain_hashes(tokens, 32, None) == chain_hashes(tokens, 32, "")


def test_block_key_round_trip_and_namespaces():
    ns = namespace("model", "cpu|bf16|bs32")
    assert ns != namespace("model", "cpu|bf16|bs64")
    assert ns != namespace("other", "cpu|bf16|bs32")
    key = BlockKey(ns, b"h" * 16, (3, 4), (0, 2))
    assert BlockKey.from_bytes(key.to_bytes()) == key
    space = KeySpace(ns, (0, 2))
    assert space.key(b"h" * 16, 3) == key.to_bytes()
    assert len(set(space.block_group(b"h" * 16, range(4)))) == 4
    assert space.block_group(b"h" * 16, [3, 7]) == [key.to_bytes(),
                                                   BlockKey(ns, b"h" * 16, (7, 8), (0, 2)).to_bytes()]
