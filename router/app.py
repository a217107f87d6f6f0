"""The router's HTTP app: OpenAI-compatible ``/v1/completions``, ``/health``, ``/metrics``.

Every request is validated before any worker sees it (a 4xx leaves no state behind),
runs through prefill then decode (``router.pd``), and is counted in the metrics. A
client that disconnects mid-stream cancels the decode call, which aborts the request
on the worker and frees its KV blocks.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvmesh_proto import worker_pb2
from router.metrics import RouterMetrics
from router.openai_api import CompletionRequest, completion_chunk, error_body, usage
from router.pd import PDOrchestrator, RequestTrace
from router.workers import WorkerClient

log = logging.getLogger("kvmesh.router")


@dataclass(frozen=True)
class RouterSettings:
    model: str                   # model directory (for the tokenizer)
    served_model_name: str
    prefill_address: str
    decode_address: str
    api_token: str | None = None
    max_request_bytes: int = 4 * 1024 * 1024
    prefill_timeout_s: float = 120.0
    request_timeout_s: float = 600.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def _from_rpc_error(e: grpc.aio.AioRpcError) -> ApiError:
    status = _GRPC_TO_HTTP.get(e.code(), 502)
    kind = "invalid_request_error" if status == 400 else "server_error"
    return ApiError(status, f"decode worker: {e.details() or e.code().name}", kind)


def create_app(settings: RouterSettings) -> FastAPI:
    metrics = RouterMetrics()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from transformers import AutoTokenizer

        state["tokenizer"] = AutoTokenizer.from_pretrained(settings.model)
        state["prefill"] = WorkerClient(settings.prefill_address)
        state["decode"] = WorkerClient(settings.decode_address)
        state["pd"] = PDOrchestrator(state["prefill"], state["decode"],
                                     settings.prefill_timeout_s, settings.request_timeout_s)
        yield
        await state["prefill"].close()
        await state["decode"].close()

    app = FastAPI(title="kvmesh router", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.status, exc.kind), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        metrics.requests.labels("invalid").inc()
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse(error_body("; ".join(parts) or "invalid request", 400), status_code=400)

    @app.middleware("http")
    async def _limits_and_auth(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if settings.api_token and request.headers.get("authorization") != f"Bearer {settings.api_token}":
                return JSONResponse(error_body("missing or wrong bearer token", 401,
                                               "authentication_error"), status_code=401)
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > settings.max_request_bytes):
                return JSONResponse(error_body(
                    f"request body larger than {settings.max_request_bytes} bytes", 413), status_code=413)
        return await call_next(request)

    async def max_model_len() -> int:
        if "max_model_len" not in state:
            try:
                state["max_model_len"] = (await state["decode"].health()).max_model_len
            except grpc.aio.AioRpcError as e:
                raise ApiError(503, f"decode worker unavailable: {e.code().name}", "server_error")
        return state["max_model_len"]

    async def to_worker_request(body: CompletionRequest) -> worker_pb2.GenerateRequest:
        if body.model is not None and body.model != settings.served_model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; "
                                f"this router serves {settings.served_model_name!r}",
                           "not_found_error")
        tokenizer = state["tokenizer"]
        if isinstance(body.prompt, str):
            token_ids = tokenizer.encode(body.prompt)
        else:
            token_ids = body.prompt
            if max(token_ids) >= len(tokenizer):
                raise ApiError(400, f"token id {max(token_ids)} is outside the vocabulary "
                                    f"of {len(tokenizer)}")
        if not token_ids:
            raise ApiError(400, "prompt encodes to no tokens")
        limit = await max_model_len()
        if len(token_ids) + body.max_tokens > limit:
            raise ApiError(400, f"prompt ({len(token_ids)} tokens) plus max_tokens "
                                f"({body.max_tokens}) exceeds the model's context of {limit} tokens")
        sampling = worker_pb2.SamplingParams(
            max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
            top_k=body.top_k, stop=body.stop_list(), ignore_eos=body.ignore_eos)
        if body.seed is not None:
            sampling.seed = body.seed
        return worker_pb2.GenerateRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}", prompt_token_ids=token_ids,
            sampling=sampling, cache_salt=body.cache_salt or "")

    def record(trace: RequestTrace, num_prompt: int, outcome: str, started: float) -> None:
        metrics.requests.labels(outcome).inc()
        metrics.prompt_tokens.inc(num_prompt)
        metrics.generated_tokens.inc(len(trace.token_ids))
        metrics.tokens_from_store.labels("prefill").inc(trace.prefill_tokens_from_store)
        metrics.tokens_from_store.labels("decode").inc(trace.decode_tokens_from_store)
        metrics.tokens_load_failed.labels("decode").inc(trace.decode_tokens_load_failed)
        if not trace.prefill_ok:
            metrics.prefill_failures.inc()
        if trace.ttft_s is not None:
            metrics.ttft.observe(trace.ttft_s)
        metrics.e2e.observe(time.monotonic() - started)

    def kvmesh_info(trace: RequestTrace) -> dict:
        return {"ttft_s": trace.ttft_s, "prefill_s": trace.prefill_s, "prefill_ok": trace.prefill_ok,
                "prefix_tokens_from_store": {"prefill": trace.prefill_tokens_from_store,
                                             "decode": trace.decode_tokens_from_store},
                "kv_load_failed_tokens": trace.decode_tokens_load_failed}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        started = time.monotonic()
        try:
            request = await to_worker_request(body)
        except ApiError:
            metrics.requests.labels("invalid").inc()
            raise
        trace = RequestTrace()
        num_prompt = len(request.prompt_token_ids)
        model = settings.served_model_name
        chunks = state["pd"].generate(request, trace)

        if not body.stream:
            text = []
            try:
                async for chunk in chunks:
                    text.append(chunk.text)
            except grpc.aio.AioRpcError as e:
                record(trace, num_prompt, "error", started)
                raise _from_rpc_error(e)
            record(trace, num_prompt, "ok", started)
            response = completion_chunk(request.request_id, model, "".join(text), trace.finish_reason)
            response["usage"] = usage(num_prompt, len(trace.token_ids))
            response["kvmesh"] = kvmesh_info(trace)
            if body.return_token_ids:
                response["choices"][0]["token_ids"] = trace.token_ids
                response["choices"][0]["prompt_token_ids"] = list(request.prompt_token_ids)
            return response

        async def events():
            outcome = "cancelled"
            created = int(time.time())
            try:
                async for chunk in chunks:
                    data = completion_chunk(request.request_id, model, chunk.text,
                                            chunk.finish_reason or None, created)
                    if body.return_token_ids:
                        data["choices"][0]["token_ids"] = list(chunk.token_ids)
                    if chunk.finish_reason:
                        data["usage"] = usage(num_prompt, len(trace.token_ids))
                        data["kvmesh"] = kvmesh_info(trace)
                    yield f"data: {json.dumps(data)}\n\n"
                outcome = "ok"
            except grpc.aio.AioRpcError as e:
                outcome = "error"
                err = _from_rpc_error(e)
                yield f"data: {json.dumps(error_body(err.message, err.status, err.kind))}\n\n"
            finally:
                await chunks.aclose()
                record(trace, num_prompt, outcome, started)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model",
                                            "owned_by": "kvmesh"}]}

    @app.get("/health")
    async def health():
        status = {}
        for name in ("prefill", "decode"):
            try:
                reply = await state[name].health()
                status[name] = reply.status
            except grpc.aio.AioRpcError as e:
                status[name] = f"unavailable ({e.code().name})"
        ok = all(v == "ok" for v in status.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "workers": status},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
