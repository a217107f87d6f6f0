"""``PrefillSettings`` and ``DecodeSettings``: everything a worker is started with, defined once.

A worker's settings are kvmesh's own (where it listens, which store it uses, how it reads
from it) plus ``engine_args``: vLLM's own engine flags, passed through unchanged and read
by vLLM's own argument parser (``kvmesh.engine_host.engine_args``), so a vLLM user's
command line carries over (``--max-num-seqs 8 --num-gpu-blocks-override 512``). The model
is vLLM's ``--model``; the block size, context length and parallel sizes are vLLM's flags
too.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Optional

from pydantic import Field

from kvmesh.kv_store.settings_base import (
    DEFAULT_HOST, Address, Names, PortOrZero, Seconds, Settings, cluster_secret_file_field, one_of,
)
from kvmesh.kv_store.transfer import BACKENDS, DEFAULT_PREFERENCE


# Load each layer's KV just before its attention, the forward pass computing the layers
# before it meanwhile (True); or load every layer before the forward pass starts (False,
# for comparison). The worker setting ``layerwise`` and the connector's
# ``kv_connector_extra_config["layerwise"]``.
LAYERWISE_DEFAULT = True


class WorkerSettings(Settings):
    """A worker's own settings; ``role`` says which kind (a class attribute)."""

    role: ClassVar[str] = ""

    host: str = Field(DEFAULT_HOST, description="address the worker API binds")
    port: PortOrZero = Field(0, description="port of the worker API")
    store: Optional[Address] = Field(None, description=(
        "store address HOST:PORT (default with --index: a store on this host)"),
        json_schema_extra={"metavar": "HOST:PORT"})
    index: Optional[str] = Field(None, description=(
        "Redis block index: find the store there and announce this worker for discovery"),
        json_schema_extra={"metavar": "URL"})
    advertise: Optional[Address] = Field(None, description=(
        "address the router uses to reach this worker (default: --host:--port)"),
        json_schema_extra={"metavar": "HOST:PORT"})
    discovery_timeout: Seconds = Field(120.0, description="seconds to wait for a store to appear in the index")
    model_id: Optional[str] = Field(None, description=(
        "name that keys the model's blocks in the store (default: the model path)"))
    kv_cache_gib: int = Field(1, ge=1, description=(
        "CPU KV cache size in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE; a value the environment "
        "already sets wins; --num-gpu-blocks-override caps the blocks on any device)"))
    store_timeout: Seconds = Field(5.0, description="deadline of each store call and each step's load, in seconds")
    transfer_preference: Annotated[Names, one_of((*BACKENDS, "get"), "transfer backend")] = Field(
        DEFAULT_PREFERENCE, description=(
            "transfer backends to read the store with, best first; the first the store "
            "offers and this host can use wins (none usable, or get: the store's Get)"))
    max_requests: int = Field(512, ge=1, description=(
        "Generate calls served at once (running or waiting in the engine); more are "
        "refused with RESOURCE_EXHAUSTED"))
    cluster_secret_file: Optional[str] = cluster_secret_file_field()
    layerwise: bool = Field(LAYERWISE_DEFAULT, description=(
        "load each layer's KV from the store just before its attention, overlapping the "
        "load with compute (--no-layerwise: load every layer first, then compute)"))
    engine_args: tuple[str, ...] = Field((), description=(
        "vLLM engine arguments, as on vLLM's command line (--model DIR --max-num-seqs 8 ...)"),
        json_schema_extra={"cli": False})

    def engine_flag(self, name: str) -> str | None:
        """The value given to vLLM flag ``--name`` in ``engine_args`` (last one wins), or None."""
        flag = "--" + name.replace("_", "-")
        value = None
        args = list(self.engine_args)
        for i, arg in enumerate(args):
            head, eq, tail = arg.partition("=")
            if head.replace("_", "-") == flag:
                value = tail if eq else (args[i + 1] if i + 1 < len(args) else None)
        return value


class PrefillSettings(WorkerSettings):
    """A prefill worker: computes prompts' KV and saves it to the store (loading what the
    store already holds first)."""

    role: ClassVar[str] = "prefill"
    port: PortOrZero = Field(50061, description="port of the worker API")


class DecodeSettings(WorkerSettings):
    """A decode worker: loads a prompt's KV from the store and generates."""

    role: ClassVar[str] = "decode"
    port: PortOrZero = Field(50071, description="port of the worker API")


WORKER_SETTINGS: dict[str, type[WorkerSettings]] = {"prefill": PrefillSettings, "decode": DecodeSettings}
