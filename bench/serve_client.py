"""Sending a workload to an OpenAI-compatible server, as ``vllm bench serve`` does.

Each request goes through vLLM's own benchmark request functions
(``vllm.benchmarks.lib.endpoint_request_func``: streaming completions or chat
completions), so time to first token and inter-token latency are measured exactly as vLLM
users know them: TTFT from sending to the first chunk with a choice, one inter-token
gap per later chunk. Those functions keep only the text; the session they are handed here
also keeps a copy of the bytes streamed back, from which the benchmark reads what they
drop: the generated token ids (``return_token_ids``, which both kvmesh and vLLM support),
the prompt's token count and, from kvmesh, the per-request ``kvmesh`` breakdown.

One correction to those functions' timing: they count every chunk with a choice, and
vLLM's chat API sends the assistant's role in a chunk of its own just before the first
token's (kvmesh sends both in one), which would add a near-zero inter-token gap to every
vLLM chat request. Here chunks that carry no token are left out of the timing: TTFT is to
the first chunk with a token, and each later chunk with tokens gives one gap.

Every request is greedy (temperature 0) with ``ignore_eos``, so answers have the length
asked for. A request fails (``Record.ok`` False, the reason in ``error``) on an HTTP error,
an error event in the stream, no token, or the timeout; a conversation stops at its first
failed step (its later steps are never sent).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

from kvmesh.bench.serve_workloads import Session, Step, Workload

if TYPE_CHECKING:
    import aiohttp

APIS = ("chat", "completions")


@dataclass
class Record:
    """One request's outcome. Times in seconds; ``start_s`` from the workload's start."""

    session: str
    index: int                       # the step's place in its session
    kind: str
    group: str
    ok: bool = False
    error: str = ""
    start_s: float = 0.0
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    prompt_tokens: int | None = None
    output_tokens: int = 0
    text: str = ""
    token_ids: list[int] | None = None
    kvmesh: dict | None = None       # the router's breakdown (kvmesh only)

    @property
    def key(self) -> tuple[str, int]:
        return self.session, self.index

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        return cls(**data)


@dataclass
class Run:
    """A workload's records on one system, and how long it took (first send to last answer)."""

    records: list[Record]
    duration_s: float


# ---------------------------------------------------------------- prompts


def chat_messages(history: list[tuple[str, str]], message: str) -> list[dict]:
    """The conversation so far (user message, answer pairs) and the new message."""
    messages = []
    for user, answer in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": message}]


def completion_prompt(history: list[tuple[str, str]], message: str) -> str:
    """The same conversation as one text prompt for the completions API."""
    return "".join(f"{user}\nAnswer:{answer}\n\n" for user, answer in history) + f"{message}\nAnswer:"


# ---------------------------------------------------------------- recording session


class RecordingSession:
    """What vLLM's request functions use of an ``aiohttp.ClientSession`` (``post`` as an
    async context manager; the response's ``status``, ``reason`` and
    ``content.iter_any()``), over a shared session, keeping every byte of the response in
    ``raw`` (the body of an error response too) without delaying the stream."""

    def __init__(self, session: aiohttp.ClientSession):
        self._session = session
        self.raw: list[bytes] = []

    def post(self, **kwargs) -> "_RecordingPost":
        return _RecordingPost(self._session.post(**kwargs), self.raw)


class _RecordingPost:
    def __init__(self, request, raw: list[bytes]):
        self._request, self._raw = request, raw

    async def __aenter__(self):
        response = await self._request.__aenter__()
        if response.status != 200:
            self._raw.append(await response.read())
        return _RecordingResponse(response, self._raw)

    async def __aexit__(self, *exc):
        return await self._request.__aexit__(*exc)


class _RecordingResponse:
    def __init__(self, response, raw: list[bytes]):
        self._response = response
        self.content = _RecordingContent(response.content, raw)

    def __getattr__(self, name):
        return getattr(self._response, name)


class _RecordingContent:
    def __init__(self, content, raw: list[bytes]):
        self._content, self._raw = content, raw

    async def iter_any(self):
        async for chunk in self._content.iter_any():
            self._raw.append(chunk)
            yield chunk


