"""End to end: KV saved by vLLM engines of one tensor-parallel split, loaded by engines of
another, through a real store (gRPC and shared memory, in the test process).

Real vLLM engines on the CPU (tensor-parallel ranks in processes of vLLM's own, one core
each), one after another, each ``kv_both`` without a local prefix cache
(``tests.connector_runs``). Greedy tokens equal a colocated TP=1 vLLM run; the tokens
each load took from the store are asserted with no failed tokens and with the bytes the
reading rank moved, and noise in place of the stored KV changes the tokens (the loaded
bytes were used). Model: tiny (2 KV heads: a TP=2 rank holds one) and mqa (1 KV head,
replicated on both ranks of TP=2, stored once).

Pipeline parallelism: the same runs with PP=2, where vLLM can run them; vLLM's CPU
backend fails at the first step (the test is skipped with vLLM's own error). What a
stage's layers mean for the lookup is run here through the closest configuration that
does run: a TP=2 writer's blocks with the later half of the layers (a second stage's)
missing for one block, which the reader recomputes from that block on.
"""

from __future__ import annotations

import random
import uuid

import pytest

from kvmesh.cluster.models import SIZES
from kvmesh.kv_store.client import StoreClient
from kvmesh.kv_store.keys import KeySpace, chain_hashes
from kvmesh.kv_store.server import start_store_server
from kvmesh.kv_store.tiered_store import TieredStore
from kvmesh.kv_store.tiers import HostTier
from kvmesh.kv_store.transfer import open_source
from tests.colocated import reference_table
from tests.connector_runs import run_connector_engine

BLOCK = 32
MAX_TOKENS = 6
LAYERS = SIZES["tiny"].num_layers
_rng = random.Random(17)


def _prompt(n: int) -> list[int]:
    return [_rng.randrange(10, 1000) for _ in range(n)]


TP2_TO_TP1, TP1_TO_TP2 = _prompt(100), _prompt(100)    # 3 full blocks loaded each
NOISE_2_TO_1, NOISE_1_TO_2 = _prompt(100), _prompt(100)
MISSING_SHARD, MISSING_STAGE = _prompt(130), _prompt(130)  # 4 full blocks each
MQA = _prompt(100)
PP2_TO_PP1, PP1_TO_PP2 = _prompt(100), _prompt(100)
TINY_PROMPTS = [TP2_TO_TP1, TP1_TO_TP2, NOISE_2_TO_1, NOISE_1_TO_2, MISSING_SHARD, MISSING_STAGE,
                PP2_TO_PP1, PP1_TO_PP2]


