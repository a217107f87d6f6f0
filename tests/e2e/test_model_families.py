"""End to end for model families other than tiny's grouped-query Llama: real vLLM engines
on the CPU, a real store, the router over HTTP.

For MQA (one KV head), MHA (a KV head per attention head), a sliding-window model (every
layer windowed: vLLM keeps one ``SlidingWindowSpec`` group and points the blocks that left
the window at its null block) and a hybrid local/global model (the connector declares
``SupportsHMA``, so vLLM keeps its hybrid allocator: a full-attention group and a windowed
group, each with its own block table, loaded outside the steps): greedy tokens equal a
colocated vLLM run of the same model, the tokens loaded from the store, the blocks the
prefill worker stored and the bytes moved are asserted (a windowed layer's only for the
blocks its window reads), and a noise negative control shows the decode worker used them.
The same for speculative decoding on the decode worker, n-gram and with a draft model
(against non-speculative greedy decoding; its health reports the acceptance rate; the
draft's KV for the prompt, computed by the prefill worker running the same draft, goes
through the store beside the target's, keyed in the draft's namespace) and for an fp8 KV
cache (skipped with the engine's reason where the CPU backend has none). Then: a prefill worker of one
model and a decode worker of the same architecture with other weights, or of another KV
dtype, never share blocks, and engines with the connector keep their KV-cache groups.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import NamedTuple

import httpx
import pytest

from kvmesh.cluster.local import LocalCluster
from kvmesh.cluster.models import SIZES, SLIDING_WINDOW
from kvmesh.kv_store.client import StoreClient
from tests.colocated import prefill_then_decode, reference_table

BLOCK = 32
MAX_TOKENS = 8
NGRAM_TOKENS = 24
NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                    "prompt_lookup_max": 4})


class Case(NamedTuple):
    size: str                          # the generated model
    engine_args: tuple[str, ...] = ()  # both workers' and the colocated run's
    decode_args: tuple[str, ...] = ()  # the decode worker's alone (not the colocated run's)
    dtype_bytes: int = 2               # of the KV cache
    max_tokens: int = MAX_TOKENS       # of every request
    draft: str | None = None           # both workers draft with this model (not the colocated run)


CASES = {
    "mqa": Case("mqa"), "mha": Case("mha"), "sliding": Case("sliding"), "hybrid": Case("hybrid"),
    # n-gram speculative decoding on the decode worker, against non-speculative greedy
    "ngram": Case("tiny", decode_args=("--speculative-config", NGRAM), max_tokens=NGRAM_TOKENS),
    # a draft model's speculative decoding, on both workers (the prefill worker computes the
    # draft's KV for the prompt), against non-speculative greedy
    "draft": Case("tiny", max_tokens=NGRAM_TOKENS, draft="draft"),
    "fp8": Case("tiny", engine_args=("--kv-cache-dtype", "fp8"), dtype_bytes=1),
}
SPECULATIVE = {"ngram": "ngram", "draft": "draft_model"}  # case -> method
LOOPING_SEED = 1108  # see LOOPING
_rng = random.Random(11)
_PATTERN = [_rng.randrange(10, 1000) for _ in range(20)]
# 1 block + a bit; 3 blocks + a bit, longer than the window, a pattern repeated (n-gram
# proposals find it); 9 blocks + a bit.
PROMPTS = [[_rng.randrange(10, 1000) for _ in range(40)], _PATTERN * 5,
           [_rng.randrange(10, 1000) for _ in range(300)]]
# A prompt whose greedy continuation (tiny, seed 0) repeats pairs of tokens seen before in
# it or in the continuation, so that n-gram drafts get accepted: a seeded random prompt
# picked by that property (of 300 tried, the best; random weights rarely repeat within
# the 8 tokens the other requests ask for).
LOOPING = [random.Random(LOOPING_SEED).randrange(10, 1000) for _ in range(40)]


def loaded_tokens(prompt: list[int]) -> int:
    """Prompt tokens a decode worker takes from the store: every full block but the one
    holding the last prompt token."""
    return (len(prompt) - 1) // BLOCK * BLOCK


def layers_by_kind(case: Case) -> tuple[int, int]:
    """(full-attention layers, windowed layers) of the case's model and its draft's, as
    vLLM groups them."""
    spec = SIZES[case.size]
    if case.size == "sliding":
        return 0, spec.num_layers
    windowed = (spec.layer_types or ()).count("sliding_attention")
    return spec.num_layers - windowed + (SIZES[case.draft].num_layers if case.draft else 0), windowed


def window_blocks(blocks: int) -> int:
    """Of ``blocks`` leading computed blocks, those a window still reads for the next token
    (vLLM skips ``computed - window + 1`` tokens)."""
    return blocks - max(0, blocks * BLOCK - SLIDING_WINDOW + 1) // BLOCK


def moved_layer_blocks(case: Case, prompt: list[int]) -> int:
    """Blocks (of one layer each) a decode worker reads from the store: a full-attention
    layer's every loaded block, a windowed layer's only those its window needs for the
    first token the decode worker computes."""
    full, windowed = layers_by_kind(case)
    loaded = loaded_tokens(prompt) // BLOCK
    return full * loaded + windowed * window_blocks(loaded)


def stored_layer_blocks(case: Case, prompt: list[int]) -> int:
    """Blocks (of one layer each) the prefill worker stores: a full-attention layer's every
    full block, a windowed layer's those a hit of every full block, or of one fewer (a
    reader of the same prompt), reads."""
    full, windowed = layers_by_kind(case)
    blocks = len(prompt) // BLOCK
    return full * blocks + windowed * (window_blocks(blocks - 1) + 1)


def layer_block_bytes(case: Case) -> int:
    """One block of one layer: K and V, KV heads x head size (a draft's layers alike)."""
    spec = SIZES[case.size]
    if case.draft:
        draft = SIZES[case.draft]
        assert (draft.num_kv_heads, draft.hidden_size // draft.num_heads) == (spec.num_kv_heads,
                                                                              spec.hidden_size // spec.num_heads)
    return spec.num_kv_heads * BLOCK * 2 * (spec.hidden_size // spec.num_heads) * case.dtype_bytes


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tiny_model, family_model, tmp_path_factory):
    name = request.param
    case = CASES[name]
    model = tiny_model if case.size == "tiny" else family_model(case.size)
    speculative = () if case.draft is None else ("--speculative-config", json.dumps(
        {"method": "draft_model", "model": family_model(case.draft), "num_speculative_tokens": 3}))
    try:
        reference = reference_table(model, PROMPTS + ([LOOPING] if name == "ngram" else []), case.max_tokens,
                                    BLOCK, tmp_path_factory.mktemp(f"colocated-{name}"),
                                    engine_args=case.engine_args)
    except RuntimeError as e:
        if name == "fp8":  # where the CPU backend has no fp8 KV cache: the engine's own reason
            pytest.skip(f"vLLM's CPU backend refused --kv-cache-dtype fp8: {str(e)[-1500:]}")
        raise
    with LocalCluster(model=model, served_model_name=name, block_size=BLOCK,
                      store_capacity_bytes=64 << 20, decode_local_cache=False,
                      worker_args=case.engine_args + speculative, role_args={"decode": case.decode_args},
                      router_args=("--max-local-prefill-tokens", "0", "--max-decode-prefill-tokens", "0"),
                      allow_fault_injection=True, run_dir=tmp_path_factory.mktemp(f"run-{name}")) as c:
        yield name, c, reference


def _complete(cluster, size, prompt) -> dict:
    body = {"model": size, "prompt": prompt, "max_tokens": CASES[size].max_tokens, "temperature": 0,
            "return_token_ids": True}
    r = httpx.post(cluster.router_url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_tokens_through_the_store_equal_colocated(family):
    size, cluster, reference = family
    with StoreClient(cluster.store_address, secret=cluster.secret) as store:
        store.drop()
        for prompt in PROMPTS:
            r = _complete(cluster, size, prompt)
            assert r["choices"][0]["token_ids"] == reference[tuple(prompt)], f"{size}, prompt of {len(prompt)}"
            assert r["kvmesh"]["prefix_tokens_from_store"]["decode"] == loaded_tokens(prompt)
            assert r["kvmesh"]["kv_load_failed_tokens"] == 0
        store.drop()


def _saves_settled(store, timeout_s: float = 10.0, quiet_s: float = 0.5) -> int:
    """The store's block count once it has stayed the same for ``quiet_s`` (at most
    ``timeout_s``): a decode worker saves a finished request's generated blocks after it
    sent its last token, which must land before the next prompt's count starts."""
    deadline = time.monotonic() + timeout_s
    last, since = store.stats().blocks, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = store.stats().blocks
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"the store's block count kept changing for {timeout_s} s")


def test_bytes_stored_and_moved_are_the_blocks_the_cache_needs(family):
    size, cluster, reference = family
    case = CASES[size]
    with StoreClient(cluster.store_address, secret=cluster.secret) as store:
        for prompt in PROMPTS:
            store.drop()
            stored = []
            tokens, out = asyncio.run(prefill_then_decode(
                cluster.prefill_address, cluster.decode_address, prompt, CASES[size].max_tokens,
                lambda: stored.append(store.stats().blocks), secret=cluster.secret))
            assert tokens == reference[tuple(prompt)]
            assert out.tokens_from_store == loaded_tokens(prompt) and out.tokens_load_failed == 0
            assert stored == [stored_layer_blocks(case, prompt)], f"{size}, prompt of {len(prompt)}"
            assert out.kv_bytes == moved_layer_blocks(case, prompt) * layer_block_bytes(case), \
                f"{size}, prompt of {len(prompt)}"
            assert _saves_settled(store) >= stored[0]
        store.drop()
    full, windowed = layers_by_kind(case)
    if windowed:  # the window kept most of the long prompt's blocks of those layers out
        blocks = len(PROMPTS[-1]) // BLOCK
        assert window_blocks(loaded_tokens(PROMPTS[-1]) // BLOCK) == 2 and window_blocks(blocks - 1) + 1 == 3
        assert stored_layer_blocks(case, PROMPTS[-1]) == (full + windowed) * blocks - windowed * 6


def test_negative_control_noise_changes_outputs(family):
    size, cluster, reference = family
    with StoreClient(cluster.store_address, secret=cluster.secret) as store:
        for prompt in PROMPTS[1:]:
            store.drop()
            tokens, out = asyncio.run(prefill_then_decode(
                cluster.prefill_address, cluster.decode_address, prompt, CASES[size].max_tokens,
                lambda: store.inject_fault("noise"), secret=cluster.secret))
            assert out.tokens_from_store > 0 and out.tokens_load_failed == 0
            assert tokens != reference[tuple(prompt)], f"{size}, prompt of {len(prompt)}"
        store.drop()


def test_blocks_that_fail_their_checksum_are_recomputed(family):
    """Every stored block damaged after the prefill (its checksum no longer matches): the
    decode worker reports the load failed and computes the prompt itself, with the
    colocated tokens. With a windowed KV-cache group (sliding, hybrid) the load runs
    outside the engine steps and vLLM recomputes the whole request: recomputed from the
    failed block on, the window would read the blocks before it, never loaded."""
    size, cluster, reference = family
    prompt = PROMPTS[1]
    with StoreClient(cluster.store_address, secret=cluster.secret) as store:
        store.drop()
        tokens, out = asyncio.run(prefill_then_decode(
            cluster.prefill_address, cluster.decode_address, prompt, CASES[size].max_tokens,
            lambda: store.inject_fault("flip"), secret=cluster.secret))
        store.drop()
    assert out.tokens_load_failed == loaded_tokens(prompt) > 0
    assert tokens == reference[tuple(prompt)], size


def test_speculative_decoding_accepts_drafts_and_reports_its_acceptance(family):
    """The speculative decode worker has drafts accepted, gives the tokens of
    non-speculative colocated greedy decoding, and its health reports the acceptance rate
    and tokens per step. n-gram drafts come from the context (``prompt_lookup_min`` 1: the
    last token seen earlier), on a prompt whose greedy continuation repeats pairs of tokens
    it saw before (``LOOPING``); the draft model's (tiny's first layers) from its own
    forward pass over the draft KV it loaded, on the repeated pattern (``PROMPTS[1]``),
    whose continuation it partly agrees with (6 of 54 draft tokens colocated), as many
    as when it computes the prompt itself."""
    size, cluster, reference = family
    if size not in SPECULATIVE:
        pytest.skip("the speculative cases only")
    from kvmesh.router.workers import WorkerClient

    async def stats():
        client = WorkerClient(cluster.decode_address, cluster.secret)
        try:
            reply = await client.health()
        finally:
            await client.close()
        assert json.loads(reply.engine_config)["speculative_method"] == SPECULATIVE[size]
        return json.loads(reply.engine_stats)
    before = asyncio.run(stats())
    prompt = LOOPING if size == "ngram" else PROMPTS[1]
    r = _complete(cluster, size, prompt)
    assert r["choices"][0]["token_ids"] == reference[tuple(prompt)]
    assert r["kvmesh"]["prefix_tokens_from_store"]["decode"] == loaded_tokens(prompt) > 0
    after = asyncio.run(stats())
    assert after["spec_accepted_tokens"] > before["spec_accepted_tokens"]
    assert after["spec_drafts"] > 0 and after["spec_draft_tokens"] >= after["spec_drafts"]
    assert after["spec_acceptance_rate"] == after["spec_accepted_tokens"] / after["spec_draft_tokens"]
    assert after["spec_tokens_per_step"] == 1 + after["spec_accepted_tokens"] / after["spec_drafts"]
    if size == "draft":
        # The draft read the prompt's draft KV from the store: it accepts as many tokens as
        # when the decode worker computes the prompt itself (the store emptied first).
        # With that KV left at zeros the draft's acceptance fell to 1 of 66 draft tokens
        # on this prompt, from 6 of 54 (colocated, vLLM's prefix cache, zeroed by hand).
        with StoreClient(cluster.store_address, secret=cluster.secret) as store:
            tokens, out = asyncio.run(prefill_then_decode(
                cluster.prefill_address, cluster.decode_address, prompt, CASES[size].max_tokens,
                store.drop, secret=cluster.secret))
        computed = asyncio.run(stats())
        assert out.tokens_from_store == 0 and tokens == reference[tuple(prompt)]
        assert (after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
                == computed["spec_accepted_tokens"] - after["spec_accepted_tokens"])


def test_a_decode_worker_of_other_weights_or_kv_dtype_never_loads_the_prefill_worker_s_blocks(
        tiny_model, tmp_path_factory):
    """The prefill worker runs tiny; two decode workers, served under the same name, run
    tiny made with another seed (the same architecture, safetensors header and file
    sizes: only the weights differ, so this covers models of other architectures too,
    whose layout fingerprints differ in more) and tiny with an fp8 KV cache. Neither
    finds any of the prefill worker's blocks: each computes the prompt itself and gives
    its own colocated tokens."""
    from kvmesh.cluster.models import make_model

    other_weights = str(make_model(tmp_path_factory.mktemp("models") / "tiny-seed1", "tiny", seed=1))
    fp8 = ("--kv-cache-dtype", "fp8")
    # (the decode worker's flags, its colocated run's model and engine flags); vLLM's
    # parser: the last --model wins
    decoders = {"weights": (("--model", other_weights), other_weights, ()), "kv dtype": (fp8, tiny_model, fp8)}
    prompt = PROMPTS[-1]
    references = {differs: reference_table(model, [prompt], MAX_TOKENS, BLOCK,
                                           tmp_path_factory.mktemp("colocated-mix"), engine_args=args)
                  for differs, (_, model, args) in decoders.items()}
    with LocalCluster(model=tiny_model, served_model_name="mixed", block_size=BLOCK,
                      store_capacity_bytes=64 << 20, decode_local_cache=False,
                      decode_workers=len(decoders), decode_worker_args=tuple(d[0] for d in decoders.values()),
                      run_dir=tmp_path_factory.mktemp("run-mixed")) as cluster:
        with StoreClient(cluster.store_address, secret=cluster.secret) as store:
            for differs, address in zip(decoders, cluster.decode_addresses):
                store.drop()
                stored = []
                tokens, out = asyncio.run(prefill_then_decode(
                    cluster.prefill_address, address, prompt, MAX_TOKENS,
                    lambda: stored.append(store.stats().blocks), secret=cluster.secret))
                # the prefill worker saved the prompt's 9 full blocks, each layer of tiny's 4 a block
                assert stored == [len(prompt) // BLOCK * SIZES["tiny"].num_layers], differs
                assert out.tokens_from_store == 0 and out.kv_bytes == 0, differs
                assert tokens == references[differs][tuple(prompt)], differs


def test_engines_with_the_connector_keep_their_kv_cache_groups(
        tiny_model, family_model, tmp_path):
    """Real engines with kvmesh's connector (its store unreachable: every lookup is a miss,
    which the connector survives). vLLM keeps its hybrid allocator for the hybrid model
    (the connector declares ``SupportsHMA``): a full-attention and a windowed group; with
    the allocator turned off, one full-attention group. A draft model's speculative
    decoding puts the draft's layers in the target's group, and runs. (EAGLE, which the
    connector refuses, is refused by a worker's flag check before any engine starts:
    ``tests/unit/test_model_support.py``; no EAGLE head can be made here for an engine.)"""
    from tests.engine_probe import probe_models

    connector = {"kv_connector": "KvmeshConnector", "kv_connector_module_path": "kvmesh.engine_host.connector",
                 "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                 "kv_connector_extra_config": {"store_address": "127.0.0.1:1", "timeout_s": 0.5}}
    runs = [
        {"model": family_model("hybrid"), "kv_transfer_config": connector},
        {"model": family_model("sliding"), "kv_transfer_config": connector},
        {"model": family_model("hybrid"), "kv_transfer_config": connector, "disable_hybrid_kv_cache_manager": True},
        {"model": tiny_model, "kv_transfer_config": connector, "speculative_config": {
            "method": "draft_model", "model": family_model("draft"), "num_speculative_tokens": 2}},
    ]
    out = probe_models(runs, [PROMPTS[0]], 4, tmp_path)
    groups = [sorted((g["kind"], g["layers"]) for g in o.get("groups", [])) for o in out]
    assert groups == [[("FullAttentionSpec", 2), ("SlidingWindowSpec", 2)], [("SlidingWindowSpec", 4)],
                      [("FullAttentionSpec", 4)], [("FullAttentionSpec", 4 + 2)]]
    assert all(len(o["tokens"][0]) == 4 for o in out)
