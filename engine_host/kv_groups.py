"""The engine's KV-cache groups, as the connector sees them (both of its sides).

vLLM's hybrid allocator gives each kind of attention layer a group of its own, each with
its own block table: a Gemma-3 model has a full-attention group and a sliding-window
group, and a request's block ``i`` sits at different block ids in each. A model of one
kind (or any model with the hybrid allocator off) has one group.

``KvGroup.first_needed`` is vLLM's own rule (``SlidingWindowManager.get_num_skipped_tokens``)
for which leading blocks a windowed group no longer reads once a number of tokens are
computed: vLLM points those at its null block, so the connector neither loads them nor
asks the store for them, and saves only the blocks a window still needs.

Keys need no group of their own: a block's key names its layer (``kv_store.keys``), a
layer belongs to exactly one group, and the namespace names the architecture, so the
layer tells the group apart. A block's bytes for one layer are the same whichever
allocator the engine runs.

A draft model of speculative decoding has its attention layers in the same KV-cache
config (vLLM names them ``draft_model.<its own layer name>``), in a group with the
target's layers of their kind. ``layer_id`` numbers them after the target's layers, so
every layer of the engine has an id of its own; the keys put those in the draft's
namespace (``kv_store.keys.DraftSpace``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclass(frozen=True)
class KvGroup:
    layers: tuple[int, ...]            # the model's layer indices in this group
    layer_names: tuple[str, ...] = ()  # vLLM's names of those layers (empty: unknown)
    window: int | None = None          # tokens a layer attends to; None: every token
    retained: int = 0                  # tokens kept below the window (vLLM's extra_retained_tokens)

    def first_needed(self, blocks: int, block_size: int) -> int:
        """The first of ``blocks`` leading blocks this group still reads when those blocks'
        tokens are computed (0 for full attention)."""
        if self.window is None:
            return 0
        return max(0, blocks * block_size - self.window + 1 - self.retained) // block_size


DRAFT_PREFIX = "draft_model."  # vLLM's prefix of a draft model's layer names


def layer_id(name: str, num_layers: int) -> int:
    """The id of vLLM's layer ``name`` in an engine whose target model has ``num_layers``
    layers: a target layer's index, or ``num_layers`` plus a draft model layer's index."""
    from vllm.model_executor.models.utils import extract_layer_index

    if name.startswith(DRAFT_PREFIX):
        return num_layers + extract_layer_index(name[len(DRAFT_PREFIX):])
    return extract_layer_index(name)


def kv_groups(kv_cache_config: "KVCacheConfig | None", num_layers: int) -> tuple[KvGroup, ...]:
    """The groups of ``kv_cache_config`` in vLLM's order (a request's block ids come as one
    list per group, in that order), layers by ``layer_id`` (the target model has
    ``num_layers``); without a config, one full-attention group of ``num_layers`` layers."""
    if kv_cache_config is None:
        return (KvGroup(tuple(range(num_layers))),)
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    groups = []
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        windowed = isinstance(spec, SlidingWindowSpec)
        groups.append(KvGroup(tuple(layer_id(n, num_layers) for n in group.layer_names), tuple(group.layer_names),
                              spec.sliding_window if windowed else None,
                              getattr(spec, "extra_retained_tokens", 0) if windowed else 0))
    return tuple(groups)