def block_bytes(size: str, heads: int) -> int:
    """One block of one layer: K and V of ``heads`` KV heads."""
    spec = SIZES[size]
    return heads * BLOCK * 2 * (spec.hidden_size // spec.num_heads) * 2  # bfloat16


@pytest.fixture(scope="module")
def store():
    """A real store server in this process, offering shared memory to the engines."""
    tiered = TieredStore([HostTier(64 << 20, page_bytes=1 << 16, shm_name="kvmesh-test-" + uuid.uuid4().hex[:8])])
    source = open_source("shm", tiered.tiers[0])
    server, port = start_store_server("127.0.0.1", 0, tiered, offers={"shm": source.descriptor()},
                                      allow_fault_injection=True)
    with StoreClient(f"127.0.0.1:{port}", timeout_s=10) as client:
        yield client
    server.stop(0)
    source.close()
    tiered.close()


def keys(namespace: bytes, prompt: list[int], heads: tuple[int, int], blocks=None, layers=range(LAYERS)):
    space = KeySpace(namespace, heads)
    hashes = chain_hashes(prompt, BLOCK)
    return [space.key(hashes[b], layer) for b in (blocks if blocks is not None else range(len(hashes)))
            for layer in layers]


def run(model: str, store: StoreClient, prompts, workdir, tp: int = 1, pp: int = 1,
        may_fail: bool = False) -> dict:
    """One engine's run (``tests.connector_runs``); ``RuntimeError`` with the engine's error,
    or, ``may_fail``, the output with its ``error``."""
    out = run_connector_engine({"model": model, "store_address": store.address, "prompts": prompts,
                                "max_tokens": MAX_TOKENS, "tensor_parallel_size": tp,
                                "pipeline_parallel_size": pp}, workdir / f"tp{tp}-pp{pp}", timeout_s=300)
    if "error" in out:
        if may_fail:
            return out
        raise RuntimeError(out["error"])
    out["namespace"] = bytes.fromhex(out["namespace"])
    return out


@pytest.fixture(scope="module")
def tiny_runs(tiny_model, store, tmp_path_factory):
    """TP=2 saves; its stored KV is damaged where the tests say; TP=1 loads it and saves
    its own; that is damaged likewise; TP=2 loads it. The results, by prompt."""
    reference = reference_table(tiny_model, TINY_PROMPTS, MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("colocated"))
    store.drop()
    first = run(tiny_model, store, [TP2_TO_TP1, NOISE_2_TO_1, MISSING_SHARD, MISSING_STAGE],
                tmp_path_factory.mktemp("tp2-save"), tp=2)
    ns = first["namespace"]
    # rank 1's shard (head 1) of block 1, every layer
    assert store.drop(keys(ns, MISSING_SHARD, (1, 2), blocks=[1])) == LAYERS
    # both shards of block 2, the later half of the layers (a second pipeline stage's)
    assert store.drop(keys(ns, MISSING_STAGE, (0, 1), [2], range(LAYERS // 2, LAYERS))
                      + keys(ns, MISSING_STAGE, (1, 2), [2], range(LAYERS // 2, LAYERS))) == LAYERS
    noised = keys(ns, NOISE_2_TO_1, (0, 1)) + keys(ns, NOISE_2_TO_1, (1, 2))
    assert store.inject_fault("noise", noised) == len(noised)
    second = run(tiny_model, store, [TP2_TO_TP1, NOISE_2_TO_1, MISSING_SHARD, MISSING_STAGE,
                                     TP1_TO_TP2, NOISE_1_TO_2], tmp_path_factory.mktemp("tp1"), tp=1)
    noised = keys(ns, NOISE_1_TO_2, (0, 2))
    assert store.inject_fault("noise", noised) == len(noised)
    third = run(tiny_model, store, [TP1_TO_TP2, NOISE_1_TO_2], tmp_path_factory.mktemp("tp2-load"), tp=2)
    by_prompt = {}
    for prompts, out in (([TP2_TO_TP1, NOISE_2_TO_1, MISSING_SHARD, MISSING_STAGE], first),
                         ([TP2_TO_TP1, NOISE_2_TO_1, MISSING_SHARD, MISSING_STAGE, TP1_TO_TP2, NOISE_1_TO_2], second),
                         ([TP1_TO_TP2, NOISE_1_TO_2], third)):
        for p, result in zip(prompts, out["results"]):
            by_prompt.setdefault(tuple(p), []).append(result)
    yield reference, by_prompt
    store.drop()


def loaded(prompt: list[int]) -> int:
    """Prompt tokens a load takes: every full block but the one with the last token."""
    return (len(prompt) - 1) // BLOCK * BLOCK


def test_prefill_tp2_feeds_decode_tp1(tiny_runs):
    reference, runs = tiny_runs
    saved, load = runs[tuple(TP2_TO_TP1)]
    assert saved["kvmesh"]["tokens_from_store"] == 0 and saved["tokens"] == reference[tuple(TP2_TO_TP1)]
    assert load["tokens"] == reference[tuple(TP2_TO_TP1)]
    assert load["kvmesh"]["tokens_from_store"] == loaded(TP2_TO_TP1)
    assert load["kvmesh"]["tokens_load_failed"] == 0
    # the TP=1 rank gathered both heads of every loaded block and layer from two shards
    assert load["kvmesh"]["nbytes"] == loaded(TP2_TO_TP1) // BLOCK * LAYERS * block_bytes("tiny", 2)


def test_prefill_tp1_feeds_decode_tp2(tiny_runs):
    reference, runs = tiny_runs
    saved, load = runs[tuple(TP1_TO_TP2)]
    assert saved["kvmesh"]["tokens_from_store"] == 0
    assert load["tokens"] == reference[tuple(TP1_TO_TP2)]
    assert load["kvmesh"]["tokens_from_store"] == loaded(TP1_TO_TP2)
    assert load["kvmesh"]["tokens_load_failed"] == 0
    # a TP=2 rank read the TP=1 block (both heads) to slice its own head from it
    assert load["kvmesh"]["nbytes"] == loaded(TP1_TO_TP2) // BLOCK * LAYERS * block_bytes("tiny", 2)


@pytest.mark.parametrize("prompt", [NOISE_2_TO_1, NOISE_1_TO_2], ids=["tp2-to-tp1", "tp1-to-tp2"])
def test_negative_control_noise_changes_the_tokens(tiny_runs, prompt):
    reference, runs = tiny_runs
    load = runs[tuple(prompt)][-1]
    assert load["kvmesh"]["tokens_from_store"] == loaded(prompt)
    assert load["kvmesh"]["tokens_load_failed"] == 0
    assert load["tokens"] != reference[tuple(prompt)]


@pytest.mark.parametrize("prompt,missing_block", [(MISSING_SHARD, 1), (MISSING_STAGE, 2)],
                         ids=["one-rank-s-shard", "later-stage-layers"])
def test_a_block_missing_a_piece_is_recomputed_from_there(tiny_runs, prompt, missing_block):
    reference, runs = tiny_runs
    _, load = runs[tuple(prompt)]
    assert load["kvmesh"]["tokens_from_store"] == missing_block * BLOCK
    assert load["kvmesh"]["tokens_load_failed"] == 0
    assert load["tokens"] == reference[tuple(prompt)]


def test_a_replicated_kv_head_is_stored_once(family_model, store, tmp_path_factory):
    """mqa at TP=2: both ranks hold the one KV head; one stores it. The same engine then
    loads it on both ranks (no local prefix cache)."""
    model = family_model("mqa")
    reference = reference_table(model, [MQA], MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("colocated-mqa"))
    store.drop()
    before = store.stats().puts
    out = run(model, store, [MQA, MQA], tmp_path_factory.mktemp("mqa"), tp=2)
    saved, load = out["results"]
    full_blocks = (len(MQA) + MAX_TOKENS - 1) // BLOCK  # the prompt's and the answer's, with KV
    assert store.stats().blocks == full_blocks * LAYERS
    assert store.stats().puts - before == full_blocks * LAYERS  # one put per block and layer, not two
    assert saved["tokens"] == reference[tuple(MQA)] and saved["kvmesh"]["tokens_from_store"] == 0
    assert load["tokens"] == reference[tuple(MQA)]
    assert load["kvmesh"]["tokens_from_store"] == loaded(MQA)
    assert load["kvmesh"]["tokens_load_failed"] == 0
    assert load["kvmesh"]["nbytes"] == loaded(MQA) // BLOCK * LAYERS * block_bytes("mqa", 1)
    store.drop()


def test_pipeline_parallel_splits(tiny_model, tiny_runs, store, tmp_path_factory):
    """PP=2 saves, PP=1 loads (and saves), PP=2 loads: each stage saves and loads only its
    own layers, and the lookup counts a block only with every stage's layers. Where vLLM
    cannot run PP=2 (its CPU backend fails at the first step), skipped with its error."""
    reference, _ = tiny_runs
    store.drop()
    first = run(tiny_model, store, [PP2_TO_PP1], tmp_path_factory.mktemp("pp2-save"), pp=2, may_fail=True)
    if "error" in first:
        pytest.skip("vLLM cannot run pipeline parallelism here: " + " | ".join(first["error"].splitlines())[:1500])
    second = run(tiny_model, store, [PP2_TO_PP1, PP1_TO_PP2], tmp_path_factory.mktemp("pp1"), pp=1)
    third = run(tiny_model, store, [PP1_TO_PP2], tmp_path_factory.mktemp("pp2-load"), pp=2)
    for saved, load, prompt in ((first["results"][0], second["results"][0], PP2_TO_PP1),
                                (second["results"][1], third["results"][0], PP1_TO_PP2)):
        assert saved["kvmesh"]["tokens_from_store"] == 0 and saved["tokens"] == reference[tuple(prompt)]
        assert load["tokens"] == reference[tuple(prompt)]
        assert load["kvmesh"]["tokens_from_store"] == loaded(prompt)
        assert load["kvmesh"]["tokens_load_failed"] == 0
    store.drop()
