"""Greedy reference outputs from a plain, colocated vLLM engine (no connector).

Runs in its own process (vLLM's engine holds threads and memory we don't want in the
test process): ``python -m tests.colocated IN.json OUT.json`` where IN holds
``{"model", "block_size", "max_tokens", "prompts": [[token ids], ...]}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def reference_outputs(model: str, prompts: list[list[int]], max_tokens: int,
                      block_size: int, workdir: Path, timeout_s: float = 600) -> list[list[int]]:
    """Token ids each prompt generates greedily in a colocated vLLM run."""
    inp, out = workdir / "colocated-in.json", workdir / "colocated-out.json"
    inp.write_text(json.dumps({"model": model, "block_size": block_size,
                               "max_tokens": max_tokens, "prompts": prompts}))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run([sys.executable, "-m", "tests.colocated", str(inp), str(out)],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"colocated run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def reference_table(model: str, prompts: list[list[int]], max_tokens: int, block_size: int,
                    workdir: Path) -> dict[tuple[int, ...], list[int]]:
    """``reference_outputs`` keyed by prompt."""
    outs = reference_outputs(model, prompts, max_tokens, block_size, workdir)
    return {tuple(p): o for p, o in zip(prompts, outs)}


async def prefill_then_decode(prefill_address: str, decode_address: str, prompt: list[int],
                              max_tokens: int, between=lambda: None):
    """Drive the workers directly — prefill, then ``between()`` (e.g. inject a fault), then
    decode — and return the decode tokens and its last chunk."""
    import random

    from kvmesh_proto import worker_pb2
    from router.workers import WorkerClient

    prefill, decode = WorkerClient(prefill_address), WorkerClient(decode_address)
    try:
        req = worker_pb2.GenerateRequest(
            request_id=f"t{random.random()}", prompt_token_ids=prompt,
            sampling=worker_pb2.SamplingParams(max_tokens=1, temperature=0))
        async for _ in prefill.generate(req, 60):
            pass
        between()
        req.sampling.max_tokens = max_tokens
        tokens, last = [], None
        async for chunk in decode.generate(req, 60):
            tokens += chunk.token_ids
            last = chunk
        return tokens, last
    finally:
        await prefill.close()
        await decode.close()


def main(inp: str, out: str) -> None:
    from vllm import LLM, SamplingParams

    from engine_host.engine import EngineSettings, base_engine_kwargs

    spec = json.loads(Path(inp).read_text())
    settings = EngineSettings(model=spec["model"], role="decode", store_address="",
                              block_size=spec["block_size"])
    llm = LLM(**base_engine_kwargs(settings))
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0)
    # One prompt at a time, as the cluster tests send them.
    outputs = [list(llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
                    .outputs[0].token_ids) for p in spec["prompts"]]
    Path(out).write_text(json.dumps(outputs))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
