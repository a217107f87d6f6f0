"""``kvmesh bench families`` on a small setting: one family, one timed prompt. Its report
has the row's shape, the store-hit run really loaded the prompt while the recompute run
loaded nothing, and the outputs of both runs agree (speed is not asserted)."""

from __future__ import annotations

import json

import pytest

from kvmesh.bench import families_bench
from kvmesh.cluster.models import ensure_model


def test_one_family_row():
    report = families_bench.run(("mqa",), prompts=1, prompt_tokens=200, max_tokens=2)
    (row,) = report["results"]
    assert row["family"] == "mqa" and row["prompt_tokens"] == 200 and row["requests"] == 1
    assert report["outputs_identical"] and row["outputs_identical"]
    assert row["tokens_loaded_p50"] == 192          # every full block but the one computed last
    assert row["recompute_tokens_loaded_max"] == 0  # the other salt: nothing of the hit run's
    # one KV head: per loaded token, K and V of each layer's one head, in bfloat16
    config = json.loads((ensure_model("mqa") / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert config["num_key_value_heads"] == 1
    assert row["kv_bytes_p50"] == 192 * 2 * config["num_hidden_layers"] * head_dim * 2
    assert set(row["decode_ttft_ms_p50"]) == {"hit", "recompute"}
    assert row["ttft_ratio_hit_to_recompute"] > 0


def test_an_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown model family 'bench'"):
        families_bench.run(("bench",))
