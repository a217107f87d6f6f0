"""What the connector reads from vLLM's configuration, once, for both of its sides.

From ``kv_connector_extra_config`` the connector's own settings (listed in
``engine_host.connector``; the cluster secret only as the path of its file); from the engine the rest: whether this engine loads and
saves (its ``kv_role``), the block size, the keys' namespace (model id and cache layout),
a draft model's own namespace (``kv_store.keys.DraftSpace``: speculative decoding with a
draft model keeps the draft's KV in the same paged cache, carried like the target's)
and how the KV heads split over tensor-parallel ranks (keys carry head ranges, not ranks;
``engine_host.head_split``). The namespace holds nothing of the split, so a reader of any
split finds a writer's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmesh.engine_host import head_split
from kvmesh.engine_host.settings import LAYERWISE_DEFAULT
from kvmesh.kv_store.auth import load_secret
from kvmesh.kv_store.client import StoreClient
from kvmesh.kv_store.keys import DraftSpace, KeySpace, namespace

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig



def _flag(value) -> bool:
    """A boolean from JSON or from a string ("false", "0", "no" and "off" are False)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def architecture_digest(hf_config) -> str:
    """A short digest of a model's Hugging Face configuration (its architecture: layers,
    heads, windows, ...), without what differs between copies of the same model (the
    directory it was loaded from, the library version that wrote it)."""
    import hashlib
    import json

    fields = {k: v for k, v in hf_config.to_dict().items()
              if not k.startswith("_") and k != "transformers_version"}
    return hashlib.blake2b(json.dumps(fields, sort_keys=True, default=str).encode(),
                           digest_size=6).hexdigest()


SAMPLES_PER_FILE = 16    # of each weights file's tensor bytes, evenly spaced
SAMPLE_BYTES = 4096


