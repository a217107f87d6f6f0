"""The worker gRPC API over an AsyncLLM, and the worker process's main loop.

Contract: every ``Generate`` stream ends with a chunk carrying ``finish_reason`` unless
the call fails with a gRPC status. A call the client cancels (or whose deadline passes)
aborts the request in the engine, which frees its KV blocks and its slot.

Who may call, and what: with a cluster secret (``kvmesh.kv_store.auth``) every call
without it is ``UNAUTHENTICATED`` before it reaches the service. A ``Generate`` outside
the router's bounds (``kvmesh_proto.limits``) is ``INVALID_ARGUMENT`` and one beyond
``max_requests`` running at once is ``RESOURCE_EXHAUSTED``; neither reaches the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal

import grpc

from kvmesh.engine_host.engine import build_engine
from kvmesh.engine_host.engine_args import engine_config_summary
from kvmesh.engine_host.engine_stats import EngineStats
from kvmesh.engine_host.metadata import SESSION_PARAM
from kvmesh.engine_host.settings import WorkerSettings
from kvmesh.kv_store.auth import NO_SECRET_WARNING, load_secret, server_interceptors
from kvmesh.kv_store.gc_tuning import freeze_startup_objects
from kvmesh_proto.limits import worker_problems
from kvmesh_proto.options import bind_port, host_port, message_options
from kvmesh_proto import worker_pb2, worker_pb2_grpc

log = logging.getLogger("kvmesh.worker")


def sampling_params(msg: worker_pb2.SamplingParams, session: str = ""):
    """vLLM's sampling parameters for ``msg``; a ``session`` id travels in them to the
    connector (``kv_transfer_params``, ``engine_host.metadata.session_of``)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.top_p > 0 else 1.0,
        top_k=msg.top_k if msg.top_k > 0 else 0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop) or None,
        ignore_eos=msg.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        extra_args={"kv_transfer_params": {SESSION_PARAM: session}} if session else None,
    )


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """The worker API over ``engine``; ``stats`` (``EngineStats``, kept current by the
    engine's stat logger) gives its health the engine's free KV blocks and speculative
    decoding figures (none: 0 of 0 blocks, no drafts)."""

    def __init__(self, engine, settings: WorkerSettings, stats: EngineStats | None = None):
        self.engine = engine
        self.stats = stats or EngineStats()  # none kept current: 0 of 0 blocks, no drafts
        self.settings = settings
        config = engine.vllm_config
        self.max_model_len = config.model_config.max_model_len
        self.block_size = config.cache_config.block_size
        self.vocab_size = config.model_config.get_vocab_size()
        self.model = settings.model_id or config.model_config.model
        self.engine_config = json.dumps(engine_config_summary(config))
        self.running = 0

    async def Generate(self, request, context):
        problems = worker_problems(request, self.max_model_len, self.vocab_size)
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        if self.running >= self.settings.max_requests:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the worker runs {self.running} requests, its most (--max-requests)")
        try:
            params = sampling_params(request.sampling, request.session)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        self.running += 1
        try:
            async for out in self.engine.generate(prompt, params, request.request_id):
                completion = out.outputs[0]
                chunk = worker_pb2.GenerateChunk(token_ids=completion.token_ids, text=completion.text)
                if out.finished:
                    self._finish(chunk, out)
                yield chunk
        except ValueError as e:  # vLLM's input validation
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self.running -= 1

    @staticmethod
    def _finish(chunk: worker_pb2.GenerateChunk, out) -> None:
        """The last chunk: why it ended, and how the request's KV and time were spent."""
        stats = (out.kv_transfer_params or {}).get("kvmesh", {})
        chunk.finish_reason = out.outputs[0].finish_reason or "stop"
        chunk.num_prompt_tokens = len(out.prompt_token_ids or ())
        chunk.tokens_from_store = stats.get("tokens_from_store", 0)
        chunk.tokens_cached = max(out.num_cached_tokens or 0, chunk.tokens_from_store)
        chunk.tokens_load_failed = stats.get("tokens_load_failed", 0)
        chunk.tokens_saved = stats.get("tokens_saved_at_finish", 0)
        chunk.lookup_s = stats.get("lookup_s", 0.0)
        chunk.kv_backend = stats.get("backend", "")
        chunk.kv_bytes = stats.get("nbytes", 0)
        chunk.kv_transfer_s = stats.get("transfer_s", 0.0)
        chunk.kv_wait_s = stats.get("wait_s", 0.0)
        chunk.kv_placed_s = stats.get("placed_s", 0.0)
        chunk.kv_load_path_s = stats.get("load_path_s", 0.0)
        chunk.kv_locate_s = stats.get("locate_s", 0.0)
        chunk.kv_read_s = stats.get("read_s", 0.0)
        chunk.kv_verify_s = stats.get("verify_s", 0.0)
        chunk.kv_copy_s = stats.get("copy_s", 0.0)
        metrics = out.metrics  # engine timestamps, when the engine keeps stats
        if metrics is not None and metrics.scheduled_ts:
            chunk.engine_queue_s = max(0.0, metrics.scheduled_ts - metrics.queued_ts)
            if metrics.first_token_ts:
                chunk.engine_first_token_s = max(0.0, metrics.first_token_ts - metrics.scheduled_ts)

    async def Health(self, request, context):
        errored = getattr(self.engine, "errored", False)
        return worker_pb2.HealthReply(
            status="error" if errored else "ok", role=self.settings.role, model=self.model,
            running=self.running, max_model_len=self.max_model_len, block_size=self.block_size,
            engine_config=self.engine_config, engine_stats=json.dumps(self.stats.spec.summary()),
            kv_blocks_free=self.stats.kv.free(), kv_blocks_total=self.stats.kv.usable)


