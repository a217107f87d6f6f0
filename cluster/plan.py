"""Each component's settings from a cluster config: the one mapping both launchers use
(``kvmesh serve --config`` through ``LocalCluster``, ``kvmesh up`` through Ray).

A launcher decides only placement — the host each component binds, which store a worker
uses, where the model lives — and passes it in; everything else comes from the config's
sections, which are the components' own settings types. So one YAML gives the same
components, flags and transfer backends under either launcher.
"""

from __future__ import annotations

from kvmesh.cluster.config import ClusterConfig, RouterGroup, StoreGroup, _WORKER_OWNED, engine_argv
from kvmesh.engine_host.settings import WORKER_SETTINGS, WorkerSettings
from kvmesh.kv_store.settings import StoreSettings
from kvmesh.router.settings import RouterSettings


def _own(section, target: type, owned) -> dict:
    """The section's values of ``target``'s fields that the launcher does not decide."""
    return {name: getattr(section, name) for name in target.model_fields
            if name not in owned and name in type(section).model_fields}


def store_settings(config: ClusterConfig, i: int, host: str, node_id: str,
                   disk_dir: str | None = None) -> StoreSettings:
    """Store ``i`` of the config, bound to ``host``, named ``node_id`` in the index;
    ``disk_dir`` where the launcher picks the directory (the config's wins)."""
    group = config.stores[i]
    own = _own(group, StoreSettings, StoreGroup.launcher_owned)
    own["disk_dir"] = group.disk_dir or disk_dir
    return StoreSettings(**own, host=host, index=config.index, node_id=node_id)


def engine_args(config: ClusterConfig, role: str, model: str) -> tuple[str, ...]:
    """A worker's vLLM flags: the model section, the group's parallel sizes, its ``engine``."""
    group = getattr(config, role)
    args = ["--model", model, "--block-size", str(config.model.block_size)]
    if config.model.max_model_len:
        args += ["--max-model-len", str(config.model.max_model_len)]
    if group.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(group.tensor_parallel_size)]
    if group.pipeline_parallel_size > 1:
        args += ["--pipeline-parallel-size", str(group.pipeline_parallel_size)]
    return tuple(args + engine_argv(group.engine))


def worker_settings(config: ClusterConfig, role: str, replica: int, host: str, store: str,
                    model: str, served_name: str) -> WorkerSettings:
    """Replica ``replica`` of the ``role`` group, bound to ``host``, using ``store``."""
    group = getattr(config, role)
    cls = WORKER_SETTINGS[role]
    own = _own(group, cls, _WORKER_OWNED)
    own["port"] = group.port + replica
    return cls(**own, host=host, store=store, model_id=config.model.model_id or served_name,
               engine_args=engine_args(config, role, model))


def router_settings(config: ClusterConfig, host: str, prefill: list[str], decode: list[str],
                    model: str, served_name: str, api_token: str | None,
                    stores: tuple[str, ...] = ()) -> RouterSettings:
    """The router over the given workers, bound to ``host``; ``stores``: the store
    addresses its health reports on."""
    own = _own(config.router, RouterSettings, {**RouterGroup.launcher_owned, "host": "", "api_token": ""})
    return RouterSettings(**own, host=host, model=model, served_model_name=served_name,
                          prefill=tuple(prefill), decode=tuple(decode), store=tuple(stores),
                          api_token=api_token,
                          block_size=config.model.block_size,
                          decode_local_cache=bool(config.decode.engine.get("enable_prefix_caching")))
