from kvmesh.kv_store.keys import BlockKey, DraftSpace, KeySpace, chain_hashes, namespace


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


def test_a_draft_model_s_layers_are_keyed_in_its_own_namespace():
    """Layers from ``first_layer`` on are the draft's: its namespace, its own layer index
    and heads. Two targets with one draft share the draft's keys, never the target's."""
    target, other, draft = namespace("t", "cpu|bf16"), namespace("t2", "cpu|bf16"), namespace("d", "cpu|bf16")
    drafts = DraftSpace(4, draft, (0, 1))
    space, other_space = KeySpace(target, (0, 2), drafts), KeySpace(other, (0, 2), drafts)
    h = b"h" * 16
    assert space.key(h, 3) == KeySpace(target, (0, 2)).key(h, 3) == BlockKey(target, h, (3, 4), (0, 2)).to_bytes()
    assert space.key(h, 5) == BlockKey(draft, h, (1, 2), (0, 1)).to_bytes() == other_space.key(h, 5)
    assert len(set(space.block_group(h, range(6)))) == 6
    assert set(space.block_group(h, range(4))).isdisjoint(space.block_group(h, range(4, 6)))
    assert space.key(h, 0) != other_space.key(h, 0)
