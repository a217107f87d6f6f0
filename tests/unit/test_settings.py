"""Each setting is defined once, in its component's settings type, and every surface — the
command line, the cluster YAML, the local and Ray launchers, the Helm chart — is derived
from or checked against those types."""

from __future__ import annotations

import argparse
import os
import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from kvmesh.cluster import plan
from kvmesh.cluster.cli import build_parser
from kvmesh.cluster.config import (
    DecodeGroup, PrefillGroup, RouterGroup, StoreGroup, _WORKER_OWNED, parse_config,
)
from kvmesh.cluster.settings_cli import add_flags, cli_fields, from_args, to_argv
from kvmesh.engine_host.settings import DecodeSettings, PrefillSettings
from kvmesh.kv_store.settings import StoreSettings
from kvmesh.router.settings import RouterSettings

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"store": StoreSettings, "prefill": PrefillSettings, "decode": DecodeSettings,
            "router": RouterSettings}


def changed_values(cls) -> dict:
    """A valid value for every field of ``cls`` that differs from its default."""
    special = {"heartbeat": 2.0, "heartbeat_timeout": 7.0, "page_bytes": 8 << 20, "demote_ahead": 0.25,
               "transfer": ("grpc",), "transfer_preference": ("grpc", "shm"), "policy": "s3fifo", "disk_encoding": "zstd",
               "host_encoding": "lz4", "routing": "round_robin", "advertise": "[fd00::1]:7", "store": "10.0.0.1:1",
               "prefill": ("10.0.0.2:2",), "decode": ("10.0.0.3:3", "10.0.0.4:4"),
               "index": "redis://127.0.0.1:6379/1", "metrics_port": 9999, "disk_bytes": 1 << 30,
               "engine_args": ("--max-num-seqs", "8")}
    out = {}
    for name, field in cls.model_fields.items():
        if name in special:
            out[name] = special[name]
            continue
        default = field.default
        if isinstance(default, bool):
            out[name] = not default
        elif isinstance(default, int):
            out[name] = default + 1 if default else 3
        elif isinstance(default, float):
            out[name] = default + 1.5
        else:  # str or None
            out[name] = "changed"
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_a_flag_and_round_trips(command):
    """Every field of a component's settings is on its command line: the flags
    ``to_argv`` writes (what the local launcher starts components with) parse back into
    the same settings, so a field added to the type needs no edit anywhere else."""
    cls = COMMANDS[command]
    settings = cls(**changed_values(cls))
    assert settings.changed().keys() == set(cls.model_fields)  # the test changes every field
    from kvmesh.cluster.cli import parse_args

    argv = [command, *to_argv(settings), *getattr(settings, "engine_args", ())]
    args = parse_args(argv)
    fixed = {"engine_args": tuple(args.engine_args)} if "engine_args" in cls.model_fields else {}
    assert from_args(cls, args, args.parser, **fixed) == settings


def test_a_new_field_reaches_the_command_line_without_an_edit():
    class Extended(StoreSettings):
        new_knob: int = Field(7, ge=1, description="a setting added later")

    parser = argparse.ArgumentParser()
    add_flags(parser, Extended)
    assert "--new-knob" in parser.format_help() and "a setting added later (default: 7)" in parser.format_help()
    settings = Extended(new_knob=9)
    assert to_argv(settings) == ["--new-knob=9"]
    assert from_args(Extended, parser.parse_args(to_argv(settings)), parser) == settings
    with pytest.raises(SystemExit):
        parser.parse_args(["--new-knob=0"])  # its bounds come with it


