"""The router's core, shared by the OpenAI HTTP API and the gRPC serving API.

For each request: validate (a refused request leaves no state anywhere), take an
admission slot, choose workers (``router.routing``), prefill with ``max_tokens=1`` so the
prompt's KV lands in the store (unless conditional disaggregation skips it), then stream
the decode worker's tokens. Everything is counted in ``RouterMetrics``.

Failure contract: a failed or late prefill never fails the request (the decode worker
then computes more); a decode failure raises ``ApiError`` (a decode worker unreachable
before the first token is retried on another, or on itself while it may come back within
the request's deadline); so does any other failure (500, counted as an "error"). With no
decode worker up (as ``readiness`` tells) a request fails at once: a 503 that says why,
counted as "unavailable". Cancelling the task running ``generate`` (a client that went
away, or ``cancel(request_id)``) cancels the worker calls, which abort the request on the
workers and free its KV blocks and slots. A worker that leaves the pool (discovery) finishes its
calls before its channel is closed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import grpc

from kvmesh_proto import worker_pb2
from kvmesh_proto.limits import (  # the bounds both sides of the worker API hold
    INT32_MAX, INT64_MAX, INT64_MIN, MAX_CACHE_SALT_CHARS, MAX_REQUEST_ID_CHARS, MAX_SESSION_CHARS,
    MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE,
)
from kvmesh.kv_store.auth import load_secret
from kvmesh.kv_store.keys import chain_hashes
from kvmesh.kv_store.sessions import session_id
from kvmesh.router.admission import Admission, Overloaded
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.routing import Route, RoutingPolicy, Worker
from kvmesh.router.settings import RouterSettings
from kvmesh.router.stores import StoreProbe
from kvmesh.router.tokenizing import Refused, Tokenized, Tokenizing
from kvmesh.router.workers import WorkerClient

log = logging.getLogger("kvmesh.router")


GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
              429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
              503: grpc.StatusCode.UNAVAILABLE,
              504: grpc.StatusCode.DEADLINE_EXCEEDED}
_HTTP_FROM_GRPC = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
                   grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNAVAILABLE: 503}


RETRY_EVERY_S = 0.5  # how often a request retries while no decode worker is healthy
NO_DECODE_POOL = "no decode worker is up: none is configured or registered"


def bearer_ok(api_token: str | None, authorization: str | None) -> bool:
    """Whether an ``authorization`` header (or gRPC metadata) value lets a call in: always
    when the router has no token (None or empty); else only ``Bearer <token>``, compared in
    constant time."""
    if not api_token:
        return True
    return authorization is not None and hmac.compare_digest(
        authorization.encode("utf-8", "replace"), f"Bearer {api_token}".encode())


def _keeps_local_cache(engine_config: str) -> bool:
    """Whether a worker's reported engine config (JSON; "" from a worker that reports
    none) has vLLM's local prefix cache on."""
    try:
        return bool(json.loads(engine_config).get("enable_prefix_caching")) if engine_config else False
    except (ValueError, AttributeError):
        return False


