"""The router's OpenAI-compatible HTTP API over ``RouterCore``.

``/v1/completions`` and ``/v1/chat/completions`` (streaming as server-sent events, or
not), ``/v1/models``, ``/health``, ``/metrics``. Every error, on every path, is
OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``; ``param`` names the
request field a 400 is about, when one does): the app's own refusals, FastAPI's (an
unknown path, a wrong method, a body that does not validate), the body checks of
``json_body`` and, at the connection level, those of ``http_server``. Malformed input is
always a 4xx. A client that disconnects — mid-stream or while waiting for a
non-streaming answer — cancels the request everywhere.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing, asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from kvmesh.kv_store.gc_tuning import freeze_startup_objects
from kvmesh.router.core import ApiError, Prepared, RouterCore, RouterSettings, Trace, bearer_ok
from kvmesh.router.json_body import JsonRoute
from kvmesh.router.openai_api import (ChatCompletionRequest, CompletionRequest, SessionRequest, chat_chunk,
                               chat_completion, completion_chunk, error_body, usage)

__all__ = ["create_app", "router_server", "RouterSettings"]


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body (an async generator) however the
    response ends: finished, the client gone, a send that failed or was cancelled while
    blocked on a client that stopped reading. Starlette leaves a body it stopped
    iterating to the garbage collector, and with it the request below (its admission
    slot, the worker's call and the KV it holds) until a collection ran."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class LimitsAndAuth:
    """ASGI middleware guarding ``/v1/``: with an API token, a request must carry
    ``authorization: Bearer <token>`` (else 401); its body may be at most ``max_bytes``
    (else 413), judged by ``Content-Length`` when given and by the bytes actually received
    in any case (a chunked body too), and never read past that limit. It reads the body
    before the endpoint runs and hands it on as one message; later ``receive`` calls go
    to the server, so ``request.is_disconnected()`` still sees a client that went away
    (Starlette's ``BaseHTTPMiddleware`` hides that). Other paths pass through untouched."""

    def __init__(self, app, api_token: str | None, max_bytes: int):
        self.app, self.api_token, self.max_bytes = app, api_token, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if not bearer_ok(self.api_token, headers.get("authorization")):
            return await _refuse(scope, receive, send, 401, "missing or wrong bearer token",
                                 "authentication_error")
        too_large = f"request body larger than {self.max_bytes} bytes"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _refuse(scope, receive, send, 413, too_large)
        body, more = [], True
        received = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            body.append(message.get("body", b""))
            received += len(body[-1])
            if received > self.max_bytes:
                return await _refuse(scope, receive, send, 413, too_large)
            more = message.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


async def _refuse(scope, receive, send, status: int, message: str, kind: str = "invalid_request_error"):
    await JSONResponse(error_body(message, status, kind), status_code=status)(scope, receive, send)


def router_server(settings: RouterSettings, core: RouterCore | None = None):
    """The router, assembled from its settings (the one place that does it, for
    ``kvmesh router``, ``kvmesh serve`` and the Ray router actor alike): a uvicorn server of
    ``create_app(settings, core)`` on ``settings.host:settings.port``, with the header and
    body timeouts of ``http_server``. ``run()`` serves until ``should_exit`` is set; the
    app is its ``config.app``."""
    from kvmesh.router.http_server import http_server

    return http_server(create_app(settings, core), settings)


def create_app(settings: RouterSettings, core: RouterCore | None = None) -> FastAPI:
    """The HTTP app; it starts and closes ``core`` (made from ``settings`` when None) and,
    when ``settings.grpc_port`` is not 0, the gRPC serving API on ``settings.host`` alongside."""
    core = core or RouterCore(settings)
    grpc_bind = (settings.host, settings.grpc_port) if settings.grpc_port else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if core.tokenizer is None:
            await core.start()
        grpc_server = None
        if grpc_bind is not None:
            from kvmesh.router.grpc_api import start_grpc_server

            grpc_server = await start_grpc_server(core, *grpc_bind)
            print(f"kvmesh router gRPC API on {grpc_bind[0]}:{grpc_bind[1]}", flush=True)
        freeze_startup_objects()
        yield
        if grpc_server is not None:
            await grpc_server.stop(2)
        await core.close()

    app = FastAPI(title="kvmesh router", lifespan=lifespan)
    app.router.route_class = JsonRoute
    app.state.core = core
    app.add_middleware(LimitsAndAuth, api_token=settings.api_token,
                       max_bytes=settings.max_request_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.status, exc.kind), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        """FastAPI's and Starlette's own (404, 405, a body that cannot be read), and
        ``json_body``'s refusals."""
        if exc.status_code == 400:
            core.metrics.requests.labels("invalid").inc()
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        if exc.status_code == 404:
            kind = "not_found_error"
        return JSONResponse(error_body(str(exc.detail), exc.status_code, kind),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        """A failure nothing else answered: a bug (logged by the server), still in shape."""
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", 500, "server_error"),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        core.metrics.requests.labels("invalid").inc()
        parts, params = [], []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            loc = err.get("loc", ())
            if tuple(loc) == ("body",):  # none, or not an object
                parts.append("the request body must be a JSON object, sent with "
                             "content-type: application/json")
                continue
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
            if len(loc) > 1 and loc[0] == "body" and err.get("type") != "json_invalid":
                params.append(str(loc[1]))
        return JSONResponse(error_body("; ".join(parts) or "invalid request", 400,
                                       param=params[0] if params else None), status_code=400)

    async def prepared(body, prompt) -> Prepared:
        try:
            return await core.prepare(prompt, body.sampling(), model=body.model,
                                      cache_salt=body.cache_salt,
                                      session=body.session(settings.session_from_user))
        except ApiError:
            core.metrics.requests.labels("invalid").inc()
            raise

    async def run_to_end(request: Request, p: Prepared, trace: Trace) -> list[str]:
        """Collect a non-streaming answer; cancel it if the client goes away first."""
        async def collect() -> list[str]:
            async with aclosing(core.generate(p, trace)) as chunks:
                return [chunk.text async for chunk in chunks]

        task = asyncio.ensure_future(collect())
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "client disconnected")

    async def answer(request: Request, p: Prepared, trace: Trace, with_ids: bool,
                     build: Callable[[str, str | None], dict]) -> dict:
        """A whole (non-streaming) response: ``build(text, finish_reason)`` plus usage."""
        text = await run_to_end(request, p, trace)
        response = build("".join(text), trace.finish_reason)
        response["usage"] = usage(len(p.token_ids), len(trace.token_ids))
        response["kvmesh"] = trace.info()
        if with_ids:
            response["choices"][0]["token_ids"] = trace.token_ids
            response["choices"][0]["prompt_token_ids"] = p.token_ids
        return response

    def stream(p: Prepared, trace: Trace, event: Callable, with_ids: bool,
               usage_chunk: bool = False) -> StreamingResponse:
        """Server-sent events of the request's chunks, an error event if it fails, then
        ``[DONE]``; the usage comes with the last token's chunk, or with ``usage_chunk``
        (``stream_options.include_usage``) in a chunk of its own after it, with no
        choices, as OpenAI sends it. With no decode worker up it is a 503 instead, at once."""
        core.refuse_if_decode_down()

        async def events():
            created = int(time.time())
            first = True
            try:
                async with aclosing(core.generate(p, trace)) as chunks:
                    async for chunk in chunks:
                        data = event(chunk, created, first)
                        first = False
                        if with_ids:
                            data["choices"][0]["token_ids"] = list(chunk.token_ids)
                        if chunk.finish_reason:
                            if not usage_chunk:
                                data["usage"] = usage(len(p.token_ids), len(trace.token_ids))
                            data["kvmesh"] = trace.info()
                        yield f"data: {json.dumps(data)}\n\n"
                        if chunk.finish_reason and usage_chunk:
                            last = {k: data[k] for k in ("id", "object", "created", "model")}
                            last.update(choices=[], usage=usage(len(p.token_ids), len(trace.token_ids)))
                            yield f"data: {json.dumps(last)}\n\n"
            except ApiError as e:
                yield f"data: {json.dumps(error_body(e.message, e.status, e.kind))}\n\n"
            yield "data: [DONE]\n\n"

        return ClosingStreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        p = await prepared(body, body.prompt)
        trace = Trace()
        model = settings.name
        if body.stream:
            return stream(p, trace, lambda c, created, first: completion_chunk(
                p.request_id, model, c.text, c.finish_reason or None, created), body.return_token_ids,
                body.include_usage)
        return await answer(request, p, trace, body.return_token_ids,
                            lambda text, finish: completion_chunk(p.request_id, model, text, finish))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            tokens = await core.encode_chat([m.model_dump() for m in body.messages])
        except ApiError:
            core.metrics.requests.labels("invalid").inc()
            raise
        p = await prepared(body, tokens)
        trace = Trace()
        model = settings.name

        def event(chunk, created, first):
            delta = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
            return chat_chunk(p.request_id, model, delta, chunk.finish_reason or None, created)

        if body.stream:
            return stream(p, trace, event, body.return_token_ids, body.include_usage)
        return await answer(request, p, trace, body.return_token_ids,
                            lambda text, finish: chat_completion(p.request_id, model, text, finish))

    @app.post("/v1/sessions/release")
    async def release_session(body: SessionRequest):
        """Forget a session on every store: its blocks become ordinary blocks."""
        return await core.session_call(body.session, body.cache_salt, release=True)

    @app.post("/v1/sessions/lookup")
    async def lookup_session(body: SessionRequest):
        """Where a session's blocks are held (blocks per tier, summed over the stores)."""
        return await core.session_call(body.session, body.cache_salt, release=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": settings.name, "object": "model", "created": 0, "owned_by": "kvmesh",
            "max_model_len": await core.max_model_len()}]}

    @app.get("/health")
    async def health(request: Request):
        """Readiness, from what the health poller last found: 200 while a decode worker
        is healthy ("ok", or "degraded" when some worker or store is down), 503 when none
        is. With an API token configured, only a request carrying it sees each worker's
        and store's address and state; anyone else gets the overall status alone (a
        load balancer's probe needs no more, and internal addresses stay internal)."""
        state, workers = core.readiness()
        body = {"status": state}
        if bearer_ok(settings.api_token, request.headers.get("authorization")):
            body["workers"] = workers
        return JSONResponse(body, status_code=503 if state == "unavailable" else 200)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
