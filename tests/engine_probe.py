"""Load models in a plain vLLM engine and report what it made of them.

Runs in its own process, as ``tests.colocated`` does: ``python -m tests.engine_probe IN.json
OUT.json`` where IN holds ``{"runs": [{"model": dir, more vllm.LLM keyword arguments}, ...],
"prompts": [[token ids], ...], "max_tokens": N}`` (a ``kv_transfer_config`` as a dict of
``KVTransferConfig``'s fields); OUT gets, per run, the engine's KV-cache groups (kind,
sliding window, number of layers) and each prompt's greedy tokens, or the error text of
an engine that refused to start.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def probe_models(runs: list[str | dict], prompts: list[list[int]], max_tokens: int, workdir: Path,
                 timeout_s: float = 600) -> list[dict]:
    """Each run (a model directory, or ``{"model": dir, **engine keyword arguments}``) in
    turn, in one subprocess."""
    from tests.colocated import run_engine_module

    runs = [r if isinstance(r, dict) else {"model": r} for r in runs]
    return run_engine_module("tests.engine_probe", {"runs": runs, "prompts": prompts, "max_tokens": max_tokens},
                             workdir / "probe", timeout_s)


def main(inp: str, out: str) -> None:
    import gc

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    spec = json.loads(Path(inp).read_text())
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0)
    results = []
    for run in spec["runs"]:
        model = run["model"]
        kwargs = dict(block_size=32, enforce_eager=True, max_model_len=1024, **run)
        if "kv_transfer_config" in kwargs:
            kwargs["kv_transfer_config"] = KVTransferConfig(**kwargs["kv_transfer_config"])
        try:
            llm = LLM(**kwargs)
        except Exception as e:  # the engine's refusal, reported
            results.append({"model": model, "error": f"{type(e).__name__}: {e}"})
            continue
        groups = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config.kv_cache_groups
        tokens = [list(llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids)
                  for p in spec["prompts"]]
        results.append({"model": model, "tokens": tokens, "groups": [
            {"kind": type(g.kv_cache_spec).__name__, "layers": len(g.layer_names),
             "sliding_window": getattr(g.kv_cache_spec, "sliding_window", None)} for g in groups]})
        del llm
        gc.collect()
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
