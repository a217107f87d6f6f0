"""The router's gRPC serving API (``kvmesh_proto/serving.proto``) over ``RouterCore``.

Status codes follow gRPC conventions (see the .proto). When the router has an API token
(neither None nor empty, as over HTTP), every call must carry ``authorization: Bearer
<token>`` metadata. Message sizes are bounded by ``max_request_bytes``. A call the client
cancels, or whose deadline passes, cancels the request on the workers. Malformed input
is INVALID_ARGUMENT, a message that does not even parse (``RefuseUndecodable``) included.
"""

from __future__ import annotations

from contextlib import aclosing

import grpc
from google.protobuf.message import DecodeError

from kvmesh_proto import serving_pb2, serving_pb2_grpc
from kvmesh.router.core import ApiError, RouterCore, Sampling, Trace, bearer_ok


class ServingService(serving_pb2_grpc.KVMeshServicer):
    def __init__(self, core: RouterCore):
        self.core = core

    async def _authorize(self, context) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if not bearer_ok(self.core.settings.api_token, metadata.get("authorization")):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    @staticmethod
    def _sampling(msg: serving_pb2.Sampling) -> Sampling:
        """The request's sampling; a field left out takes its default. ``max_tokens`` is a
        plain proto3 ``uint32``, which has no presence: 0 is indistinguishable from "not
        set" on the wire, so it means the default, 16 (as the .proto says), never an
        error. The other optional fields are range-checked by ``Sampling.check``."""
        return Sampling(
            max_tokens=msg.max_tokens or 16,
            temperature=msg.temperature if msg.HasField("temperature") else 1.0,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            top_k=msg.top_k if msg.HasField("top_k") else -1,
            seed=msg.seed if msg.HasField("seed") else None,
            stop=list(msg.stop), ignore_eos=msg.ignore_eos)

    async def Generate(self, request, context):
        await self._authorize(context)
        core = self.core
        prompt = request.text if request.WhichOneof("prompt") == "text" else list(request.token_ids.ids)
        try:
            p = await core.prepare(prompt, self._sampling(request.sampling), model=request.model or None,
                                   cache_salt=request.cache_salt or None, session=request.session or None,
                                   request_id=request.request_id or None)
        except ApiError as e:
            core.metrics.requests.labels("invalid").inc()
            await context.abort(e.grpc_code, e.message)
        trace = Trace()
        try:
            async with aclosing(core.generate(p, trace)) as chunks:
                async for chunk in chunks:
                    response = serving_pb2.GenerateResponse(
                        request_id=p.request_id, text=chunk.text, token_ids=chunk.token_ids,
                        finish_reason=chunk.finish_reason)
                    if chunk.finish_reason:
                        response.usage.CopyFrom(serving_pb2.Usage(
                            prompt_tokens=len(p.token_ids), completion_tokens=len(trace.token_ids),
                            prefix_tokens_from_store=trace.decode_tokens_from_store,
                            time_to_first_token_s=trace.ttft_s or 0.0, route=trace.route))
                    yield response
        except ApiError as e:
            await context.abort(e.grpc_code, e.message)

    async def Cancel(self, request, context):
        await self._authorize(context)
        return serving_pb2.CancelReply(cancelled=self.core.cancel(request.request_id))

    async def Health(self, request, context):
        await self._authorize(context)
        state, workers = self.core.readiness()
        return serving_pb2.HealthReply(status=state, workers=workers)

    async def ListModels(self, request, context):
        await self._authorize(context)
        try:
            max_len = await self.core.max_model_len()
        except ApiError as e:
            await context.abort(e.grpc_code, e.message)
        return serving_pb2.ListModelsReply(models=[serving_pb2.Model(
            id=self.core.settings.name, max_model_len=max_len)])


class _Undecodable:
    """What a request that did not parse is handed on as: the parser's complaint."""

    def __init__(self, reason: str):
        self.reason = reason


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """A request message that does not parse (corrupt wire format, a string field that is
    not UTF-8) is answered INVALID_ARGUMENT; gRPC itself would answer UNKNOWN, a server
    failure. Only the two call shapes the serving API has are wrapped (unary-unary and
    unary-stream); other handlers pass through unchanged."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes):
            try:
                return parse(data)
            except DecodeError as e:
                return _Undecodable(str(e))

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request message does not parse: {request.reason}")

        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary_unary(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                return await behaviour(request, context)

            return handler._replace(request_deserializer=lenient, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            behaviour = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for response in behaviour(request, context):
                    yield response

            return handler._replace(request_deserializer=lenient, unary_stream=unary_stream)
        return handler


async def start_grpc_server(core: RouterCore, host: str, port: int) -> grpc.aio.Server:
    """Serve the gRPC API on ``host:port`` (started; the caller stops it)."""
    from kvmesh_proto.options import bind_port, message_options

    server = grpc.aio.server(options=message_options(core.settings.max_request_bytes),
                             interceptors=[RefuseUndecodable()])
    serving_pb2_grpc.add_KVMeshServicer_to_server(ServingService(core), server)
    bind_port(server, host, port, "the router's gRPC API")
    await server.start()
    return server