async def start_worker_server(service: WorkerService, host: str, port: int,
                              secret: str | None = None) -> tuple[grpc.aio.Server, int]:
    """Serve ``service`` on ``host:port`` (port 0: a free one); returns the started server
    (the caller stops it) and its port. With ``secret`` every call must carry it.
    ``RuntimeError`` when the address cannot be bound."""
    server = grpc.aio.server(options=message_options(),
                             interceptors=server_interceptors(secret, asyncio=True))
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    bound = bind_port(server, host, port, f"the {service.settings.role} worker")
    await server.start()
    return server, bound


async def serve_worker(settings: WorkerSettings, shutdown_grace_s: float = 5.0, announcer=None,
                       stop: asyncio.Event | None = None) -> None:
    """Run a worker until ``stop`` is set (by default: until SIGINT/SIGTERM): engine up,
    then the API, then both down in order.

    With an ``announcer`` (``kv_store.index.services.Announcer``) the worker announces
    itself for discovery once it serves, and withdraws before it stops."""
    secret = load_secret(settings.cluster_secret_file)  # ValueError: a file it cannot use
    if secret is None:
        log.warning(NO_SECRET_WARNING.format(what=f"{settings.role} worker"))
    stats = EngineStats()
    engine = build_engine(settings, stat_loggers=[stats.stat_logger])
    server = service = None
    try:
        service = WorkerService(engine, settings, stats)
        server, _ = await start_worker_server(service, settings.host, settings.port, secret)
        print(f"kvmesh {settings.role} worker serving on {host_port(settings.host, settings.port)}", flush=True)
        freeze_startup_objects()
        if announcer is not None:
            announcer.start()
        if stop is None:  # a process of its own: signals stop it
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if announcer is not None:
            announcer.stop()
        if server is not None:
            await server.stop(shutdown_grace_s)
        engine.shutdown()
        # Nothing of ours keeps the engine alive past here: vLLM's engine finalizer fails
        # (a traceback in the log) when it runs as late as interpreter shutdown.
        if service is not None:
            service.engine = None
        del engine


def run_worker(settings: WorkerSettings, announcer=None) -> None:
    """A worker process's main: ``serve_worker`` until SIGINT/SIGTERM."""
    asyncio.run(serve_worker(settings, announcer=announcer))
