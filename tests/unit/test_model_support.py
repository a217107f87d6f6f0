"""What the connector cannot carry is refused at start-up with a message naming the model
and the option: from the engine flags (before a model is loaded) and from the engine's
KV-cache configuration (the connector's constructor). vLLM's own spec types are used
unchanged; no engine runs here (tests/e2e/test_model_families.py starts real ones)."""

from __future__ import annotations

import json

import pytest
import torch

from kvmesh.engine_host.engine_args import EngineArgsError, check_engine_args
from kvmesh.engine_host.metadata import BlockTransfer, skip_null_blocks
from kvmesh.engine_host.model_support import UnsupportedModel, check_kv_cache


@pytest.mark.parametrize("flags,named", [
    (["--speculative-config", json.dumps({"method": "eagle3", "model": "/e", "num_speculative_tokens": 2})],
     "'eagle3'"),
    (["--kv-cache-dtype", "int8_per_token_head"], "'int8_per_token_head'"),
    (["--kv-cache-dtype", "turboquant_k8v4"], "'turboquant_k8v4'"),
])
def test_worker_flags_the_connector_cannot_carry_are_refused_naming_model_and_option(flags, named):
    with pytest.raises(EngineArgsError) as e:
        check_engine_args(["--model", "/models/m", *flags], "decode")
    assert "kvmesh cannot serve /models/m" in str(e.value) and named in str(e.value)


@pytest.mark.parametrize("flags", [
    [],
    ["--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})],
    ["--speculative-config", json.dumps({"method": "draft_model", "model": "/d", "num_speculative_tokens": 2})],
    ["--speculative-config", json.dumps({"model": "/d", "num_speculative_tokens": 2})],
    ["--kv-cache-dtype", "fp8"],
    ["--kv-cache-dtype", "fp8_e5m2"],
    ["--disable-hybrid-kv-cache-manager"],
    ["--no-disable-hybrid-kv-cache-manager"],
])
def test_what_the_connector_carries_is_taken(flags):
    check_engine_args(["--model", "/models/m", *flags], "decode")


def _spec(kind, **extra):
    from vllm.v1 import kv_cache_interface as k

    if kind == "MambaSpec":
        return k.MambaSpec(block_size=32, shapes=((4, 4),), dtypes=(torch.float32,))
    return getattr(k, kind)(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.bfloat16, **extra)


def _config(*specs):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    return KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn"], spec) for i, spec in enumerate(specs)])


def test_groups_of_full_or_windowed_attention_are_carried():
    check_kv_cache("m", _config(_spec("FullAttentionSpec")))
    check_kv_cache("m", _config(_spec("FullAttentionSpec", sliding_window=64)))  # hybrid, collapsed
    check_kv_cache("m", _config(_spec("SlidingWindowSpec", sliding_window=64)))
    check_kv_cache("m", _config(_spec("SlidingWindowSpec", sliding_window=64), _spec("FullAttentionSpec")))
    check_kv_cache("m", None)


@pytest.mark.parametrize("specs,named", [
    ((("SlidingWindowSpec", {"sliding_window": 64}), ("MambaSpec", {})), "MambaSpec"),
    ((("MambaSpec", {}),), "MambaSpec"),
    ((("MLAAttentionSpec", {}),), "MLAAttentionSpec"),
    ((("ChunkedLocalAttentionSpec", {"attention_chunk_size": 64}),), "ChunkedLocalAttentionSpec"),
])
def test_kv_caches_the_connector_cannot_carry_are_refused(specs, named):
    with pytest.raises(UnsupportedModel) as e:
        check_kv_cache("/models/hybrid", _config(*(_spec(kind, **extra) for kind, extra in specs)))
    assert "kvmesh cannot serve /models/hybrid" in str(e.value) and named in str(e.value)


def test_null_blocks_of_a_window_are_neither_saved_nor_loaded():
    """vLLM's block pool hands out block 0 as its null block, which a sliding-window group
    points the blocks that left the window at."""
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=4, enable_caching=False, hash_block_size=32)
    assert pool.null_block.block_id == 0 and pool.null_block.is_null

    h = [bytes([i]) * 16 for i in range(5)]
    assert skip_null_blocks(BlockTransfer("r", [7, 8], h[:2])) == BlockTransfer("r", [7, 8], h[:2])
    assert skip_null_blocks(BlockTransfer("r", [0, 0, 0, 5, 6], h, None)) == BlockTransfer("r", [5, 6], h[3:], h[2])
    assert skip_null_blocks(BlockTransfer("r", [0, 0], h[:2], b"p" * 16)) is None


def test_the_layout_fingerprint_tells_architectures_apart_but_not_copies_of_one():
    from transformers import LlamaConfig, MistralConfig

    from kvmesh.engine_host.connector_settings import architecture_digest

    shape = dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=4, vocab_size=1024)
    llama = architecture_digest(LlamaConfig(**shape, num_key_value_heads=2))
    copy = LlamaConfig(**shape, num_key_value_heads=2)
    copy._name_or_path = "/elsewhere/model"  # the same model, loaded from another directory
    assert architecture_digest(copy) == llama
    others = {architecture_digest(LlamaConfig(**shape, num_key_value_heads=1)),
              architecture_digest(MistralConfig(**shape, num_key_value_heads=2, sliding_window=64)),
              architecture_digest(MistralConfig(**shape, num_key_value_heads=2, sliding_window=128))}
    assert len(others) == 3 and llama not in others


def test_speculative_totals_add_vllm_s_step_stats_into_rates():
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    from kvmesh.engine_host.engine_stats import EngineStats

    stats = EngineStats()
    totals = stats.spec
    assert totals.summary()["spec_acceptance_rate"] is None and totals.summary()["spec_drafts"] == 0
    logger = stats.stat_logger(vllm_config=None)
    for drafts, proposed, accepted in ((2, 6, 3), (1, 3, 0)):
        step = SpecDecodingStats.new(num_spec_tokens=3)
        step.num_drafts, step.num_draft_tokens, step.num_accepted_tokens = drafts, proposed, accepted
        logger.record(type("SchedulerStats", (), {"spec_decoding_stats": step, "kv_cache_usage": 0.0})(), None)
    logger.record(None, None)
    assert totals.summary() == {"spec_drafts": 3, "spec_draft_tokens": 9, "spec_accepted_tokens": 3,
                                "spec_acceptance_rate": 3 / 9, "spec_tokens_per_step": 2.0}


def test_the_weights_digest_tells_seeds_apart_but_not_copies_of_one(tmp_path):
    """Two generated models of one size and different seeds (the same architecture, the
    same safetensors header and size) differ; a copy of one agrees; a cache snapshot is
    named by its revision."""
    import shutil

    from kvmesh.cluster.models import make_model
    from kvmesh.engine_host.connector_settings import architecture_digest, weights_digest

    a, b = make_model(tmp_path / "a", "mqa", seed=0), make_model(tmp_path / "b", "mqa", seed=1)
    copy = shutil.copytree(a, tmp_path / "copy")
    from transformers import AutoConfig

    assert architecture_digest(AutoConfig.from_pretrained(a)) == architecture_digest(AutoConfig.from_pretrained(b))
    assert weights_digest(str(a)) == weights_digest(str(copy)) != weights_digest(str(b))
    assert weights_digest("/cache/models--org--m/snapshots/abc123") == "rev-abc123"
    assert weights_digest("org/m", "v2") == "rev-v2" and weights_digest("org/m") == "unversioned"
