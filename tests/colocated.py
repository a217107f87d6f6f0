"""Greedy reference outputs from a plain, colocated vLLM engine (no connector).

The engine runs in a process of its own (vLLM's engine holds threads and memory we don't
want in the test process). Starting one costs far more than the greedy runs the tests ask
of it, so one engine per model and engine flags serves every module of a test session
(``ReferenceEngine``, at most ``MAX_ENGINES`` kept, the least recently used closed first):
``python -m tests.colocated --serve SPEC.json REPLY_FD`` reads one request per line on its
standard input (``{"prompts": [[token ids], ...], "max_tokens"}``) and writes one line of
JSON per request to REPLY_FD. Its prefix cache is off (unless its flags turn it on), and
it runs one prompt at a time, so a request's tokens do not depend on the requests before
it: each equals what a fresh engine gives. ``fresh=True`` asks for that fresh engine instead, run once:
``python -m tests.colocated IN.json OUT.json`` where IN holds
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

import atexit
import json
import os
import select
import subprocess
import sys
import time
from collections import OrderedDict
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
                      engine_args: tuple[str, ...] = (), fresh: bool = False) -> list[GreedyTokens]:
    """Token ids each prompt generates greedily in a colocated vLLM run (with more vLLM
    ``engine_args``, e.g. a KV-cache dtype): from the session's engine for this model and
    flags, or with ``fresh`` from a new engine, run once. ``RuntimeError`` ("colocated run
    failed", with the engine's output) when the engine fails; ``TimeoutError`` past
    ``timeout_s``."""
    spec = {"model": model, "block_size": block_size, "engine_args": list(engine_args)}
    if fresh:
        outputs = run_engine_module("tests.colocated", {**spec, "max_tokens": max_tokens, "prompts": prompts},
                                    workdir / "colocated", timeout_s)
    else:
        outputs = ReferenceEngine.shared(spec, workdir).generate(prompts, max_tokens, timeout_s)
    return [GreedyTokens(o["tokens"], [{int(t): lp for t, lp in step.items()} for step in o["top"]])
            for o in outputs]


MAX_ENGINES = 2  # reference engines kept at once (each holds its model and 1 GiB of KV)


class ReferenceEngine:
    """A colocated vLLM engine in a process of its own, kept to answer many requests
    (``python -m tests.colocated --serve``). ``shared`` gives the session's engine for a
    spec, starting it on first use; ``close_all`` (at the end of the session, and at exit)
    stops them all. An engine that dies or overruns a request's timeout is killed and
    forgotten, so the next request starts a new one."""

    _engines: "OrderedDict[str, ReferenceEngine]" = OrderedDict()

    def __init__(self, spec: dict, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        spec_path, self.log_path = workdir / "colocated-spec.json", workdir / "colocated.log"
        spec_path.write_text(json.dumps(spec))
        read_fd, write_fd = os.pipe()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.colocated", "--serve", str(spec_path), str(write_fd)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                env=_engine_env())
        os.close(write_fd)
        self.replies = os.fdopen(read_fd, "rb")

    @classmethod
    def shared(cls, spec: dict, workdir: Path) -> "ReferenceEngine":
        key = json.dumps(spec, sort_keys=True)
        engine = cls._engines.pop(key, None)
        if engine is None or engine.proc.poll() is not None:
            while len(cls._engines) >= MAX_ENGINES:
                cls._engines.popitem(last=False)[1].close()
            engine = cls(spec, workdir)
        cls._engines[key] = engine  # most recently used last
        return engine

    @classmethod
    def close_all(cls) -> None:
        while cls._engines:
            cls._engines.popitem()[1].close()

    def generate(self, prompts: list[list[int]], max_tokens: int, timeout_s: float) -> list[dict]:
        """Each prompt's greedy tokens and top candidates per step, as ``main`` writes them."""
        try:
            self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the engine is gone: its end of the reply pipe is closed too, seen below
        deadline = time.monotonic() + timeout_s
        while not select.select([self.replies], [], [], 1.0)[0]:
            if time.monotonic() > deadline:
                self._fail(TimeoutError, f"colocated run took over {timeout_s} s")
        line = self.replies.readline()
        if not line:
            self._fail(RuntimeError, "colocated run failed")
        return json.loads(line)

    def _fail(self, error: type, message: str):
        self.close(kill=True)
        raise error(f"{message}; the engine's output ends:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def close(self, kill: bool = False) -> None:
        """Stop the engine (end of input, then a kill if it has not exited in 30 s)."""
        for key, engine in list(self._engines.items()):
            if engine is self:
                del self._engines[key]
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.replies.close()


atexit.register(ReferenceEngine.close_all)


def _engine_env(more: dict[str, str] | None = None) -> dict[str, str]:
    """A vLLM engine in the process itself (no engine-core subprocess), 1 GiB of KV cache
    unless the environment (or ``more``) says otherwise."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", **(more or {}))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def run_engine_module(module: str, payload: dict, stem: Path, timeout_s: float = 600,
                      env: dict[str, str] | None = None):
    """``python -m module STEM-in.json STEM-out.json``, ``payload`` the input: a vLLM engine
    in a process of its own (no engine-core subprocess, 1 GiB of KV cache unless the
    environment says otherwise; ``env``: more variables). Returns the output file's JSON;
    ``RuntimeError`` with the process's output tails when it fails,
    ``subprocess.TimeoutExpired`` past ``timeout_s``."""
    inp, out = Path(f"{stem}-in.json"), Path(f"{stem}-out.json")
    inp.write_text(json.dumps(payload))
    proc = subprocess.run([sys.executable, "-m", module, str(inp), str(out)],
                          env=_engine_env(env), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed (colocated run failed):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
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


def _engine(spec: dict):
    from vllm import LLM

    from kvmesh.engine_host.engine_args import changed_engine_kwargs, parse_engine_args

    args = parse_engine_args(["--model", spec["model"], "--block-size", str(spec["block_size"]),
                              *spec.get("engine_args", [])])
    return LLM(**changed_engine_kwargs(args))


def _generate(llm, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=TOP_CANDIDATES)
    outputs = []
    for p in prompts:  # one prompt at a time, as the cluster tests send them
        result = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0]
        outputs.append({"tokens": list(result.token_ids),
                        "top": [{t: lp.logprob for t, lp in step.items()} for step in result.logprobs]})
    return outputs


def main(inp: str, out: str) -> None:
    spec = json.loads(Path(inp).read_text())
    Path(out).write_text(json.dumps(_generate(_engine(spec), spec["prompts"], spec["max_tokens"])))


def serve(spec_path: str, reply_fd: int) -> None:
    """``ReferenceEngine``'s process: one request per line of standard input, one reply
    per line to ``reply_fd``, until standard input ends."""
    llm = _engine(json.loads(Path(spec_path).read_text()))
    with os.fdopen(reply_fd, "wb") as replies:
        for line in sys.stdin.buffer:
            request = json.loads(line)
            replies.write(json.dumps(_generate(llm, request["prompts"], request["max_tokens"])).encode() + b"\n")
            replies.flush()


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main(sys.argv[1], sys.argv[2])
