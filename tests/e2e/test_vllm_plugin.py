"""kvmesh's vLLM plugin (engine_host/vllm_plugin.py): registered with vLLM, and a fresh
engine serves a 4-token first prompt, which on CPUs with AMX killed vLLM's worker with
SIGILL until the plugin asked Linux for the AMX registers. The negative control (the same
run with the plugin left out) runs only on such CPUs: elsewhere it would pass too."""

from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.colocated import reference_outputs

FIRST_PROMPT = [10, 11, 12, 13]


def _has_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_plugin_is_registered_with_vllm():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("kvmesh") == "kvmesh.engine_host.vllm_plugin:register"


def test_a_fresh_engine_serves_a_short_first_prompt(tiny_model, tmp_path):
    tokens = reference_outputs(tiny_model, [FIRST_PROMPT], 3, 32, tmp_path, fresh=True)[0]
    assert len(tokens) == 3


@pytest.mark.skipif(not _has_amx(), reason="the failure it guards against needs a CPU with AMX")
def test_without_the_plugin_the_same_run_dies(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")  # every plugin but ours
    with pytest.raises(RuntimeError, match="colocated run failed"):
        reference_outputs(tiny_model, [FIRST_PROMPT], 3, 32, tmp_path, fresh=True)
    # ... while one token more takes a torch kernel that asks for AMX itself: it is the
    # short first prompt that fails, not the engine without the plugin.
    assert len(reference_outputs(tiny_model, [FIRST_PROMPT + [14]], 3, 32, tmp_path, fresh=True)[0]) == 3
