"""What the kvmesh connector can carry through the store, and the refusal of the rest.

A model or engine option whose KV the connector would move wrongly is refused when the
engine starts (``UnsupportedModel``, a ``ValueError`` whose message names the model, the
option and what to do instead), never served with wrong tokens. ``check_engine_options``
refuses what the engine arguments already show, before any model is loaded (a worker
checks its flags with it); ``check_kv_cache`` refuses what only the engine's KV-cache
configuration shows, in the connector's constructor (both of its sides), whoever started
the engine.

Carried today:

* **KV-cache groups**: any number, each of full attention (any number of KV heads: GQA,
  MQA, MHA) or of a sliding window, all of one block size. A model with windowed and
  full-attention layers (Gemma-2/3, Llama-4 local/global) keeps vLLM's hybrid allocator
  (the connector declares ``SupportsHMA``): a full-attention group and a windowed group,
  each moved with its own block table, the windowed one only the blocks its window
  still reads (``engine_host.kv_groups``). With the allocator off
  (``--disable-hybrid-kv-cache-manager``) such a model has one full-attention group that
  keeps every block, which is carried as well. Group kinds whose blocks are not per-head
  attention KV (Mamba state, MLA latents, chunked local attention, layers whose shapes
  differ inside a group) and groups of different block sizes are refused.
* **Speculative decoding**: ``ngram`` (it proposes from the tokens: the cache holds the
  target model's KV alone) and ``draft_model`` (a draft model's attention layers share
  the target's paged cache and block tables; the connector carries the draft's blocks
  beside the target's, keyed in the draft's own namespace, ``kv_store.keys.DraftSpace``,
  so a decode worker's draft reads the prompt's draft KV from the store as its target
  reads the target's). A draft model with tensor parallelism above 1 is refused (the
  draft's KV heads would split in a way the keys do not name). Methods whose draft
  reads the target's hidden states (EAGLE, EAGLE-3, MTP, Medusa, ...) are refused: their
  draft KV is computed from hidden states the store does not carry.
* **KV-cache dtypes**: the model's own (``auto``, ``bfloat16``, ``float16``) and fp8
  with per-tensor scales (``fp8``, ``fp8_e4m3``, ``fp8_e5m2``): a block's bytes are
  copied as they are and the layout fingerprint names the dtype, so blocks of two dtypes
  never mix. Dtypes with scales computed at run time (per token and head), other
  quantized formats and layers kept in another dtype (``kv_cache_dtype_skip_layers``)
  are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

SPECULATIVE_METHODS = ("ngram", "draft_model")
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")


class UnsupportedModel(ValueError):
    """A model or engine option the kvmesh connector cannot carry; the message says which."""


def speculative_refusal(method: str | None) -> str | None:
    """Why a speculative-decoding ``method`` cannot be carried, or None when it can."""
    if method is None or method in SPECULATIVE_METHODS:
        return None
    return (f"speculative decoding method {method!r} is not one kvmesh carries through its "
            f"store (EAGLE-like drafts read the target's hidden states, which the store does not "
            f"hold); the methods carried are {', '.join(SPECULATIVE_METHODS)}")


def kv_dtype_refusal(cache_dtype: str) -> str | None:
    """Why a ``--kv-cache-dtype`` cannot be carried, or None when it can."""
    if cache_dtype in KV_CACHE_DTYPES:
        return None
    return (f"KV-cache dtype {cache_dtype!r} is not one kvmesh carries through its store "
            f"(carried: {', '.join(KV_CACHE_DTYPES)})")


def check_engine_options(model: str, cache_dtype: str, speculative: Any, skip_layers: Any = ()) -> None:
    """Refuse engine options the connector cannot carry (``UnsupportedModel``).

    ``speculative`` is vLLM's speculative config: a ``SpeculativeConfig``, the dict
    ``--speculative-config`` parses to, or None."""
    reasons = []
    method = speculative.get("method") if isinstance(speculative, dict) else getattr(speculative, "method", None)
    if isinstance(speculative, dict) and method is None and speculative.get("model"):
        method = "draft_model"  # vLLM's name for a draft given by model alone
    reasons.append(speculative_refusal(method))
    reasons.append(kv_dtype_refusal(cache_dtype))
    if skip_layers:
        reasons.append(f"kv_cache_dtype_skip_layers={list(skip_layers)} keeps some layers in "
                       "another dtype than the rest, which the layout fingerprint cannot name")
    reasons = [r for r in reasons if r]
    if reasons:
        raise UnsupportedModel(f"kvmesh cannot serve {model}: " + "; ".join(reasons))


def check_kv_cache(model: str, kv_cache_config: "KVCacheConfig | None") -> None:
    """Refuse a KV-cache configuration the connector cannot carry (``UnsupportedModel``):
    a group whose kind is not plain attention KV, or groups of different block sizes."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    if kv_cache_config is None:
        return
    groups = kv_cache_config.kv_cache_groups
    for group in groups:
        kind = type(group.kv_cache_spec).__name__
        if type(group.kv_cache_spec) not in (FullAttentionSpec, SlidingWindowSpec):
            raise UnsupportedModel(
                f"kvmesh cannot serve {model}: its KV-cache group of kind {kind} (layers "
                f"{', '.join(group.layer_names[:3])}{' ...' if len(group.layer_names) > 3 else ''}) "
                "is not per-head attention KV that kvmesh's connector carries")
    sizes = sorted({g.kv_cache_spec.block_size for g in groups})
    if len(sizes) > 1:
        raise UnsupportedModel(
            f"kvmesh cannot serve {model}: its KV-cache groups have different block sizes "
            f"({', '.join(map(str, sizes))}), and kvmesh's keys cover one block size")


def check_vllm_config(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> None:
    """Both checks on a configured engine (the connector's constructor)."""
    model = vllm_config.model_config.model
    cache = vllm_config.cache_config
    speculative = vllm_config.speculative_config
    check_engine_options(model, cache.cache_dtype, speculative, skip_layers=cache.kv_cache_dtype_skip_layers)
    if (speculative is not None and speculative.uses_draft_model()
            and vllm_config.parallel_config.tensor_parallel_size > 1):
        raise UnsupportedModel(f"kvmesh cannot serve {model}: a draft model "
                               f"({speculative.draft_model_config.model}) with tensor parallelism "
                               "above 1, whose KV-head split kvmesh's keys do not name")
    check_kv_cache(model, kv_cache_config)
