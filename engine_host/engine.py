"""Building the vLLM engine of a worker, with the kvmesh connector in the worker's role."""

from __future__ import annotations

import os

from kvmesh.engine_host.engine_args import parse_engine_args
from kvmesh.engine_host.settings import WorkerSettings

KV_ROLES = {
    # Prefill workers load cached prefixes from the store and save what they compute.
    "prefill": "kv_both",
    # Decode workers load the prompt's KV, compute only what the store lacks, and save
    # what they computed (the prompt's rest, the generated tokens) for the next turn.
    "decode": "kv_both",
}
CONNECTOR_MODULE = "kvmesh.engine_host.connector"


def engine_args(settings: WorkerSettings):
    """vLLM ``AsyncEngineArgs`` for a worker: its engine arguments (vLLM's parser, kvmesh's
    refusals) plus our connector in the worker's role, with load errors recomputed.
    Raises ``EngineArgsError`` for engine arguments kvmesh cannot take."""
    from vllm.config import KVTransferConfig

    args = parse_engine_args(settings.engine_args, settings.role)
    transfer = KVTransferConfig(
        kv_connector="KvmeshConnector",
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role=KV_ROLES[settings.role],
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={
            "store_address": settings.store,
            "model_id": settings.model_id or args.model,
            "timeout_s": settings.store_timeout,
            "transfer_preference": ",".join(settings.transfer_preference),
            # the path only: the connector reads the secret itself (or the environment's)
            "cluster_secret_file": settings.cluster_secret_file,
            "layerwise": settings.layerwise,
        },
    )
    args.kv_transfer_config = transfer
    return args


def prepare_environment(settings: WorkerSettings) -> None:
    """Environment vLLM reads at start-up; values the user already set are kept."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))


def build_engine(settings: WorkerSettings, stat_loggers=None):
    """Start an AsyncLLM (with vLLM ``stat_loggers`` factories besides its own); the caller
    shuts it down (``engine.shutdown()``)."""
    prepare_environment(settings)
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(engine_args(settings), stat_loggers=stat_loggers)
