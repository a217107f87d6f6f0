"""The cluster config file: one YAML document describing a whole kvmesh deployment, for
``kvmesh up CONFIG`` (Ray) and ``kvmesh serve --config CONFIG`` (this machine) alike.

Its sections are the components' own settings types, extended with where and how many
(``WorkerGroup`` is a ``PrefillSettings``/``DecodeSettings``, ``StoreGroup`` a
``StoreSettings``, ``RouterGroup`` a ``RouterSettings``), so every setting has one
definition and a field added to a component appears here without an edit. Settings the
launcher decides (where a component binds, which store a worker uses, the index, the
model's path per component) are refused in a section with a message saying so.

``load_config(path)`` reads and validates it into a ``ClusterConfig``; any problem raises
``ConfigError`` whose message names the file and the field's YAML path
(``decode.kv_cache_gib: ...``). Unknown keys are refused, sizes are strings such as
``"2GiB"`` (or integers, in bytes) and ports are checked for range and clashes.

Layout (every key but ``model`` has a default; ``deploy/configs/`` holds examples)::

    model:    {path, served_name, model_id, block_size, max_model_len}
    prefill:  {replicas, port, tensor_parallel_size, pipeline_parallel_size, resources,
               resources_per_rank, env, cpu_cores, engine: {vLLM engine args by name},
               ... every other PrefillSettings field (store_timeout, kv_cache_gib, ...)}
    decode:   (as prefill, DecodeSettings)
    stores:   [{node_resource, ... every StoreSettings field but host, index, node_id, advertise}]
    index:    redis://HOST:PORT/DB or null
    router:   {replicas, node_resource, api_token_env, ... every RouterSettings field but
               model, served_model_name, prefill, decode, index, block_size, decode_local_cache}

``plan.py`` turns a config into each component's settings; both launchers use it.
Ports are fixed by the config, so a component that Ray restarts comes back on the same
address: worker replica ``i`` of a group listens on ``port + i``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvmesh.engine_host.settings import DecodeSettings, PrefillSettings
from kvmesh.kv_store.settings import StoreSettings
from kvmesh.kv_store.settings_base import Port
from kvmesh.router.settings import RouterSettings

ResourceMap = dict[str, Annotated[float, Field(gt=0)]]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Section(BaseModel):
    """A component's settings as a config section: the fields its launcher decides
    (``launcher_owned``) are refused, naming who sets them."""

    launcher_owned: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_launcher_owned(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, why in cls.launcher_owned.items():
                if key in data:
                    raise ValueError(f"{key} cannot be set here: {why}")
        return data


class ModelConfig(_Strict):
    path: Optional[str] = Field(None, description=(
        "Hugging Face model directory, present at this path on every node; "
        "null: the default model (prepared locally; single-machine tries only)"))
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


_SECRET_OWNED = "the launcher gives every component the cluster's secret"
_WORKER_OWNED = {
    "host": "each worker binds its node's address",
    "store": "each worker uses the store on its node",
    "index": "set the top-level index",
    "advertise": "each worker is reached at its node's address",
    "model_id": "set model.model_id",
    "engine_args": "give vLLM's engine arguments in engine: {name: value}",
    "cluster_secret_file": _SECRET_OWNED,
}
_IN_GROUP = {"model": "set model.path", "block_size": "set model.block_size",
             "max_model_len": "set model.max_model_len",
             "tensor_parallel_size": "set the group's tensor_parallel_size",
             "pipeline_parallel_size": "set the group's pipeline_parallel_size"}


class _Group(_Section):
    """Where and how many workers of a role run."""

    launcher_owned: ClassVar[dict[str, str]] = _WORKER_OWNED

    replicas: int = Field(1, ge=0, description="workers of this role")
    tensor_parallel_size: int = Field(1, ge=1, description=(
        "tensor-parallel ranks of each engine (vLLM's --tensor-parallel-size; placement bundles)"))
    pipeline_parallel_size: int = Field(1, ge=1, description=(
        "pipeline-parallel stages of each engine (vLLM's --pipeline-parallel-size)"))
    resources: ResourceMap = Field(default_factory=dict, description=(
        "custom Ray resources one replica needs, e.g. {prefill: 1}: they pick its node"))
    resources_per_rank: ResourceMap = Field(default_factory=lambda: {"CPU": 1.0}, description=(
        "Ray resources of each of the TP x PP placement-group bundles, e.g. {GPU: 1}"))
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the engine")
    cpu_cores: Optional[str] = Field("auto", description=(
        "VLLM_CPU_OMP_THREADS_BIND for the engine: 'auto' gives prefill the first half of "
        "the node's cores and decode the rest, null leaves it to vLLM, or a value such as '0-3'"))
    engine: dict[str, Any] = Field(default_factory=dict, description=(
        "vLLM engine arguments by their names (max_num_seqs: 8, enable_prefix_caching: true)"))

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

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: dict) -> dict:
        for key in v:
            name = key.replace("-", "_")
            if name in _IN_GROUP:
                raise ValueError(f"{key} cannot be set here: {_IN_GROUP[name]}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.port + max(self.replicas - 1, 0) > 65535:
            raise ValueError(f"port + replicas: replicas use ports {self.port}.."
                             f"{self.port + self.replicas - 1}, past 65535")
        return self


_REPLICA_PORTS = "port of replica 0; replica i listens on port + i"


class PrefillGroup(_Group, PrefillSettings):
    model_config = ConfigDict(extra="forbid", frozen=True)
    port: Port = Field(50061, description=_REPLICA_PORTS)


class DecodeGroup(_Group, DecodeSettings):
    model_config = ConfigDict(extra="forbid", frozen=True)
    port: Port = Field(50071, description=_REPLICA_PORTS)


class StoreGroup(_Section, StoreSettings):
    """A store on every Ray node offering ``node_resource`` (the head when null)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    launcher_owned: ClassVar[dict[str, str]] = {
        "host": "each store binds its node's address", "index": "set the top-level index",
        "node_id": "each store is named by its launcher", "advertise": "each store is reached at its node's address",
        "cluster_secret_file": _SECRET_OWNED}

    port: Port = Field(50051, description="gRPC port of the store API")
    node_resource: Optional[str] = Field(None, description=(
        "a store runs on every Ray node offering this resource (null: on the head node)"))


