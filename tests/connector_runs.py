"""Prompts through one vLLM engine with kvmesh's connector, in a process of its own.

``python -m tests.connector_runs IN.json OUT.json`` where IN holds ``{"model", "store_address",
"tensor_parallel_size", "pipeline_parallel_size", "prompts": [[token ids], ...], "max_tokens",
"engine"}`` (``engine``: more ``vllm.LLM`` keyword arguments). The engine is ``kv_both``
(it loads what the store holds and saves what it computes), with no local prefix cache,
so a prompt sent again is loaded from the store; the prompts go one at a time. OUT gets,
per prompt, the greedy tokens and the connector's report (``tokens_from_store``,
``tokens_load_failed``, ``nbytes`` ...) and the keys' ``namespace`` (hex), or, for an engine that
failed, ``{"error": text}``.
Tensor-parallel ranks run in processes of vLLM's own (``mp``), one core each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run_connector_engine(spec: dict, stem: Path, timeout_s: float = 600) -> dict:
    """``spec`` (IN above) in a subprocess; its OUT. Ranks are bound one core each (in
    turn, where there are more ranks than cores)."""
    import os

    from tests.colocated import run_engine_module

    world = spec.get("tensor_parallel_size", 1) * spec.get("pipeline_parallel_size", 1)
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % (os.cpu_count() or 1)) for i in range(world))} \
        if world > 1 else {}
    try:
        return run_engine_module("tests.connector_runs", spec, stem, timeout_s, env=env)
    except RuntimeError as e:  # the engine failed: each error line its processes wrote (the
        out = Path(f"{stem}-out.json")  # root cause may be in a rank's), then its own error
        first = json.loads(out.read_text())["error"] if out.exists() else ""
        lines = [line.strip() for line in str(e).splitlines() if "Error" in line or " assert " in line]
        return {"error": "\n".join(dict.fromkeys([*lines, first]))}


def main(inp: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    spec = json.loads(Path(inp).read_text())
    tp, pp = spec.get("tensor_parallel_size", 1), spec.get("pipeline_parallel_size", 1)
    connector = KVTransferConfig(
        kv_connector="KvmeshConnector", kv_connector_module_path="kvmesh.engine_host.connector",
        kv_role="kv_both", kv_load_failure_policy="recompute",
        kv_connector_extra_config={"store_address": spec["store_address"], "model_id": "split-test",
                                   "timeout_s": 10})
    kwargs = dict(model=spec["model"], block_size=32, enforce_eager=True, max_model_len=1024,
                  dtype="bfloat16", enable_prefix_caching=False, kv_transfer_config=connector,
                  tensor_parallel_size=tp, pipeline_parallel_size=pp, **spec.get("engine", {}))
    if tp * pp > 1:
        kwargs["distributed_executor_backend"] = "mp"
    try:
        llm = LLM(**kwargs)
        params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0)
        results = []
        for p in spec["prompts"]:
            o = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
            results.append({"tokens": list(o.outputs[0].token_ids),
                            "kvmesh": (o.kv_transfer_params or {}).get("kvmesh", {})})
    except Exception as e:  # the engine's own refusal or failure, reported (with what its
        import traceback  # processes wrote: the root cause may be in a rank's process)

        traceback.print_exc()
        Path(out).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
    from kvmesh.engine_host.connector_settings import ConnectorSettings

    namespace = ConnectorSettings.from_vllm_config(llm.llm_engine.vllm_config).namespace
    Path(out).write_text(json.dumps({"results": results, "namespace": namespace.hex()}))
    del llm


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