@pytest.mark.parametrize("bad, says", [
    (["store", "--host-bytes", "lots"], "argument --host-bytes: not a size"),
    (["store", "--policy", "mru"], "invalid choice: 'mru'"),
    (["store", "--transfer", "smoke"], "unknown transfer backend smoke"),
    (["store", "--page-bytes", "3MiB"], "must be a power of two"),
    (["router", "--max-inflight", "0"], "argument --max-inflight: Input should be greater than or equal to 1"),
    (["router", "--decode", "nohostport"], "not a HOST:PORT address"),
    (["router", "--routing", "random"], "invalid choice: 'random'"),
    (["decode", "--transfer-preference", "carrier-pigeon"], "unknown transfer backend"),
    (["store", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_name_the_flag(bad, says, capsys):
    from kvmesh.cluster.cli import parse_args

    with pytest.raises(SystemExit) as exit:
        parse_args(bad)
    assert exit.value.code == 2 and says in capsys.readouterr().err


def test_choices_come_from_the_registries():
    from kvmesh.kv_store.eviction import POLICIES
    from kvmesh.kv_store.transfer import BACKENDS
    from kvmesh.router.routing import ROUTING_POLICIES

    assert typing.get_args(StoreSettings.model_fields["policy"].annotation) == tuple(POLICIES)
    assert typing.get_args(RouterSettings.model_fields["routing"].annotation) == ROUTING_POLICIES
    help_text = build_parser()._subparsers._group_actions[0].choices["store"].format_help()
    assert "{lru,s3fifo,arc,cost}" in help_text and "{none,zstd,lz4,int8,int4}" in help_text and BACKENDS == ("shm", "nixl", "grpc")


# ------------------------------------------------------------------ the cluster YAML

SECTIONS = {"prefill": (PrefillGroup, PrefillSettings, _WORKER_OWNED),
            "decode": (DecodeGroup, DecodeSettings, _WORKER_OWNED),
            "router": (RouterGroup, RouterSettings, RouterGroup.launcher_owned),
            "stores": (StoreGroup, StoreSettings, StoreGroup.launcher_owned)}
# What a config section adds to its component's settings: where and how many.
PLACEMENT = {"replicas", "tensor_parallel_size", "pipeline_parallel_size", "resources",
             "resources_per_rank", "env", "cpu_cores", "engine", "node_resource", "api_token_env"}


@pytest.mark.parametrize("section", SECTIONS)
def test_every_yaml_key_is_a_setting_or_placement(section):
    """The config's sections are the settings types: a Ray config field with no
    counterpart in a component's settings (other than placement) fails here."""
    group, settings, owned = SECTIONS[section]
    extra = set(group.model_fields) - set(settings.model_fields)
    assert extra <= PLACEMENT, extra - PLACEMENT
    assert set(settings.model_fields) <= set(group.model_fields)


def test_every_yaml_setting_reaches_the_component_the_launchers_start():
    """A value set in the YAML arrives in the settings both launchers start a component
    with (``plan``), for every field the launcher does not decide itself."""
    data = {"model": {"path": "/models/m", "served_name": "m"}, "stores": [{}], "prefill": {}, "decode": {},
            "router": {}}
    for section, (group, settings, owned) in SECTIONS.items():
        values = {k: v for k, v in changed_values(settings).items() if k not in owned and k not in
                  ("port", "grpc_port", "host", "api_token", "engine_args", "block_size", "transfer_port",
                   "metrics_port")}
        target = data["stores"][0] if section == "stores" else data[section]
        target.update({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
    config = parse_config(data)
    store = plan.store_settings(config, 0, "h", "s0")
    prefill = plan.worker_settings(config, "prefill", 0, "h", "h:1", "/models/m", "m")
    decode = plan.worker_settings(config, "decode", 0, "h", "h:1", "/models/m", "m")
    router = plan.router_settings(config, "h", ["h:2"], ["h:3"], "/models/m", "m", None)
    for section, made in (("stores", store), ("prefill", prefill), ("decode", decode), ("router", router)):
        source = data["stores"][0] if section == "stores" else data[section]
        for key, value in source.items():
            assert getattr(made, key) == (tuple(value) if isinstance(value, list) else value), (section, key)


# ------------------------------------------------------------------ the Helm chart

# Chart values that are Kubernetes' business, not a component's setting.
KUBERNETES_ONLY = {
    "replicas", "resources", "image", "nodeSelector", "tolerations", "affinity", "priorityClassName",
    "podAnnotations", "podLabels", "service", "extraArgs", "extraEnv", "strategy", "updateStrategy",
    "startupTimeoutSeconds", "terminationGracePeriodSeconds", "shmSize", "apiToken",
    "disk.type", "disk.hostPath", "disk.ephemeral", "disk.emptyDir",
}


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()


def _vllm_engine_arg_names() -> set[str]:
    from kvmesh.engine_host.engine_args import engine_parser

    return {a.dest for a in engine_parser()._actions}


def test_every_helm_value_has_a_settings_field():
    """Each value of the chart's component sections names a field of that component's
    settings (camelCase of the same name; a nested key may name the field by its path,
    ``disk.bytes`` -> ``disk_bytes``, or by itself, ``disk.directIO`` -> ``direct_io``), a
    vLLM engine argument (workers), or is on the list of Kubernetes-only values."""
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "kvmesh" / "values.yaml").read_text())
    engine_args = _vllm_engine_arg_names()
    targets = {"router": RouterSettings, "prefill": PrefillSettings, "decode": DecodeSettings,
               "store": StoreSettings}
    missing = []
    for section, cls in targets.items():
        for path in _keys(values[section]):
            if any(path == k or path.startswith(k + ".") for k in KUBERNETES_ONLY):
                continue
            names = {_snake(path.replace(".", "_")), _snake(path.split(".")[-1])}
            if names & set(cls.model_fields):
                continue
            if section in ("prefill", "decode") and (names & engine_args or path == "engine"):
                continue
            missing.append(f"{section}.{path}")
    assert not missing, f"chart values with no settings field: {missing}"


def _keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("engine", "resources", "service"):
            out += _keys(value, path + ".")
        else:
            out.append(path)
    return out


def test_the_helm_check_catches_a_value_with_no_field(monkeypatch):
    """The negative control: a chart value named like no setting is reported."""
    real = yaml.safe_load

    def with_typo(text, *a, **k):
        data = real(text, *a, **k)
        if isinstance(data, dict) and "store" in data:
            data["store"]["heartbeatTimeoutt"] = 5
        return data

    monkeypatch.setattr(yaml, "safe_load", with_typo)
    with pytest.raises(AssertionError, match="store.heartbeatTimeoutt"):
        test_every_helm_value_has_a_settings_field()


def test_every_field_has_help():
    for cls in (*COMMANDS.values(), PrefillGroup, DecodeGroup, StoreGroup, RouterGroup):
        for name in cli_fields(cls):
            assert cls.model_fields[name].description, f"{cls.__name__}.{name} has no help"


def test_serve_with_a_config_starts_what_the_config_says(tiny_model):
    """``kvmesh serve --config`` plans every component from the YAML (through ``plan.py``)
    and starts each with flags that parse back into exactly its planned settings."""
    from kvmesh.cluster.cli import parse_args
    from kvmesh.cluster.config import load_config
    from kvmesh.cluster.local import LocalCluster

    data = yaml.safe_load((ROOT / "deploy" / "configs" / "local.yaml").read_text())
    data["model"]["path"] = tiny_model
    data["prefill"].update(replicas=2, engine={"max_num_seqs": 4})
    data["decode"]["engine"] = {"enable_prefix_caching": True}
    config = parse_config(data)
    cluster = LocalCluster(model=tiny_model, config=config, verbose=False)
    kinds = [(c.name, c.kind) for c in cluster.components]
    assert kinds == [("store", "store"), ("prefill0", "prefill"), ("prefill1", "prefill"),
                     ("decode", "decode"), ("router", "router")]
    assert [c.settings.port for c in cluster.components] == [50051, 50061, 50062, 50071, 8000]
    router = cluster.components[-1].settings
    assert router.decode_local_cache and router.prefill == ("127.0.0.1:50061", "127.0.0.1:50062")
    for c in cluster.components:
        args = parse_args([c.kind, *c.argv()])
        fixed = {"engine_args": tuple(args.engine_args)} if c.kind in ("prefill", "decode") else {}
        assert from_args(type(c.settings), args, args.parser, **fixed) == c.settings, c.name
    assert "--max-num-seqs" in cluster.components[1].argv() and "--enable-prefix-caching" in cluster.components[3].argv()
    assert load_config(ROOT / "deploy" / "configs" / "local.yaml").stores[0].host_bytes == 1 << 30


def test_the_readme_reference_is_generated_from_the_settings():
    from kvmesh.cluster.reference import replace_in

    text = (ROOT / "README.md").read_text()
    assert replace_in(text) == text, "run: python -m kvmesh.cluster.reference --write README.md"


def test_a_local_cluster_gives_every_component_its_own_throwaway_secret(tmp_path):
    """``kvmesh serve``'s cluster: one fresh secret per cluster, in a file only its user
    reads, named by every component's settings (and so by its flags)."""
    import stat

    from kvmesh.cluster.local import LocalCluster
    from kvmesh.kv_store.auth import load_secret

    one = LocalCluster(model="m", run_dir=tmp_path / "one", verbose=False)
    two = LocalCluster(model="m", run_dir=tmp_path / "two", verbose=False)
    files = {c.settings.cluster_secret_file for c in one.components}
    assert len(files) == 1 and {c.kind for c in one.components} == {"store", "prefill", "decode", "router"}
    path = files.pop()
    assert load_secret(path) == one.secret and one.secret != two.secret
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert all(f"--cluster-secret-file={path}" in c.argv() or path in c.argv() for c in one.components)
