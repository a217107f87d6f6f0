"""Greedy reference outputs from a plain, colocated vLLM engine (no connector).

Runs in its own process (vLLM's engine holds threads and memory we don't want in the
test process): ``python -m tests.colocated IN.json OUT.json`` where IN holds
``{"model", "block_size", "max_tokens", "prompts": [[token ids], ...], "engine_args"}``
(``engine_args``: more vLLM engine flags, optional).

Exact ties. The engine's logits are bfloat16, so two candidates can come out exactly
equal, and then which one greedy decoding takes depends on the order the sums were done
in: a cached prefix read back (from our store, or from vLLM's own prefix cache) instead of
recomputed in the same pass rounds differently and can break the tie the other way. So
each reference keeps the top candidates of every step (``GreedyTokens``), and another run
matches it when it takes the same tokens, or the same up to a step where it took a
candidate tied with the reference's choice (within ``TIE_NATS``); past that step the two
runs continue from different contexts and are not compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TIE_NATS = 0.07  # one bfloat16 step of a logit below 16 is at most 0.0625
TOP_CANDIDATES = 5


class GreedyTokens(list):
    """A colocated run's greedy tokens, with its top candidates at each step.

    ``==`` (and ``!=``) with a list of tokens is the match described at the top of this
    module: equal, or equal up to a step where the other run took a tied candidate."""

    def __init__(self, tokens: list[int], candidates: list[dict[int, float]]):
        super().__init__(tokens)
        self.candidates = candidates  # per step: token id -> logprob, the top few

    def tied(self, step: int, token: int) -> bool:
        """Whether ``token`` was as likely as the reference's choice at ``step``."""
        top = self.candidates[step]
        return token in top and top[self[step]] - top[token] <= TIE_NATS

    def __eq__(self, other) -> bool:
        other = list(other)
        for step, (mine, theirs) in enumerate(zip(self, other)):
            if mine != theirs:
                return self.tied(step, theirs)
        return len(other) == len(self)

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    __hash__ = None

    def matches_text(self, tokenizer, text: str) -> bool:
        """The same match for generated text: the reference's text, or its text up to a
        tied step followed by the tied candidate's."""
        if text == tokenizer.decode(list(self)):
            return True
        return any(text.startswith(tokenizer.decode(self[:step] + [token]))
                   for step, top in enumerate(self.candidates)
                   for token in top if token != self[step] and self.tied(step, token))


def reference_outputs(model: str, prompts: list[list[int]], max_tokens: int,
                      block_size: int, workdir: Path, timeout_s: float = 600,
                      engine_args: tuple[str, ...] = ()) -> list[GreedyTokens]:
    """Token ids each prompt generates greedily in a colocated vLLM run (with more vLLM
    ``engine_args``, e.g. a KV-cache dtype)."""
    outputs = run_engine_module("tests.colocated", {
        "model": model, "block_size": block_size, "max_tokens": max_tokens, "prompts": prompts,
        "engine_args": list(engine_args)}, workdir / "colocated", timeout_s)
    return [GreedyTokens(o["tokens"], [{int(t): lp for t, lp in step.items()} for step in o["top"]])
            for o in outputs]


def run_engine_module(module: str, payload: dict, stem: Path, timeout_s: float = 600,
                      env: dict[str, str] | None = None):
    """``python -m module STEM-in.json STEM-out.json``, ``payload`` the input: a vLLM engine
    in a process of its own (no engine-core subprocess, 1 GiB of KV cache unless the
    environment says otherwise; ``env``: more variables). Returns the output file's JSON;
    ``RuntimeError`` with the process's output tails when it fails,
    ``subprocess.TimeoutExpired`` past ``timeout_s``."""
    inp, out = Path(f"{stem}-in.json"), Path(f"{stem}-out.json")
    inp.write_text(json.dumps(payload))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", **(env or {}))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run([sys.executable, "-m", module, str(inp), str(out)],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def reference_table(model: str, prompts: list[list[int]], max_tokens: int, block_size: int,
                    workdir: Path, engine_args: tuple[str, ...] = ()) -> dict[tuple[int, ...], GreedyTokens]:
    """``reference_outputs`` keyed by prompt."""
    outs = reference_outputs(model, prompts, max_tokens, block_size, workdir, engine_args=engine_args)
    return {tuple(p): o for p, o in zip(prompts, outs)}


async def prefill_then_decode(prefill_address: str, decode_address: str, prompt: list[int],
                              max_tokens: int, between=lambda: None, secret: str | None = None):
    """Drive the workers directly (with the cluster ``secret``) — prefill, then ``between()``
    (e.g. inject a fault), then decode — and return the decode tokens and its last chunk."""
    import random

    from kvmesh_proto import worker_pb2
    from kvmesh.router.workers import WorkerClient

    prefill, decode = WorkerClient(prefill_address, secret), WorkerClient(decode_address, secret)
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

    from kvmesh.engine_host.engine_args import changed_engine_kwargs, parse_engine_args

    spec = json.loads(Path(inp).read_text())
    args = parse_engine_args(["--model", spec["model"], "--block-size", str(spec["block_size"]),
                              *spec.get("engine_args", [])])
    llm = LLM(**changed_engine_kwargs(args))
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=TOP_CANDIDATES)
    outputs = []
    for p in spec["prompts"]:  # one prompt at a time, as the cluster tests send them
        result = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0]
        outputs.append({"tokens": list(result.token_ids),
                        "top": [{t: lp.logprob for t, lp in step.items()} for step in result.logprobs]})
    Path(out).write_text(json.dumps(outputs))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
