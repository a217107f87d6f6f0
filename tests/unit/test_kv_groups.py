"""The connector's scheduler side with several KV-cache groups (a full-attention group and
a windowed one, as vLLM's hybrid allocator makes for a Gemma-3 model): what it looks up,
loads and saves per group. A dictionary stands in for the store's key index (the real
store answers ``Lookup`` the same way: leading key groups all present; tests/e2e runs it
with real engines); vLLM's own window rule is checked against ``KvGroup``'s."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvmesh.engine_host.connector_settings import ConnectorSettings
from kvmesh.engine_host.kv_groups import KvGroup
from kvmesh.engine_host.scheduler import ConnectorScheduler
from kvmesh.kv_store.keys import KeySpace, chain_hashes

BS = 32
FULL, WINDOWED = KvGroup((1, 3)), KvGroup((0, 2), window=64)


class _Index:
    """Keys present; ``lookup`` as the store answers it."""

    def __init__(self):
        self.keys: set[bytes] = set()
        self.calls = 0

    def lookup(self, groups, session=None):
        self.calls += 1
        n = 0
        for g in groups:
            if not all(k in self.keys for k in g):
                break
            n += 1
        return n

    def close(self):
        pass


def _scheduler(groups=(FULL, WINDOWED)) -> tuple[ConnectorScheduler, _Index]:
    settings = ConnectorSettings(store_address="127.0.0.1:1", timeout_s=1.0, transfer_preference=("grpc",),
                                 can_load=True, can_save=True, block_size=BS, namespace=b"n" * 8,
                                 total_heads=2, heads_per_rank=2, tensor_parallel_size=1, num_layers=4)
    sched = ConnectorScheduler(settings, groups)
    sched.store.close()
    sched.store = index = _Index()
    return sched, index


def _store(index: _Index, hashes, blocks, layers):
    space = KeySpace(b"n" * 8, (0, 2))
    index.keys |= {space.key(hashes[i], layer) for i in blocks for layer in layers}


@pytest.mark.parametrize("window,retained", [(64, 0), (100, 0), (32, 0), (64, 16)])
def test_the_window_rule_is_vllm_s(window, retained):
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    vllm = SimpleNamespace(sliding_window=window, extra_retained_tokens=retained)
    group = KvGroup((0,), window=window, retained=retained)
    for blocks in range(12):
        assert group.first_needed(blocks, BS) == SlidingWindowManager.get_num_skipped_tokens(vllm, blocks * BS) // BS


def test_a_hit_reaches_only_as_far_as_every_group_can_supply_it():
    sched, index = _scheduler()
    hashes = chain_hashes(list(range(300)), BS)  # 9 blocks
    _store(index, hashes, range(9), FULL.layers)
    assert sched._hits(hashes, 0, 9) == 0  # no windowed layer held
    _store(index, hashes, [7, 8], WINDOWED.layers)  # the window of a 9-block hit
    assert sched._hits(hashes, 0, 9) == 9
    assert sched._hits(hashes, 0, 8) == 0  # an 8-block hit needs block 6's window too
    _store(index, hashes, [6], WINDOWED.layers)
    assert sched._hits(hashes, 0, 8) == 8
    index.keys -= {KeySpace(b"n" * 8, (0, 2)).key(hashes[8], 0)}  # one layer of the last window block
    assert sched._hits(hashes, 0, 9) == 8
    _store(index, hashes, range(5), WINDOWED.layers)  # windowed blocks 0-7; full blocks only 0-4 now
    index.keys -= {KeySpace(b"n" * 8, (0, 2)).key(hashes[5], 1)}
    assert sched._hits(hashes, 0, 9) == 5
    assert sched._hits(hashes, 2, 9) == 3  # two blocks held by the engine already


def test_each_group_saves_and_loads_its_own_blocks():
    sched, _ = _scheduler()
    hashes = chain_hashes(list(range(300)), BS)
    full_ids, window_ids = list(range(10, 19)), list(range(30, 39))
    saves = sched._saves("r", [full_ids, window_ids], hashes, 0, 9)
    assert [(t.group, t.block_ids, t.parent) for t in saves] == [
        (0, full_ids, None), (1, window_ids[6:], hashes[5])]  # the window of a hit of 8 or 9 blocks
    # vLLM pointed the blocks left of a loaded window at its null block (id 0)
    state = SimpleNamespace(session=None, shard_heads=0, load=(0, 9), block_ids=[full_ids, [0] * 7 + window_ids[7:]], hashes=hashes)
    loads = sched._loads("r", state)
    assert [(t.group, t.block_ids, t.hashes) for t in loads] == [(0, full_ids, hashes), (1, window_ids[7:], hashes[7:])]


def test_one_full_attention_group_plans_as_before_and_loads_in_the_step():
    sched, index = _scheduler((KvGroup((0, 1, 2, 3)),))
    hashes = chain_hashes(list(range(300)), BS)
    _store(index, hashes, range(4), range(4))
    assert sched._hits(hashes, 0, 9) == 4 and index.calls == 1
    assert not sched.load_async
    assert _scheduler()[0].load_async and _scheduler((WINDOWED,))[0].load_async


def test_a_draft_model_s_layers_get_ids_after_the_target_s():
    """vLLM puts a draft model's attention layers (``draft_model.`` names) in the target's
    group: they get ids after the target's, which the keys put in the draft's namespace."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from kvmesh.engine_host.kv_groups import kv_groups

    names = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    names += [f"draft_model.model.layers.{i}.self_attn.attn" for i in range(2)]
    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    config = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(names, spec)])
    (group,) = kv_groups(config, num_layers=4)
    assert group.layers == (0, 1, 2, 3, 4, 5) and group.layer_names == tuple(names) and group.window is None