class ApiError(Exception):
    """A request the router refuses or could not serve; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, kind: str | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return GRPC_CODES.get(self.status, grpc.StatusCode.INTERNAL)


class NoDecodeWorker(Exception):
    """No decode worker is up to take a request; the message says what was found."""


@dataclass
class Sampling:
    max_tokens: int | None = 16  # None: what the prompt leaves of the context (``prepare``)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise ``ApiError(400)`` for a value out of range (the HTTP models check the same)."""
        problems = []
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            problems.append(f"temperature must be within [0, {MAX_TEMPERATURE:g}]")
        if not 0.0 < self.top_p <= 1.0:
            problems.append("top_p must be within (0, 1]")
        if not -1 <= self.top_k <= INT32_MAX:
            problems.append(f"top_k must be -1 or 0 (off), or within [1, {INT32_MAX}]")
        if self.seed is not None and not INT64_MIN <= self.seed <= INT64_MAX:
            problems.append(f"seed must be within [{INT64_MIN}, {INT64_MAX}]")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            problems.append(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters")
        if any(not s for s in self.stop):
            problems.append("a stop string must not be empty")
        if problems:
            raise ApiError(400, "; ".join(problems))


@dataclass
class Prepared:
    request_id: str
    token_ids: list[int]
    sampling: Sampling
    cache_salt: str
    session: str = ""  # the session's id (``kv_store.sessions.session_id``), or empty


def load_path(chunk) -> dict[str, float]:
    """A decode worker's last chunk -> its load path in seconds: ``seconds`` (lookup plus
    lease to the last block in the paged cache), ``lookup``, ``placed`` (lease to the last
    block in place) and, of that, ``locate``, ``read``, ``verify`` and ``copy``."""
    return {"seconds": chunk.kv_load_path_s, "lookup": chunk.lookup_s, "placed": chunk.kv_placed_s,
            "locate": chunk.kv_locate_s, "read": chunk.kv_read_s, "verify": chunk.kv_verify_s,
            "copy": chunk.kv_copy_s}


@dataclass
class Trace:
    """What happened to one request, for the response and the metrics."""

    route: str = ""
    prefill_ok: bool = False
    prefill_skipped: bool = False
    prefill_s: float = 0.0
    queue_s: float = 0.0
    prefill_tokens_from_store: int = 0
    decode_tokens_from_store: int = 0
    decode_tokens_local: int = 0  # prompt tokens the decode engine found in its own prefix cache
    decode_tokens_load_failed: int = 0
    ttft_s: float | None = None
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    kv_backend: str = ""
    kv_bytes: int = 0
    kv_transfer_s: float = 0.0
    kv_wait_s: float = 0.0
    # The decode worker's load path: lookup, then lease to the last block in the paged
    # cache, and where that went (locate, read, verify, copy).
    kv_load_path: dict[str, float] = field(default_factory=dict)
    decode_address: str = ""  # the decode worker that served it (a retry may move it)
    tokens_saved: int = 0     # generated tokens whose KV the decode worker saved for the next turn
    # Where the time to first token went (seconds), each stage as the component that
    # spent it measured it: see ``breakdown``.
    stages: dict[str, float] = field(default_factory=dict)

    def note_worker(self, role: str, chunk) -> None:
        """A worker's last chunk: its engine's queue and first step, the store lookup."""
        self.stages[f"{role}_engine_queue"] = chunk.engine_queue_s
        first = "prefill_compute" if role == "prefill" else "decode_first_step"
        self.stages[first] = chunk.engine_first_token_s
        if role == "decode":
            self.stages["lookup"] = chunk.lookup_s
            self.stages["load"], self.stages["load_waited"] = chunk.kv_transfer_s, chunk.kv_wait_s

    def breakdown(self) -> dict[str, float]:
        """Stage -> seconds: router_queue, prefill (the whole prefill call) and, inside
        it, prefill_engine_queue and prefill_compute; then on the decode worker lookup,
        decode_engine_queue, load (of which load_waited held the forward pass up) and
        decode_first_step (from first scheduled to the first token, the load included)."""
        return {"router_queue": self.queue_s, "prefill": self.prefill_s, **self.stages}

    def info(self) -> dict:
        return {"ttft_s": self.ttft_s, "queue_s": self.queue_s, "prefill_s": self.prefill_s,
                "prefill_ok": self.prefill_ok, "prefill_skipped": self.prefill_skipped,
                "route": self.route,
                "prefix_tokens_from_store": {"prefill": self.prefill_tokens_from_store,
                                             "decode": self.decode_tokens_from_store},
                "prefix_tokens_local": self.decode_tokens_local,
                "kv_load_failed_tokens": self.decode_tokens_load_failed,
                "tokens_saved": self.tokens_saved,
                "kv_transfer": {"backend": self.kv_backend, "bytes": self.kv_bytes,
                                "seconds": self.kv_transfer_s, "waited_s": self.kv_wait_s,
                                "load_path": self.kv_load_path},
                "breakdown": self.breakdown()}


class RouterCore:
    def __init__(self, settings: RouterSettings):
        self.settings = settings
        self.secret = load_secret(settings.cluster_secret_file)  # ValueError: a bad file
        self.metrics = RouterMetrics()
        self.tokenizer = None
        self.tokenizing: Tokenizing | None = None  # the tokenizer, off the event loop
        self.routing: RoutingPolicy | None = None
        self.admission = Admission(settings.max_inflight, settings.max_queue, settings.queue_timeout)
        self.metrics.inflight.set_function(lambda: self.admission.inflight)
        self.metrics.queued.set_function(lambda: self.admission.queued)
        self._max_model_len: int | None = None
        self._last_status: dict[str, str] = {}  # per worker, what the last health poll found
        self.stores: list[StoreProbe] = []  # settings.store, probed with the workers (start())
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancel_requested: set[str] = set()
        self._leaving: dict[tuple[str, str], tuple[Worker, asyncio.Task]] = {}  # (role, address) -> (worker, closer)

    async def start(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.settings.model)
        s = self.settings
        self.tokenizing = Tokenizing(self.tokenizer, s.tokenize_threads, s.max_queue)
        self.routing = RoutingPolicy(
            prefill=[Worker(a, self._client(a)) for a in s.prefill],
            decode=[Worker(a, self._client(a)) for a in s.decode],
            block_size=s.block_size, policy=s.routing, decode_local_cache=s.decode_local_cache,
            max_local_prefill_tokens=s.max_local_prefill_tokens,
            max_decode_prefill_tokens=s.max_decode_prefill_tokens,
            busy_decode_streams=s.busy_decode_streams)
        self._registry = None
        if s.index:
            from kvmesh.kv_store.index.services import ServiceRegistry

            self._registry = ServiceRegistry(s.index)
            await self._discover()
        self.stores = [StoreProbe(a, self.secret, s.health_timeouts_to_fail) for a in s.store]
        self._health_task = asyncio.ensure_future(self._poll_health())

    def _client(self, address: str) -> WorkerClient:
        """A client of the worker at ``address``; its calls carry the cluster secret."""
        return WorkerClient(address, secret=self.secret)

    async def _discover(self) -> None:
        """Take the worker pools from the service registry (in a thread: Redis blocks).
        A worker that left gets no new requests; its channel is closed once its calls are
        done (``_close_when_idle``), and a worker that comes back before that is kept."""
        for role in ("prefill", "decode"):
            addresses = await asyncio.to_thread(self._registry.members, role)
            pool = self.routing.prefill if role == "prefill" else self.routing.decode
            known = {w.address: w for w in pool}
            workers = [known.get(a) or self._rejoin((role, a)) or Worker(a, self._client(a))
                       for a in addresses]
            for gone in self.routing.set_members(role, workers):
                log.info("%s worker %s left", role, gone.address)
                self._leaving[role, gone.address] = (gone, asyncio.ensure_future(
                    self._close_when_idle((role, gone.address), gone)))

    def _rejoin(self, key: tuple[str, str]) -> Worker | None:
        """The worker that left ``key`` (role, address) if its channel is still open, else None."""
        worker, closer = self._leaving.pop(key, (None, None))
        if closer is not None:
            closer.cancel()
        return worker

    async def _close_when_idle(self, key: tuple[str, str], worker: Worker) -> None:
        """Close a departed worker's channel once no call runs on it; at the latest when
        the longest call could still be running has passed its deadline."""
        give_up = time.monotonic() + max(self.settings.request_timeout, self.settings.prefill_timeout)
        while worker.inflight > 0 and time.monotonic() < give_up:
            await asyncio.sleep(0.1)
        self._leaving.pop(key, None)  # from here on it cannot rejoin
        await worker.client.close()

    async def _poll_health(self) -> None:
        """Keep every worker's ``healthy`` flag current (and, with an index, the pools);
        routing avoids unhealthy workers."""
        while True:
            try:
                if self._registry is not None:
                    await self._discover()
                await self.health()
            except Exception as e:  # never let the poller die
                log.warning("health poll failed: %s", e)
            await asyncio.sleep(self.settings.health_interval)

    async def close(self) -> None:
        self._health_task.cancel()
        if self._registry is not None:
            self._registry.close()
        leaving = [self._rejoin(key) for key in list(self._leaving)]
        for worker in self.routing.prefill + self.routing.decode + leaving:
            await worker.client.close()
        for store in self.stores:
            await store.close()
        self.tokenizing.close()

    # ------------------------------------------------------------------ validation

    async def max_model_len(self) -> int:
        if self._max_model_len is None:
            for worker in self.routing.decode:
                try:
                    self._max_model_len = (await worker.client.health()).max_model_len
                    break
                except grpc.aio.AioRpcError:
                    continue
            else:
                raise ApiError(503, "no decode worker is reachable")
        return self._max_model_len

    def check_model(self, model: str | None) -> None:
        if model and model != self.settings.name:
            raise ApiError(404, f"model {model!r} is not served here; this router serves "
                                f"{self.settings.name!r}", "not_found_error")

    async def encode_chat(self, messages: Sequence[dict]) -> Tokenized:
        """The conversation through the chat template, tokenized off the event loop (for
        ``prepare``); ``ApiError`` 400 when the template refuses it, 429 when too much
        heavy tokenizing is under way."""
        limit = await self.max_model_len()
        try:
            return await self.tokenizing.encode_chat(messages, limit)
        except Refused as e:
            raise ApiError(e.status, e.message, e.kind) from None

    async def prepare(self, prompt: str | Sequence[int] | Tokenized, sampling: Sampling, *,
                      model: str | None = None, cache_salt: str | None = None,
                      request_id: str | None = None, session: str | None = None) -> Prepared:
        """Validate a request into token ids; raises ``ApiError`` (4xx) and changes nothing.
        ``prompt`` is text (tokenized off the event loop), token ids, or what
        ``encode_chat`` made. ``sampling.max_tokens`` None becomes what the prompt leaves
        of the model's context (in the returned ``Prepared``; ``sampling`` itself is left
        as it is); a prompt that leaves nothing is a 400, as is one that leaves less than
        a given ``max_tokens``. Cheap checks come before the tokenizer runs. ``session``
        names the conversation the request belongs to, within its ``cache_salt``."""
        self.check_model(model)
        sampling.check()
        self.check_cache_salt(cache_salt)
        self.check_session(session)
        if request_id is not None and (len(request_id) > MAX_REQUEST_ID_CHARS or request_id in self._tasks):
            raise ApiError(400, "request_id must be unique among running requests and at most "
                                f"{MAX_REQUEST_ID_CHARS} characters")
        limit = await self.max_model_len()
        if isinstance(prompt, Tokenized):
            tokens = prompt
        elif isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt must not be empty")
            try:
                tokens = await self.tokenizing.encode(prompt, limit)
            except Refused as e:
                raise ApiError(e.status, e.message, e.kind) from None
        else:
            if not prompt:
                raise ApiError(400, "prompt must not be empty")
            tokens = Tokenized(len(prompt), list(prompt) if len(prompt) <= limit else None)
            vocab = self.tokenizing.vocab_size
            bad = next((t for t in tokens.ids or () if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is outside the vocabulary of {vocab}")
        if not tokens.count:
            raise ApiError(400, "prompt encodes to no tokens")
        if sampling.max_tokens is None:
            if tokens.count >= limit:
                raise ApiError(400, f"prompt ({tokens.count} tokens) fills the model's context of "
                                    f"{limit} tokens: no room left to generate")
            sampling = dataclasses.replace(sampling, max_tokens=limit - tokens.count)
        elif tokens.count + sampling.max_tokens > limit:
            raise ApiError(400, f"prompt ({tokens.count} tokens) plus max_tokens "
                                f"({sampling.max_tokens}) exceeds the model's context of {limit} tokens")
        return Prepared(request_id or f"cmpl-{uuid.uuid4().hex}", tokens.ids, sampling, cache_salt or "",
                        session_id(session, cache_salt) if session else "")

    @staticmethod
    def check_cache_salt(cache_salt: str | None) -> None:
        """``ApiError`` 400 for a cache salt over ``MAX_CACHE_SALT_CHARS`` characters."""
        if cache_salt is not None and len(cache_salt) > MAX_CACHE_SALT_CHARS:
            raise ApiError(400, f"cache_salt is longer than {MAX_CACHE_SALT_CHARS} characters")

    @staticmethod
    def check_session(session: str | None) -> None:
        """``ApiError`` 400 for a session name over ``MAX_SESSION_CHARS`` characters."""
        if session is not None and len(session) > MAX_SESSION_CHARS:
            raise ApiError(400, f"session is longer than {MAX_SESSION_CHARS} characters")

    # ------------------------------------------------------------------ sessions

    async def session_call(self, name: str, cache_salt: str | None, release: bool) -> dict:
        """Release a session, or say where its blocks are, on every store (``--store``).
        A tenant reaches only the sessions of its own ``cache_salt``: the stores know a
        session by a hash of the salt and its name. ``ApiError`` 400 for a bad name,
        503 when no store is configured or one does not answer."""
        self.check_session(name)
        if not name:
            raise ApiError(400, "session must not be empty")
        self.check_cache_salt(cache_salt)
        if not self.stores:
            raise ApiError(503, "this router knows no store (--store): sessions cannot be reached")
        sid = session_id(name, cache_salt)
        timeout = self.settings.health_timeout
        try:
            replies = await asyncio.gather(*(
                (s.release_session if release else s.session)(sid, timeout) for s in self.stores))
        except grpc.aio.AioRpcError as e:
            raise ApiError(503, f"a store did not answer: {e.code().name}") from None
        if release:
            held = [r.blocks for r in replies if r.released]
            return {"session": name, "released": bool(held), "blocks": sum(held)}
        found = [o for r in replies for o in r.sessions]
        if not found:
            raise ApiError(404, f"no session {name!r} is kept", "not_found_error")
        blocks: dict[str, int] = {}
        for o in found:
            for tier, n in o.blocks.items():
                blocks[tier] = blocks.get(tier, 0) + n
        return {"session": name, "state": "active" if any(o.state == "active" for o in found) else "idle",
                "idle_s": min(o.idle_s for o in found), "blocks": blocks}

    # ------------------------------------------------------------------ serving

    def cancel(self, request_id: str) -> bool:
        """Cancel a running request by id; False if no such request runs. Its caller sees
        ``ApiError(499)``, and the workers abort it."""
        task = self._tasks.get(request_id)
        if task is None:
            return False
        self._cancel_requested.add(request_id)
        task.cancel()
        return True

    def _worker_request(self, p: Prepared) -> worker_pb2.GenerateRequest:
        s = p.sampling
        sampling = worker_pb2.SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            stop=s.stop, ignore_eos=s.ignore_eos)
        if s.seed is not None:
            sampling.seed = s.seed
        return worker_pb2.GenerateRequest(request_id=p.request_id, prompt_token_ids=p.token_ids,
                                          sampling=sampling, cache_salt=p.cache_salt, session=p.session)

    async def _prefill(self, worker: Worker, request: worker_pb2.GenerateRequest, trace: Trace,
                       uncached: int, start: float) -> None:
        """Prefill on ``worker`` within ``prefill_timeout``, and never past the request's
        own deadline (``request_timeout`` from ``start``); failing or late, it only notes it."""
        pre = worker_pb2.GenerateRequest()
        pre.CopyFrom(request)
        pre.request_id = request.request_id + "-prefill"
        pre.sampling.CopyFrom(worker_pb2.SamplingParams(max_tokens=1, temperature=0.0))
        start = time.monotonic()
        worker.inflight += 1
        worker.pending_tokens += uncached
        try:
            left = self.settings.request_timeout - (time.monotonic() - start)
            async for chunk in worker.client.generate(pre, max(0.1, min(self.settings.prefill_timeout, left))):
                if chunk.finish_reason:
                    trace.prefill_ok = True
                    trace.prefill_tokens_from_store = chunk.tokens_from_store
                    trace.note_worker("prefill", chunk)
        except grpc.aio.AioRpcError as e:
            self.metrics.prefill_failures.inc()
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                worker.healthy = False
            log.warning("prefill of %s on %s failed (%s: %s); decode will compute the prompt",
                        request.request_id, worker.address, e.code().name, e.details())
        finally:
            worker.inflight -= 1
            worker.pending_tokens -= uncached
            trace.prefill_s = time.monotonic() - start

    async def generate(self, p: Prepared, trace: Trace) -> AsyncIterator[worker_pb2.GenerateChunk]:
        """Yield the decode worker's chunks for a prepared request; raises ``ApiError``."""
        start = time.monotonic()
        outcome = "cancelled"
        self._tasks[p.request_id] = asyncio.current_task()
        try:
            self._check_decode_up()
            async with self.admission.slot() as queued_s:
                trace.queue_s = queued_s
                self.metrics.queue_time.observe(queued_s)
                self._check_decode_up()  # again: the slot may have taken a while
                route = self.routing.choose(p.token_ids, p.cache_salt)
                trace.route = route.reason
                self.metrics.routing.labels(route.reason).inc()
                request = self._worker_request(p)
                if route.prefill is None:
                    trace.prefill_skipped = True
                    self.metrics.prefill_skipped.inc()
                else:
                    await self._prefill(route.prefill, request, trace,
                                        self.routing.uncached_tokens(route, len(p.token_ids)), start)
                    if p.request_id in self._cancel_requested:  # cancelled while prefilling
                        raise asyncio.CancelledError
                async with aclosing(self._decode(route, request, trace, start)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                if trace.prefill_ok or trace.prefill_skipped:
                    computed = p.token_ids + trace.token_ids[:-1]  # the last token has no KV yet
                    self.routing.record(route, trace.decode_address,
                                        chain_hashes(computed, self.settings.block_size, p.cache_salt or None))
            outcome = "ok"
        except Overloaded as e:
            outcome = "overloaded"
            raise ApiError(429, str(e), "overloaded_error")
        except NoDecodeWorker as e:
            outcome = "unavailable"
            raise ApiError(503, str(e)) from None
        except grpc.aio.AioRpcError as e:
            if p.request_id in self._cancel_requested:  # gRPC reports our cancel as CANCELLED
                raise ApiError(499, "request cancelled") from None
            outcome = "error"
            status = _HTTP_FROM_GRPC.get(e.code(), 502)
            raise ApiError(status, f"decode worker: {e.details() or e.code().name}")
        except asyncio.CancelledError:
            if p.request_id in self._cancel_requested:  # by cancel(): tell the caller
                raise ApiError(499, "request cancelled") from None
            raise
        except ApiError:
            outcome = "error"
            raise
        except Exception as e:  # a bug: answer 500, count it as an error, log it
            outcome = "error"
            log.exception("request %s failed", p.request_id)
            raise ApiError(500, f"internal error: {type(e).__name__}") from e
        finally:
            self._tasks.pop(p.request_id, None)
            self._cancel_requested.discard(p.request_id)
            self._record(trace, len(p.token_ids), outcome, start)

    def decode_down(self) -> str | None:
        """Why no decode worker can take a request now — the pool is empty, or every
        worker in it is down (the view of ``readiness``: the health poll's, or a failed
        call's since) — or None when one can."""
        if not self.routing.decode:
            return NO_DECODE_POOL
        if any(w.healthy for w in self.routing.decode):
            return None
        _, status = self.readiness()
        found = "; ".join(f"{name}: {text}" for name, text in status.items() if name.startswith("decode "))
        return f"no decode worker is up ({found}); retry later"

    def refuse_if_decode_down(self) -> None:
        """``ApiError(503)``, counted as "unavailable", when ``decode_down`` says why: what
        ``generate`` would answer, for a caller whose answer starts before it runs (an
        HTTP stream, whose 200 goes out first)."""
        why = self.decode_down()
        if why is not None:
            self.metrics.requests.labels("unavailable").inc()
            raise ApiError(503, why)

    def _check_decode_up(self) -> None:
        why = self.decode_down()
        if why is not None:
            raise NoDecodeWorker(why)

    async def _decode(self, route: Route, request, trace: Trace, start: float):
        """Stream from the route's decode worker. A worker that is unreachable before the
        first token is marked unhealthy and the request moves to a healthy one. With none
        healthy the request tries again every ``RETRY_EVERY_S`` while a worker may still
        come back in time: for ``unavailable_retry`` seconds, never past the request's
        deadline (``request_timeout`` from ``start``), and not at all once the pool is
        empty. So a worker restart loses no request, and no request waits for nothing. A
        worker that serves the request is marked healthy again."""
        worker = route.decode
        give_up = min(time.monotonic() + self.settings.unavailable_retry,
                      start + self.settings.request_timeout)
        while True:
            if worker not in self.routing.decode:  # it left while we prefilled or waited
                if not self.routing.decode:
                    raise NoDecodeWorker(NO_DECODE_POOL)
                worker = self._least_loaded_decode()
            try:
                async with aclosing(self._decode_on(worker, request, trace, start)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                worker.healthy = True  # it served a request: up, whatever a call before found
                return
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or trace.token_ids:
                    raise
                worker.healthy = False
                healthy = any(w.healthy for w in self.routing.decode)
                if not healthy and (not self.routing.decode or time.monotonic() + RETRY_EVERY_S > give_up):
                    raise  # none can come back in time
                self.metrics.decode_retries.inc()
                log.warning("decode worker %s unavailable; retrying %s %s", worker.address,
                            request.request_id, "elsewhere" if healthy else f"in {RETRY_EVERY_S:g} s")
                if not healthy:
                    await asyncio.sleep(RETRY_EVERY_S)  # none healthy: wait for one to come back
                worker = None  # the loop's top picks the next one

    def _least_loaded_decode(self) -> Worker:
        """The least-loaded healthy decode worker (any, when none is healthy)."""
        pool = [w for w in self.routing.decode if w.healthy] or self.routing.decode
        return min(pool, key=lambda w: w.inflight)

    async def _decode_on(self, worker: Worker, request, trace: Trace, start: float):
        self.metrics.decode_requests.labels(worker.address).inc()
        trace.decode_address = worker.address
        remaining = max(1.0, self.settings.request_timeout - (time.monotonic() - start))
        worker.inflight += 1
        try:
            async with aclosing(worker.client.generate(request, remaining)) as chunks:
                last = None
                async for chunk in chunks:
                    last = self._note(trace, chunk, start, last)
                    yield chunk
        finally:
            worker.inflight -= 1

    def _note(self, trace: Trace, chunk, start: float, last: float | None) -> float | None:
        """Fold a decode chunk into the request's trace (and the inter-token metric);
        returns when the request's latest tokens came (``last`` for a chunk without any)."""
        now = time.monotonic()
        if chunk.token_ids:
            if trace.ttft_s is None:
                trace.ttft_s = now - start
            elif last is not None:
                self.metrics.itl.observe((now - last) / len(chunk.token_ids))
            last = now
        trace.token_ids.extend(chunk.token_ids)
        if chunk.finish_reason:
            trace.finish_reason = chunk.finish_reason
            trace.decode_tokens_from_store = chunk.tokens_from_store
            trace.decode_tokens_local = max(0, chunk.tokens_cached - chunk.tokens_from_store)
            trace.decode_tokens_load_failed = chunk.tokens_load_failed
            trace.kv_backend, trace.kv_bytes = chunk.kv_backend, chunk.kv_bytes
            trace.kv_transfer_s, trace.kv_wait_s = chunk.kv_transfer_s, chunk.kv_wait_s
            trace.kv_load_path = load_path(chunk)
            trace.tokens_saved = chunk.tokens_saved
            trace.note_worker("decode", chunk)
        return last

    def _record(self, trace: Trace, num_prompt: int, outcome: str, started: float) -> None:
        m = self.metrics
        m.requests.labels(outcome).inc()
        if outcome in ("overloaded", "unavailable"):
            return
        m.prompt_tokens.inc(num_prompt)
        m.generated_tokens.inc(len(trace.token_ids))
        m.tokens_from_store.labels("prefill").inc(trace.prefill_tokens_from_store)
        m.tokens_from_store.labels("decode").inc(trace.decode_tokens_from_store)
        m.tokens_load_failed.labels("decode").inc(trace.decode_tokens_load_failed)
        if trace.ttft_s is not None:
            m.ttft.observe(trace.ttft_s)
            for stage, seconds in trace.breakdown().items():
                m.stages.labels(stage).observe(seconds)
        m.tokens_saved.inc(trace.tokens_saved)
        if trace.kv_backend:
            m.kv_loads.labels(trace.kv_backend).inc()
            m.kv_bytes.labels(trace.kv_backend).inc(trace.kv_bytes)
            if trace.kv_transfer_s > 0:
                m.kv_hidden.observe(max(0.0, 1.0 - trace.kv_wait_s / trace.kv_transfer_s))
        m.e2e.observe(time.monotonic() - started)

    def _workers(self) -> list[tuple[str, Worker]]:
        """Every worker in the pools, with its role."""
        return [("prefill", w) for w in self.routing.prefill] + [("decode", w) for w in self.routing.decode]

    async def health(self) -> tuple[bool, dict[str, str]]:
        """Ask every worker for its health and update its ``healthy`` flag: an error status
        or a refused call marks it down at once; timed-out calls only once
        ``health_timeouts_to_fail`` of them come in a row (a busy worker answers late, and
        requests that fail on it mark it down anyway). Every store in ``settings.store``
        is asked too, by the same rules. All are asked at once, so a poll takes at most
        ``health_timeout_s``. Returns whether every worker and store is healthy (and there
        is a decode worker), with each one's status ("store ADDRESS" for a store);
        ``readiness`` answers from what the last poll found."""
        workers = self._workers()
        timeout = self.settings.health_timeout
        found = await asyncio.gather(*(self._health_of(w) for _, w in workers),
                                     *(store.probe(timeout) for store in self.stores))
        status = {f"{role} {w.address}": text for (role, w), text in zip(workers, found)}
        status.update({f"store {store.address}": store.status for store in self.stores})
        self._last_status = status
        ok = (bool(self.routing.decode) and all(w.healthy for _, w in workers)
              and all(store.healthy for store in self.stores))
        return ok, status

    async def _health_of(self, w: Worker) -> str:
        try:
            reply = await w.client.health(self.settings.health_timeout)
        except grpc.aio.AioRpcError as e:
            late = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            w.health_timeouts = w.health_timeouts + 1 if late else 0
            if late and w.healthy and w.health_timeouts < self.settings.health_timeouts_to_fail:
                return f"ok (a late health reply, {w.health_timeouts} in a row)"
            w.healthy = False
            return f"unavailable ({e.code().name})"
        w.healthy, w.health_timeouts = reply.status == "ok", 0
        w.local_cache = _keeps_local_cache(reply.engine_config)
        return reply.status

    def readiness(self) -> tuple[str, dict[str, str]]:
        """The router's state without asking anyone (what the health poller and failed
        calls last found): "ok" when every worker and store is healthy, "degraded" when
        some are not but a decode worker is (requests are served: a missing prefill worker
        means decode computes the prompt, a missing store that nothing cached is reused),
        "unavailable" when no decode worker is healthy. With each worker's and store's
        last status ("down (a call to it failed)" for a worker marked down since that
        poll); a store is named "store ADDRESS"."""
        workers = self._workers()
        status = {}
        for role, w in workers:
            name = f"{role} {w.address}"
            text = self._last_status.get(name, "ok" if w.healthy else "down")
            status[name] = text if w.healthy or not text.startswith("ok") else "down (a call to it failed)"
        status.update({f"store {store.address}": store.status for store in self.stores})
        if not any(w.healthy for w in self.routing.decode):
            return "unavailable", status
        up = all(w.healthy for _, w in workers) and all(store.healthy for store in self.stores)
        return ("ok" if up else "degraded"), status