def read_stream(raw: bytes) -> dict:
    """What a recorded server-sent-event stream (or error body) says beyond the text:
    ``token_ids`` (None when no chunk carried any), ``prompt_tokens`` (from the usage),
    ``kvmesh`` (the router's breakdown), ``error`` (an error event's message, or "") and
    ``chunk_tokens`` (per chunk with a choice, in order: how many tokens it carried — its
    token ids, else 1 for non-empty text, else 0)."""
    found = {"token_ids": None, "prompt_tokens": None, "kvmesh": None, "error": "", "chunk_tokens": []}
    text = raw.decode("utf-8", errors="replace")
    if not text.lstrip().startswith("data:"):  # an error response's body
        try:
            body = json.loads(text)
            found["error"] = (body.get("error") or {}).get("message", "") or text[:300]
        except (json.JSONDecodeError, AttributeError):
            found["error"] = text[:300]
        return found
    for message in text.split("\n\n"):
        payload = "\n".join(line[5:].lstrip() for line in message.split("\n") if line.startswith("data:"))
        if not payload or payload == "[DONE]":
            continue
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            found["error"] = found["error"] or f"unreadable event: {payload[:200]}"
            continue
        if "error" in data:
            error = data["error"]
            found["error"] = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        if data.get("choices"):
            choice = data["choices"][0]
            ids = choice.get("token_ids")
            if ids is not None:
                found["token_ids"] = (found["token_ids"] or []) + list(ids)
            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            found["chunk_tokens"].append(len(ids) if ids else int(bool(text)))
        if data.get("usage"):
            found["prompt_tokens"] = data["usage"].get("prompt_tokens")
        if data.get("kvmesh"):
            found["kvmesh"] = data["kvmesh"]
    return found


# ---------------------------------------------------------------- sending


async def send(session: aiohttp.ClientSession, base_url: str, model: str, api: str,
               history: list[tuple[str, str]], step: Step, record: Record) -> None:
    """Send one step through vLLM's request function and fill ``record`` in."""
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput, async_request_openai_chat_completions, async_request_openai_completions)

    if api == "chat":
        prompt, url, request = chat_messages(history, step.message), "/v1/chat/completions", \
            async_request_openai_chat_completions
    else:
        prompt, url, request = completion_prompt(history, step.message), "/v1/completions", \
            async_request_openai_completions
    recorder = RecordingSession(session)
    out = await request(RequestFuncInput(
        prompt=prompt, api_url=base_url + url, prompt_len=0, output_len=step.output_tokens,
        model=model, ignore_eos=True,
        extra_body={"temperature": 0.0, "return_token_ids": True}), recorder)
    found = read_stream(b"".join(recorder.raw))
    record.ok = bool(out.success) and not found["error"]
    record.error = found["error"] or ("" if out.success else _last_line(out.error))
    record.ttft_s, record.itl_s = token_chunk_times(out.ttft, list(out.itl), found["chunk_tokens"])
    record.latency_s = out.latency
    record.output_tokens = out.output_tokens or len(found["token_ids"] or ())
    record.text, record.token_ids = out.generated_text, found["token_ids"]
    record.prompt_tokens, record.kvmesh = found["prompt_tokens"], found["kvmesh"]


def token_chunk_times(ttft: float, itl: list[float], chunk_tokens: list[int]) -> tuple[float, list[float]]:
    """(TTFT, gaps) counting only the chunks that carried tokens, from the times vLLM's
    request function took at every chunk with a choice (``ttft`` then ``itl``) and what
    each of those chunks carried (``chunk_tokens``, in the same order). Unchanged when the
    two do not line up (nothing to correct by)."""
    if len(chunk_tokens) != len(itl) + 1 or all(chunk_tokens):
        return ttft, itl
    at, times = ttft, []
    for gap, tokens in zip([0.0] + itl, chunk_tokens):
        at += gap
        if tokens:
            times.append(at)
    if not times:
        return ttft, itl
    return times[0], [b - a for a, b in zip(times, times[1:])]


def _last_line(error: str) -> str:
    lines = [line for line in (error or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "failed"


async def drive(workload: Workload, base_url: str, model: str, api: str = "chat",
                timeout_s: float = 600.0, progress: Callable[[str], None] | None = None) -> Run:
    """Run ``workload`` against the server at ``base_url`` (serving ``model``); every request
    has at most ``timeout_s``. Progress lines go to ``progress`` every few seconds."""
    import aiohttp

    if api not in APIS:
        raise ValueError(f"unknown API {api!r}; choose one of {', '.join(APIS)}")
    records: list[Record] = []
    done = [0]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        start = time.perf_counter()

        async def run_session(s: Session) -> None:
            history: list[tuple[str, str]] = []
            ended = start
            for i, step in enumerate(s.steps):
                wait = max(start + step.at_s, ended + step.after_s) - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                record = Record(s.name, i, step.kind, step.group, start_s=time.perf_counter() - start)
                records.append(record)
                await send(session, base_url, model, api, history if s.conversation else [], step, record)
                ended = time.perf_counter()
                done[0] += 1
                if not record.ok:
                    return
                history.append((step.message, record.text))

        async def report() -> None:
            while True:
                await asyncio.sleep(10)
                progress(f"{done[0]}/{workload.requests} requests answered "
                         f"({time.perf_counter() - start:.0f} s)")

        reporter = asyncio.ensure_future(report()) if progress else None
        try:
            await asyncio.gather(*(run_session(s) for s in workload.sessions))
        finally:
            if reporter is not None:
                reporter.cancel()
        duration = time.perf_counter() - start
    records.sort(key=lambda r: (r.session, r.index))
    return Run(records, duration)
