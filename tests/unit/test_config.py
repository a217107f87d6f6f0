"""The cluster config file: the shipped examples load, bad ones fail naming the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kvmesh.cluster.config import ConfigError, load_config, parse_config
from kvmesh.cluster.ray_deploy import local_resources

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"
MINIMAL = {"model": {"path": "/models/m"}}


def test_the_example_configs_load():
    local = load_config(CONFIGS / "local.yaml")
    assert (local.prefill.replicas, local.decode.replicas, local.router.replicas) == (1, 1, 1)
    assert local.stores[0].host_bytes == 1 << 30 and local.stores[0].node_resource is None
    assert local.index is None and local.prefill.resources == {}

    two = load_config(CONFIGS / "two-node.yaml")
    assert two.prefill.resources == {"prefill": 1} and two.decode.resources == {"decode": 1}
    assert [s.node_resource for s in two.stores] == ["decode"]
    assert two.stores[0].host_bytes == 2 << 30 and two.stores[0].policy == "s3fifo"
    assert local_resources(two) == {"prefill": 1, "decode": 1}
    assert sorted(CONFIGS.glob("*.yaml")) == [CONFIGS / "local.yaml", CONFIGS / "two-node.yaml"]


def test_defaults_fill_everything_but_the_model():
    config = parse_config(MINIMAL)
    assert config.prefill.port == 50061 and config.decode.port == 50071
    assert config.stores[0].port == 50051 and config.stores[0].host_bytes == 2 << 30
    assert (config.router.port, config.router.grpc_port) == (8000, 50050)
    assert config.prefill.world_size == 1 and config.prefill.resources_per_rank == {"CPU": 1}
    assert config.resolved_model() == ("/models/m", "m")


def test_sizes_accept_units_and_bytes():
    data = {**MINIMAL, "stores": [{"host_bytes": "512MiB", "disk_bytes": "2G", "gpu_bytes": 0,
                                   "page_bytes": 1 << 20}]}
    store = parse_config(data).stores[0]
    assert (store.host_bytes, store.disk_bytes, store.gpu_bytes, store.page_bytes) == (
        512 << 20, 2 << 30, 0, 1 << 20)


def test_worker_ports_and_placement_groups():
    config = parse_config({**MINIMAL, "decode": {"replicas": 3, "port": 50100,
                                                 "tensor_parallel_size": 2, "pipeline_parallel_size": 2,
                                                 "resources": {"decode": 1},
                                                 "resources_per_rank": {"GPU": 1}}})
    assert config.decode.ports == [50100, 50101, 50102]
    assert config.decode.world_size == 4
    from kvmesh.cluster.ray_deploy import _bundles

    assert _bundles(config.decode) == [{"GPU": 1, "decode": 1}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}]
    assert local_resources(config) == {"decode": 3}


def _error(data) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, "bad.yaml")
    return str(e.value)


@pytest.mark.parametrize("change, where, says", [
    ({"prefill": {"port": 50061, "replicass": 2}}, "prefill.replicass", "unknown key"),
    ({"colour": "blue"}, "colour", "unknown key"),
    ({"model": {}}, "", None),  # a model with no path is allowed: the generated tiny model
    ({"model": {"block_size": 48}}, "model.block_size", "multiple of 32"),
    ({"decode": {"port": 50071, "tensor_parallel_size": 0}}, "decode.tensor_parallel_size",
     "greater than or equal to 1"),
    ({"decode": {"port": 50071, "pipeline_parallel_size": -1}}, "decode.pipeline_parallel_size",
     "greater than or equal to 1"),
    ({"prefill": {"port": 70000}}, "prefill.port", "less than or equal to 65535"),
    ({"prefill": {"port": 65535, "replicas": 2}}, "prefill", "past 65535"),
    ({"prefill": {"port": 50061, "replicas": -1}}, "prefill.replicas", "greater than or equal to 0"),
    ({"prefill": {"port": 50061, "resources": {"prefill": 0}}}, "prefill.resources.prefill",
     "greater than 0"),
    ({"prefill": {"port": 50061, "resources_per_rank": {}}}, "prefill.resources_per_rank",
     "at least one resource"),
    ({"prefill": {"port": 50061, "kv_cache_gib": 0}}, "prefill.kv_cache_gib", "greater than or equal to 1"),
    ({"prefill": {"port": 50061, "kv_cache": 1}}, "prefill.kv_cache", "unknown key"),
    # The engine section is vLLM's engine arguments, read by vLLM's own parser.
    ({"prefill": {"engine": {"kv_cache": 1}}}, "prefill.engine", "unrecognized arguments: --kv-cache"),
    ({"prefill": {"engine": {"max_num_seqs": "many"}}}, "prefill.engine", "invalid int value: 'many'"),
    ({"prefill": {"engine": {"enable_prefix_caching": True}}}, "prefill.engine",
     "--enable-prefix-caching is not allowed here"),
    ({"decode": {"engine": {"enable_prefix_caching": True}}}, "", None),  # decode may keep one
    ({"decode": {"engine": {"kv_transfer_config": {"kv_connector": "X"}}}}, "decode.engine",
     "kvmesh sets vLLM's KV transfer config itself"),
    ({"decode": {"engine": {"tensor_parallel_size": 2}}}, "decode.engine",
     "tensor_parallel_size cannot be set here: set the group's tensor_parallel_size"),
    # What the launcher decides is refused, naming who sets it.
    ({"decode": {"store": "a:1"}}, "decode", "store cannot be set here"),
    ({"stores": [{"host": "0.0.0.0"}]}, "stores[0]", "host cannot be set here"),
    ({"router": {"decode": "a:1"}}, "router", "decode cannot be set here"),
    ({"prefill": {"port": 50071}}, "decode.port", "port 50071 is also used by prefill.port"),
    ({"decode": {"port": 50062}, "prefill": {"port": 50061, "replicas": 2}},
     "decode.port", "also used by prefill.port (+1, replica 1)"),
    ({"stores": [{"host_bytes": "lots"}]}, "stores[0].host_bytes", "not a size: 'lots'"),
    ({"stores": [{"host_bytes": "0"}]}, "stores[0]", "at least one tier"),
    ({"stores": [{"page_bytes": "3MiB"}]}, "stores[0].page_bytes", "power of two"),
    ({"stores": [{"policy": "fifo"}]}, "stores[0].policy", "'lru', 's3fifo', 'arc' or 'cost'"),
    ({"stores": [{"port": 0}]}, "stores[0].port", "greater than or equal to 1"),
    ({"stores": [{"demote_ahead": 1.0}]}, "stores[0].demote_ahead", "less than 1"),
    ({"stores": [{"node_resource": "a"}, {"node_resource": "b", "port": 50052}]}, "index",
     "shared block index"),
    ({"stores": [{"node_resource": "a"}, {"node_resource": "a", "port": 50052}],
      "index": "redis://127.0.0.1:6379/0"}, "stores[1].node_resource", "one store per node"),
    ({"stores": []}, "stores", "need a store"),
    ({"index": "memcached://x"}, "index", "redis:// URL"),
    ({"router": {"port": 50051}}, "stores[0].port", "also used by router.port"),
    ({"stores": [{"metrics_port": 50051}]}, "stores[0].metrics_port", "also used by stores[0].port"),
    ({"stores": [{"node_resource": "a", "metrics_port": 9100},
                 {"node_resource": "b", "metrics_port": 9100}],
      "index": "redis://127.0.0.1:6379/0"}, "", None),  # stores are on different nodes
    ({"router": {"grpc_port": 70000}}, "router.grpc_port", "less than or equal to 65535"),
    ({"router": {"routing": "random"}}, "router.routing", "'kv_aware' or 'round_robin'"),
    ({"router": {"api_token": "x", "api_token_env": "T"}}, "router", "not both"),
    ({"router": {"max_inflight": 0}}, "router.max_inflight", "greater than or equal to 1"),
    ({"decode": {"port": 50071, "replicas": 0}}, "decode.replicas", "at least one prefill and one decode"),
])
def test_bad_configs_name_the_field(change, where, says):
    data = copy.deepcopy(MINIMAL)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    if says is None:
        parse_config(data)
        return
    message = _error(data)
    assert message.startswith("bad.yaml: invalid cluster config:")
    assert f"\n  {where}: " in message and says in message, message


def test_no_router_needs_no_workers():
    config = parse_config({**MINIMAL, "router": {"replicas": 0},
                           "prefill": {"port": 50061, "replicas": 0},
                           "decode": {"port": 50071, "replicas": 0}})
    assert config.router.replicas == 0


def test_api_token_from_the_environment(monkeypatch):
    config = parse_config({**MINIMAL, "router": {"api_token_env": "KVMESH_TEST_TOKEN"}})
    monkeypatch.delenv("KVMESH_TEST_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="router.api_token_env: environment variable KVMESH_TEST_TOKEN"):
        config.api_token()
    monkeypatch.setenv("KVMESH_TEST_TOKEN", "s3cret")
    assert config.api_token() == "s3cret"


def test_load_config_names_the_file_and_the_yaml_path(tmp_path):
    bad = yaml.safe_load((CONFIGS / "two-node.yaml").read_text())
    bad["decode"]["kv_cache_gib"] = "lots"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: invalid cluster config:")
    assert "decode.kv_cache_gib: " in str(e.value)

    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path / "missing.yaml")


def test_several_errors_are_all_reported():
    message = _error({"model": {"block_size": 7}, "router": {"port": 0, "typo": 1}})
    for where in ("model.block_size", "router.port", "router.typo"):
        assert f"\n  {where}: " in message, message
