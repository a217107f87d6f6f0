"""The cluster secret: what every internal call carries and every internal server checks.

Internal traffic -- router to workers, workers to their store, a store to its peers, a
transfer reader to the store's gRPC transfer source -- is authenticated by one secret
that all components of a cluster share. A client sends it on every call as the gRPC
metadata ``kvmesh-cluster-secret``; a server that has a secret answers any call without
it, or with another one, ``UNAUTHENTICATED`` before the call's handler runs (and before
its request is parsed), comparing in constant time. A server without a secret accepts
every call, as before; its component warns about that when it starts.

Where a component's secret comes from (``load_secret``): the file its
``--cluster-secret-file`` names (how Kubernetes mounts a Secret), else the environment
variable ``KVMESH_CLUSTER_SECRET``. Never a command-line value, so it shows in no process
listing; nothing here logs it, and no error message quotes it.
"""

from __future__ import annotations

import hmac
import os
import secrets

import grpc

from kvmesh.kv_store.settings_base import SECRET_ENV

METADATA_KEY = "kvmesh-cluster-secret"  # gRPC metadata keys are lower case
MAX_SECRET_BYTES = 4096
DENIED = "missing or wrong cluster secret (internal kvmesh API)"


def new_secret() -> str:
    """A fresh random secret (256 bits, URL-safe text), e.g. for one ``kvmesh serve``."""
    return secrets.token_urlsafe(32)


def write_secret(path: str, secret: str) -> None:
    """Write ``secret`` to the file ``path``, readable by its owner only (mode 0600, also
    when the file existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret.encode("utf-8"))
    finally:
        os.close(fd)


def load_secret(path: str | None = None) -> str | None:
    """The cluster secret: the contents of ``path`` without surrounding whitespace, else
    the value of ``KVMESH_CLUSTER_SECRET``; None when neither is given (or the variable
    is empty). ``ValueError`` saying why for a file that cannot be read, is empty, is
    larger than 4 KiB or is not text."""
    if path:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_SECRET_BYTES + 1)
        except OSError as e:
            raise ValueError(f"cannot read the cluster secret file {path}: {e.strerror or e}") from None
        if len(raw) > MAX_SECRET_BYTES:
            raise ValueError(f"the cluster secret file {path} is larger than {MAX_SECRET_BYTES} bytes")
        try:
            secret = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"the cluster secret file {path} is not UTF-8 text") from None
        if not secret:
            raise ValueError(f"the cluster secret file {path} is empty")
        return secret
    return os.environ.get(SECRET_ENV) or None


def call_metadata(secret: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends with each call: the secret, or nothing without one."""
    return ((METADATA_KEY, secret),) if secret else ()


def secret_matches(secret: str, metadata) -> bool:
    """Whether the call ``metadata`` (pairs of key and value) carries ``secret``; the
    comparison takes the same time wherever the first difference is."""
    given = next((value for key, value in metadata or () if key == METADATA_KEY), None)
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), secret.encode("utf-8"))


NO_SECRET_WARNING = (
    "no cluster secret: the {what} accepts internal calls from anyone who can reach it; "
    f"set {SECRET_ENV} or --cluster-secret-file on every component of the cluster")


def _denying(handler: grpc.RpcMethodHandler, abort):
    """A handler of ``handler``'s shape whose every call ends at once in ``abort``; the
    request is not parsed (no deserializer)."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class SecretCheck(grpc.ServerInterceptor):
    """Refuses every call of a (thread-pool) gRPC server that lacks ``secret``."""

    def __init__(self, secret: str):
        if not secret:
            raise ValueError("SecretCheck needs a non-empty secret")
        self._secret = secret

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or secret_matches(self._secret, handler_call_details.invocation_metadata):
            return handler

        def abort(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

        return _denying(handler, abort)


class AioSecretCheck(grpc.aio.ServerInterceptor):
    """Refuses every call of an asyncio gRPC server that lacks ``secret``."""

    def __init__(self, secret: str):
        if not secret:
            raise ValueError("AioSecretCheck needs a non-empty secret")
        self._secret = secret

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or secret_matches(self._secret, handler_call_details.invocation_metadata):
            return handler

        async def abort(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

        return _denying(handler, abort)


def server_interceptors(secret: str | None, asyncio: bool = False) -> list:
    """The interceptors a server with ``secret`` installs (none without one)."""
    if not secret:
        return []
    return [AioSecretCheck(secret) if asyncio else SecretCheck(secret)]