class RouterGroup(_Section, RouterSettings):
    model_config = ConfigDict(extra="forbid", frozen=True)
    launcher_owned: ClassVar[dict[str, str]] = {
        "model": "set model.path", "served_model_name": "set model.served_name",
        "prefill": "the launcher lists the workers it started", "decode": "the launcher lists the workers it started",
        "store": "the launcher lists the stores it started",
        "index": "set the top-level index", "block_size": "set model.block_size",
        "decode_local_cache": "set decode.engine.enable_prefix_caching",
        "cluster_secret_file": _SECRET_OWNED}

    host: Optional[str] = Field(None, description="address to bind (default: the node's IP)")
    port: Port = Field(8000, description="port of the OpenAI-compatible HTTP API")
    replicas: int = Field(1, ge=0, description="one per node (they share the ports)")
    node_resource: Optional[str] = Field(None, description=(
        "routers run on Ray nodes offering this resource (null: the head node)"))
    api_token_env: Optional[str] = Field(None, description=(
        "read the API token from this environment variable where the cluster is started"))

    @model_validator(mode="after")
    def _check_token(self):
        if self.api_token and self.api_token_env:
            raise ValueError("give api_token or api_token_env, not both")
        return self


class ClusterConfig(_Strict):
    model: ModelConfig
    prefill: PrefillGroup = Field(default_factory=PrefillGroup)
    decode: DecodeGroup = Field(default_factory=DecodeGroup)
    stores: list[StoreGroup] = Field(default_factory=lambda: [StoreGroup()])
    index: Optional[str] = Field(None, description="shared block index: redis://HOST:PORT/DB, or null")
    router: RouterGroup = Field(default_factory=RouterGroup)

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
        out += self._engine_problems()
        return out

    def _engine_problems(self) -> list[tuple[str, str]]:
        """vLLM's own parser on each group's engine arguments, where vLLM is installed (a
        machine that only deploys may not have it: the workers check again at start)."""
        try:
            from kvmesh.engine_host.engine_args import EngineArgsError, check_engine_args
        except ImportError:
            return []
        out = []
        for role in ("prefill", "decode"):
            group = getattr(self, role)
            if not group.replicas:
                continue
            try:
                check_engine_args(["--model", "unchecked", *engine_argv(group.engine)], role)
            except EngineArgsError as e:
                out.append((f"{role}.engine", str(e)))
            except ImportError:
                return []
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
            claim(self.router.port, "router.port")
            if self.router.grpc_port:
                claim(self.router.grpc_port, "router.grpc_port")
        for i, s in enumerate(self.stores):
            claim(s.port, f"stores[{i}].port", i)
            if s.metrics_port is not None:
                claim(s.metrics_port, f"stores[{i}].metrics_port", i)
            if s.transfer_port:
                claim(s.transfer_port, f"stores[{i}].transfer_port", i)
        return out

    # ------------------------------------------------------------------ derived

    def resolved_model(self) -> tuple[str, str]:
        """(model directory, served name); prepares the default model when ``path`` is null."""
        if self.model.path is None:
            from kvmesh.cluster.models import resolve_model

            path, name = resolve_model(None)
            return path, self.model.served_name or name
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


def engine_argv(engine: dict[str, Any]) -> list[str]:
    """vLLM flags from a mapping of its engine arguments: ``{max_num_seqs: 8}`` ->
    ``["--max-num-seqs", "8"]``; true/false -> ``--x``/``--no-x``; lists and mappings as
    JSON (``speculative_config``); null -> left out."""
    out: list[str] = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (dict, list)):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("PrefillGroup", "DecodeGroup", "StoreGroup", "RouterGroup"):
            continue
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
