"""Building the vLLM engine of a worker, with the kvmesh connector in the worker's role."""

from __future__ import annotations

import os
from dataclasses import dataclass

KV_ROLES = {
    # Prefill workers load cached prefixes from the store and save what they compute.
    "prefill": "kv_both",
    # Decode workers load the prompt's KV and compute only what the store lacks.
    "decode": "kv_consumer",
}


@dataclass(frozen=True)
class EngineSettings:
    model: str
    role: str
    store_address: str
    model_id: str | None = None
    block_size: int = 32
    max_model_len: int | None = None
    kv_cache_gib: int = 1
    store_timeout_s: float = 5.0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    local_prefix_cache: bool = False
    transfer_preference: str = "shm,nixl,grpc"

    def __post_init__(self) -> None:
        if self.role not in KV_ROLES:
            raise ValueError(f"unknown worker role {self.role!r}; choose one of {sorted(KV_ROLES)}")
        if self.block_size <= 0 or self.block_size % 32:
            raise ValueError("block_size must be a positive multiple of 32")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor and pipeline parallel sizes must be at least 1")


def base_engine_kwargs(settings: EngineSettings) -> dict:
    """Engine arguments a worker shares with a colocated vLLM run of the same model
    (everything but the KV connector), so that both compute the same tokens."""
    return dict(
        model=settings.model,
        block_size=settings.block_size,
        max_model_len=settings.max_model_len,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        # One rank: run it inside the engine-core process where vLLM allows it.
        distributed_executor_backend=(
            "uni" if settings.tensor_parallel_size * settings.pipeline_parallel_size == 1 else "mp"),
        enforce_eager=True,
        # By default the store is the prefix cache: every reuse goes through it, where it
        # is counted and shared by all workers. Decode workers behind KV-aware routing may
        # also keep vLLM's own.
        enable_prefix_caching=settings.local_prefix_cache,
    )


def engine_args(settings: EngineSettings):
    """vLLM ``AsyncEngineArgs`` for a worker: the base arguments plus our connector,
    with load errors recomputed."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    transfer = KVTransferConfig(
        kv_connector="KvmeshConnector",
        kv_connector_module_path="kvmesh.engine_host.connector",
        kv_role=KV_ROLES[settings.role],
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={
            "store_address": settings.store_address,
            "model_id": settings.model_id or settings.model,
            "timeout_s": settings.store_timeout_s,
            "transfer_preference": settings.transfer_preference,
        },
    )
    return AsyncEngineArgs(**base_engine_kwargs(settings), kv_transfer_config=transfer,
                           disable_log_stats=True)


def prepare_environment(settings: EngineSettings) -> None:
    """Environment vLLM reads at start-up; values the user already set are kept."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))


def build_engine(settings: EngineSettings):
    """Start an AsyncLLM; the caller shuts it down (``engine.shutdown()``)."""
    prepare_environment(settings)
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(engine_args(settings))