def weights_digest(model: str, revision: str | None = None) -> str:
    """A short digest of which weights a model directory holds, read cheaply (never the
    whole weights): the snapshot revision when the directory is a Hugging Face cache
    snapshot (``.../snapshots/<revision>``); for another directory, for each
    ``*.safetensors`` file, its name, size, header (tensor names, dtypes, shapes,
    offsets) and ``SAMPLES_PER_FILE`` samples of ``SAMPLE_BYTES`` of its tensor bytes,
    evenly spaced (1 MiB at most per file read here). Two copies of one model agree;
    two trainings or seeds of one architecture differ (unless they differ only in bytes
    no sample reads, such as a fine-tune of a few tensors: serve those under different
    model ids). A model given by hub id without a local directory: ``revision``, or
    "unversioned"."""
    import hashlib
    import struct
    from pathlib import Path

    path = Path(model)
    if path.parent.name == "snapshots":
        return "rev-" + path.name
    if not path.is_dir():
        return "rev-" + revision if revision else "unversioned"
    digest = hashlib.blake2b(digest_size=6)
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}\x00{size}\x00".encode())
        with open(file, "rb") as f:
            raw = f.read(8)
            header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            digest.update(f.read(header_len))
            start = 8 + header_len
            span = max(0, size - start - SAMPLE_BYTES)
            for i in range(SAMPLES_PER_FILE):
                f.seek(start + span * i // max(1, SAMPLES_PER_FILE - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return "w-" + digest.hexdigest()


def layout_fingerprint(vllm_config: "VllmConfig", model: "ModelConfig | None" = None) -> str:
    """What must match for a block's bytes to mean the same thing to another worker: the
    platform's cache layout, the KV dtype (fp8 is not bf16), block and head size, the
    model's architecture (two models that differ in heads, layers or attention windows
    never share blocks, even served under one name) and its weights (``weights_digest``:
    two models of one architecture with different weights never share blocks either).
    ``model``: another model of the engine than its target (a draft model)."""
    import torch
    from vllm.platforms import current_platform

    model = model or vllm_config.model_config
    cache = vllm_config.cache_config
    dtype = model.dtype if cache.cache_dtype == "auto" else cache.cache_dtype
    device = current_platform.device_type
    if device == "cpu":  # the CPU kernels pack K by instruction set
        device += "-" + torch.backends.cpu.get_cpu_capability()
    return (f"{device}|{dtype}|bs{cache.block_size}|hd{model.get_head_size()}"
            f"|arch-{architecture_digest(model.hf_config)}|{weights_digest(model.model, model.revision)}")


def draft_space(vllm_config: "VllmConfig") -> DraftSpace | None:
    """Where the engine's draft model keys its layers (``DraftSpace``: numbered after the
    target's, in the draft's own namespace, all its KV heads), or None without one.
    A draft with tensor parallelism is refused before this (``model_support``)."""
    spec = vllm_config.speculative_config
    if spec is None or not spec.uses_draft_model():
        return None
    draft = spec.draft_model_config
    return DraftSpace(vllm_config.model_config.get_total_num_hidden_layers(),
                      namespace(draft.model, layout_fingerprint(vllm_config, draft)),
                      (0, draft.get_total_num_kv_heads()))


@dataclass(frozen=True)
class ConnectorSettings:
    store_address: str
    timeout_s: float                    # per store call and per step's load
    transfer_preference: tuple[str, ...]
    can_load: bool                      # a KV consumer (kv_consumer, kv_both)
    can_save: bool                      # a KV producer (kv_producer, kv_both)
    block_size: int
    namespace: bytes
    total_heads: int                    # KV heads of the whole model
    heads_per_rank: int                 # this engine's shard size (head_split)
    tensor_parallel_size: int
    num_layers: int
    cluster_secret_file: str | None = None  # None: the environment's (``kv_store.auth``)
    draft: DraftSpace | None = None     # a draft model's layers (numbered from num_layers)

    def store_client(self) -> StoreClient:
        """A client of the store that carries the cluster secret (read here, in this
        process, from ``cluster_secret_file`` or the environment; never from vLLM's
        configuration, which vLLM logs)."""
        return StoreClient(self.store_address, timeout_s=self.timeout_s,
                           secret=load_secret(self.cluster_secret_file))
    layerwise: bool = LAYERWISE_DEFAULT

    @classmethod
    def from_vllm_config(cls, vllm_config: "VllmConfig") -> "ConnectorSettings":
        """Raises ``ValueError`` when ``store_address`` is missing."""
        cfg = vllm_config.kv_transfer_config
        extra = cfg.kv_connector_extra_config or {}
        if "store_address" not in extra:
            raise ValueError("KvmeshConnector needs kv_connector_extra_config['store_address']")
        model = vllm_config.model_config
        total_heads = model.get_total_num_kv_heads()
        tp = vllm_config.parallel_config.tensor_parallel_size
        return cls(
            store_address=extra["store_address"],
            timeout_s=float(extra.get("timeout_s", 5.0)),
            transfer_preference=tuple(str(extra.get("transfer_preference", "shm,nixl,grpc")).split(",")),
            can_load=cfg.is_kv_consumer,
            can_save=cfg.is_kv_producer,
            block_size=vllm_config.cache_config.block_size,
            namespace=namespace(str(extra.get("model_id") or model.model), layout_fingerprint(vllm_config)),
            total_heads=total_heads,
            heads_per_rank=head_split.shard_size(total_heads, tp),
            tensor_parallel_size=tp,
            num_layers=model.get_total_num_hidden_layers(),
            cluster_secret_file=extra.get("cluster_secret_file") or None,
            layerwise=_flag(extra.get("layerwise", LAYERWISE_DEFAULT)),
            draft=draft_space(vllm_config),
        )

    def rank_space(self, rank: int) -> KeySpace:
        """The keys tensor-parallel rank ``rank`` writes (its shard): its KV heads' range."""
        return KeySpace(self.namespace, head_split.rank_heads(rank, self.tensor_parallel_size,
                                                              self.total_heads), self.draft)

    def rank_writes(self, rank: int) -> bool:
        """Whether ``rank`` stores its shard (a replicated head is stored by one rank)."""
        return head_split.rank_writes(rank, self.tensor_parallel_size, self.total_heads)

    def split_spaces(self, size: int) -> list[KeySpace]:
        """The key spaces of every shard of shard size ``size``: together, all KV heads."""
        return [KeySpace(self.namespace, heads, self.draft) for heads in head_split.shards(self.total_heads, size)]

    def lookup_sizes(self) -> list[int]:
        """The shard sizes a reader looks for, this engine's own first."""
        return head_split.shard_sizes(self.total_heads, self.heads_per_rank)
