"""The cluster config file: one YAML document describing a whole kvmesh deployment.

``load_config(path)`` reads and validates it into a ``ClusterConfig``; any problem
raises ``ConfigError`` whose message names the file and the field's YAML path
(``decode.tensor_parallel_size: ...``). Unknown keys are refused, sizes are strings
such as ``"2GiB"`` (or integers, in bytes) and ports are checked for range and clashes.

Layout (every key but ``model`` has a default; ``deploy/configs/`` holds examples)::

    model:    {path, served_name, model_id, block_size, max_model_len}
    prefill:  {replicas, port, tensor_parallel_size, pipeline_parallel_size,
               resources, resources_per_rank, engine: {...}, env}
    decode:   (as prefill)
    stores:   [{node_resource, port, host_bytes, disk_bytes, disk_dir, gpu_bytes,
                policy, page_bytes, direct_io, disk_write_behind_bytes, demote_ahead,
                metrics_port}]
    index:    redis://HOST:PORT/DB or null
    router:   {replicas, node_resource, host, http_port, grpc_port, api_token,
               api_token_env, routing, max_local_prefill_tokens, max_inflight,
               max_queue, queue_timeout_s, prefill_timeout_s, request_timeout_s}

Ports are fixed by the config, so a component that Ray restarts comes back on the same
address: worker replica ``i`` of a group listens on ``port + i``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from kvmesh.cluster.cli import parse_bytes


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


def _size(value: Any, *, zero_ok: bool) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB or 2GiB")
    if isinstance(value, int):
        if value < 0 or (value == 0 and not zero_ok):
            raise ValueError("size must be positive" if not zero_ok else "size must not be negative")
        return value
    if isinstance(value, str):
        if zero_ok and value.strip() == "0":
            return 0
        try:
            return parse_bytes(value)
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None
    raise ValueError("expected a size such as 512MiB or 2GiB")


Bytes = Annotated[int, BeforeValidator(lambda v: _size(v, zero_ok=False))]
BytesOrZero = Annotated[int, BeforeValidator(lambda v: _size(v, zero_ok=True))]
Port = Annotated[int, Field(ge=1, le=65535)]
ResourceMap = dict[str, Annotated[float, Field(gt=0)]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    path: Optional[str] = Field(None, description=(
        "Hugging Face model directory, present at this path on every node; "
        "null: a tiny model generated locally (single-machine tries only)"))
    served_name: Optional[str] = Field(None, description="name clients ask for (default: the directory's name)")
    model_id: Optional[str] = Field(None, description="name that keys the model's blocks (default: served_name)")
    block_size: int = Field(32, description="tokens per KV block, a positive multiple of 32")
    max_model_len: Optional[int] = Field(None, ge=1)

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v <= 0 or v % 32:
            raise ValueError("must be a positive multiple of 32")
        return v


class EngineConfig(_Strict):
    kv_cache_gib: int = Field(1, ge=1, description="CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    local_prefix_cache: bool = Field(False, description="also keep vLLM's own prefix cache")
    store_timeout_s: float = Field(5.0, gt=0, description="deadline of each store call")
    cpu_cores: Optional[str] = Field("auto", description=(
        "VLLM_CPU_OMP_THREADS_BIND for the engine: 'auto' gives prefill the first half of "
        "the node's cores and decode the rest, null leaves it to vLLM, or a value such as '0-3'"))


class WorkerGroupConfig(_Strict):
    replicas: int = Field(1, ge=0)
    port: Port = Field(..., description="gRPC port of replica 0; replica i listens on port + i")
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    resources: ResourceMap = Field(default_factory=dict, description=(
        "custom Ray resources one replica needs, e.g. {prefill: 1}: they pick its node"))
    resources_per_rank: ResourceMap = Field(default_factory=lambda: {"CPU": 1.0}, description=(
        "Ray resources of each of the TP x PP placement-group bundles, e.g. {GPU: 1}"))
    engine: EngineConfig = Field(default_factory=EngineConfig)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the engine")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def ports(self) -> list[int]:
        return [self.port + i for i in range(self.replicas)]

    @field_validator("resources_per_rank")
    @classmethod
    def _bundle(cls, v: dict) -> dict:
        if not v:
            raise ValueError("must name at least one resource, e.g. {CPU: 1}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "WorkerGroupConfig":
        # tensor_parallel_size, pipeline_parallel_size >= 1 each, so TP x PP >= 1.
        if self.port + max(self.replicas - 1, 0) > 65535:
            raise ValueError(f"port + replicas: replicas use ports {self.port}.."
                             f"{self.port + self.replicas - 1}, past 65535")
        return self


class StoreConfig(_Strict):
    node_resource: Optional[str] = Field(None, description=(
        "a store runs on every Ray node offering this resource (null: on the head node)"))
    port: Port = 50051
    host_bytes: BytesOrZero = Field(2 << 30, description="host RAM tier (0: none)")
    disk_bytes: BytesOrZero = Field(0, description="local disk tier (0: none)")
    disk_dir: Optional[str] = Field(None, description="directory of the disk tier's slab file (default: temporary)")
    gpu_bytes: BytesOrZero = Field(0, description="GPU tier (needs CUDA; 0: none)")
    policy: Literal["lru", "s3fifo"] = "lru"
    page_bytes: Bytes = Field(4 << 20, description="slab page size, a power of two")
    direct_io: bool = False
    disk_write_behind_bytes: BytesOrZero = Field(0, description=(
        "RAM staging disk writes, written behind the put (0: each write reaches disk first)"))
    demote_ahead: float = Field(0.1, ge=0.0, lt=1.0, description=(
        "share of each faster tier kept free by moving blocks down in the background "
        "(0: a put that finds no room moves one itself)"))
    metrics_port: Optional[Port] = None

    @field_validator("page_bytes")
    @classmethod
    def _page(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("must be a power of two, e.g. 4MiB")
        return v

    @model_validator(mode="after")
    def _check(self) -> "StoreConfig":
        if not (self.host_bytes or self.disk_bytes or self.gpu_bytes):
            raise ValueError("a store needs at least one tier: host_bytes, disk_bytes or gpu_bytes")
        return self


class RouterConfig(_Strict):
    replicas: int = Field(1, ge=0, description="one per node (they share the ports)")
    node_resource: Optional[str] = Field(None, description=(
        "routers run on Ray nodes offering this resource (null: the head node)"))
    host: Optional[str] = Field(None, description="address to bind (default: the node's IP)")
    http_port: Port = 8000
    grpc_port: int = Field(50050, ge=0, le=65535, description="gRPC serving API (0: none)")
    api_token: Optional[str] = None
    api_token_env: Optional[str] = Field(None, description=(
        "read the API token from this environment variable where `kvmesh up` runs"))
    routing: Literal["kv_aware", "round_robin"] = "kv_aware"
    max_local_prefill_tokens: int = Field(64, ge=0)
    max_inflight: int = Field(256, ge=1)
    max_queue: int = Field(1024, ge=0)
    queue_timeout_s: float = Field(30.0, gt=0)
    prefill_timeout_s: float = Field(120.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "RouterConfig":
        if self.api_token and self.api_token_env:
            raise ValueError("give api_token or api_token_env, not both")
        return self


class ClusterConfig(_Strict):
    model: ModelConfig
    prefill: WorkerGroupConfig = Field(default_factory=lambda: WorkerGroupConfig(port=50061))
    decode: WorkerGroupConfig = Field(default_factory=lambda: WorkerGroupConfig(port=50071))
    stores: list[StoreConfig] = Field(default_factory=lambda: [StoreConfig()])
    index: Optional[str] = Field(None, description="shared block index: redis://HOST:PORT/DB, or null")
    router: RouterConfig = Field(default_factory=RouterConfig)

    @field_validator("index")
    @classmethod
    def _index(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL or null")
        return v

    def problems(self) -> list[tuple[str, str]]:
        """Checks across sections: (YAML path, message) for each problem found."""
        out = []
        if self.router.replicas and not (self.prefill.replicas and self.decode.replicas):
            which = "prefill" if not self.prefill.replicas else "decode"
            out.append((f"{which}.replicas", "a router needs at least one prefill and one decode replica"))
        if (self.prefill.replicas or self.decode.replicas) and not self.stores:
            out.append(("stores", "workers need a store: list at least one"))
        seen: dict[str | None, int] = {}
        for i, s in enumerate(self.stores):
            if s.node_resource in seen:
                out.append((f"stores[{i}].node_resource", f"same as stores[{seen[s.node_resource]}] "
                                                          "(one store per node)"))
            seen.setdefault(s.node_resource, i)
        if len(self.stores) > 1 and self.index is None:
            out.append(("index", "several stores need a shared block index (redis://HOST:PORT/DB)"))
        out += self._port_problems()
        return out

    def _port_problems(self) -> list[tuple[str, str]]:
        """Ports that may share a node must differ (placement decides which do). Two
        stores entries never share a node (``up`` refuses it), so they may reuse ports."""
        used: dict[int, tuple[str, int | None]] = {}
        out = []

        def claim(port: int, path: str, store: int | None = None) -> None:
            if port in used:
                other, other_store = used[port]
                if store is None or other_store is None or store == other_store:
                    out.append((path, f"port {port} is also used by {other}"))
            else:
                used[port] = (path, store)

        for role in ("prefill", "decode"):
            for i, p in enumerate(getattr(self, role).ports):
                claim(p, f"{role}.port" if i == 0 else f"{role}.port (+{i}, replica {i})")
        if self.router.replicas:
            claim(self.router.http_port, "router.http_port")
            if self.router.grpc_port:
                claim(self.router.grpc_port, "router.grpc_port")
        for i, s in enumerate(self.stores):
            claim(s.port, f"stores[{i}].port", i)
            if s.metrics_port is not None:
                claim(s.metrics_port, f"stores[{i}].metrics_port", i)
        return out

    # ------------------------------------------------------------------ derived

    def resolved_model(self) -> tuple[str, str]:
        """(model directory, served name); generates the tiny model when ``path`` is null."""
        if self.model.path is None:
            from kvmesh.cluster.models import ensure_model

            return str(ensure_model("tiny")), self.model.served_name or "kvmesh-tiny"
        return self.model.path, self.model.served_name or Path(self.model.path).name

    def api_token(self) -> str | None:
        import os

        if self.router.api_token_env:
            token = os.environ.get(self.router.api_token_env)
            if not token:
                raise ConfigError(f"router.api_token_env: environment variable "
                                  f"{self.router.api_token_env} is not set")
            return token
        return self.router.api_token


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def parse_config(data: Any, source: str = "config") -> ClusterConfig:
    """Validate an already-parsed YAML document; raises ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        config = ClusterConfig.model_validate(data)
    except ValidationError as e:
        problems = [(_where(err["loc"]), _message(err)) for err in e.errors()]
    else:
        problems = config.problems()
        if not problems:
            return config
    lines = [f"{where}: {message}" for where, message in problems]
    raise ConfigError(f"{source}: invalid cluster config:\n  " + "\n  ".join(lines))


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster config file; raises ``ConfigError`` naming the bad field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(data, str(path))
