"""The router's gRPC serving API (``kvmesh_proto/serving.proto``) over ``RouterCore``.

Status codes follow gRPC conventions (see the .proto). When the router has an API token
(neither None nor empty, as over HTTP), every call must carry ``authorization: Bearer
<token>`` metadata. Message sizes are bounded by ``max_request_bytes``. A call the client
cancels, or whose deadline passes, cancels the request on the workers.
"""

from __future__ import annotations

from contextlib import aclosing

import grpc

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
                                   cache_salt=request.cache_salt or None,
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


async def start_grpc_server(core: RouterCore, host: str, port: int) -> grpc.aio.Server:
    """Serve the gRPC API on ``host:port`` (started; the caller stops it)."""
    from kvmesh_proto.options import bind_port, message_options

    server = grpc.aio.server(options=message_options(core.settings.max_request_bytes))
    serving_pb2_grpc.add_KVMeshServicer_to_server(ServingService(core), server)
    bind_port(server, host, port, "the router's gRPC API")
    await server.start()
    return server
