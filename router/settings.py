"""``RouterSettings``: everything a router is started with, defined once."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from kvmesh.kv_store.settings_base import (
    DEFAULT_HOST, Addresses, Bytes, PortOrZero, Seconds, Settings, cluster_secret_file_field,
)
from kvmesh.router.routing import ROUTING_POLICIES

Routing = Literal[tuple(ROUTING_POLICIES)]


class RouterSettings(Settings):
    """The router: its APIs, where its workers are, routing and admission."""

    model: str = Field("", description=(
        "model directory (its tokenizer and chat template; default: the one the workers serve)"))
    served_model_name: Optional[str] = Field(None, description=(
        "name clients ask for (default: the model directory's name)"))
    host: str = Field(DEFAULT_HOST, description="address the HTTP and gRPC APIs bind")
    port: PortOrZero = Field(8000, description="port of the OpenAI-compatible HTTP API")
    grpc_port: PortOrZero = Field(50050, description="port of the gRPC serving API (0: none)")
    prefill: Addresses = Field((), description="prefill worker addresses HOST:PORT[,HOST:PORT...]")
    decode: Addresses = Field((), description="decode worker addresses HOST:PORT[,HOST:PORT...]")
    store: Addresses = Field((), description=(
        "store addresses HOST:PORT[,HOST:PORT...] whose state /health reports too "
        "(a store down makes it \"degraded\")"))
    index: Optional[str] = Field(None, description=(
        "Redis index: discover the workers there (instead of --prefill/--decode)"),
        json_schema_extra={"metavar": "URL"})
    api_token: Optional[str] = Field(None, description=(
        "require this bearer token on /v1 and the gRPC API (or set KVMESH_API_TOKEN)"))
    routing: Routing = Field("kv_aware", description=(
        "decode worker choice: by cached prefix and load, or cache-blind rotation"))
    block_size: int = Field(32, ge=1, description="tokens per KV block, as the workers use")
    decode_local_cache: bool = Field(False, description=(
        "take every decode worker for one that keeps vLLM's local prefix cache before its "
        "health says so (the router learns it from each worker's health report)"))
    max_local_prefill_tokens: int = Field(128, ge=0, description=(
        "skip prefill when at most this many prompt tokens are not cached"))
    max_decode_prefill_tokens: int = Field(512, ge=0, description=(
        "also skip prefill when at most this many prompt tokens are not cached and every "
        "prefill worker has at least as many tokens of other prompts still to compute "
        "(0: never)"))
    busy_decode_streams: int = Field(2, ge=0, description=(
        "a decode worker streaming at least this many requests is busy: a prompt with a "
        "whole uncached block then goes to an idle prefill worker even under the limits "
        "above, since computing it on the decode worker would hold up every stream's next "
        "token (0: never)"))
    session_from_user: bool = Field(True, description=(
        "the OpenAI `user` field names the request's session (its KV is kept while it is "
        "idle) unless a `kvmesh.session` field does; sessions are scoped by cache_salt"))
    max_inflight: int = Field(256, ge=1, description="requests served at once")
    max_queue: int = Field(1024, ge=0, description=(
        "requests waiting for a slot; more are refused with 429/RESOURCE_EXHAUSTED"))
    queue_timeout: Seconds = Field(30.0, description="seconds a request may wait for a slot")
    prefill_timeout: Seconds = Field(120.0, description="deadline of a prefill call, in seconds")
    request_timeout: Seconds = Field(600.0, description="deadline of a whole request, in seconds")
    max_request_bytes: Bytes = Field(4 << 20, description="largest request body or gRPC message")
    header_timeout: Seconds = Field(10.0, le=3600, description=(
        "seconds an HTTP client may take to send a request's line and headers, from its "
        "first byte (or its connection); then 408 and the connection is closed"))
    body_timeout: Seconds = Field(30.0, le=3600, description=(
        "seconds an HTTP client may take to send a request's body, from the end of its "
        "headers; then 408 and the connection is closed"))
    tokenize_threads: int = Field(2, ge=1, le=64, description=(
        "long prompts (over 32 Ki characters) tokenized at once, each on a thread of its "
        "own, off the event loop; up to --max-queue more wait, shorter prompts never wait "
        "for them"))
    health_interval: Seconds = Field(2.0, description="seconds between health polls of the workers")
    health_timeout: Seconds = Field(2.0, description="how long one worker's health call may take")
    health_timeouts_to_fail: int = Field(3, ge=1, description=(
        "health calls timing out in a row that mark a worker down"))
    unavailable_retry: Seconds = Field(120.0, description=(
        "seconds a request whose decode worker went down may wait for one to come back, "
        "never past --request-timeout (with none up when it comes, a request is a 503 at once)"))
    cluster_secret_file: Optional[str] = cluster_secret_file_field()

    @property
    def name(self) -> str:
        """The served model name: ``served_model_name``, else the model directory's name."""
        from pathlib import Path

        return self.served_model_name or Path(self.model).name
