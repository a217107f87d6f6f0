"""Typed errors of the kvmesh client, one per gRPC status the server uses."""

from __future__ import annotations

import grpc


class KvmeshError(Exception):
    """Base class; ``code`` is the gRPC status, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class InvalidArgument(KvmeshError):
    """The request was refused as malformed; fix it, don't retry."""


class NotFound(KvmeshError):
    """Unknown model."""


class Unauthenticated(KvmeshError):
    """Missing or wrong token."""


class Overloaded(KvmeshError):
    """The server's admission limit was reached; retry later."""


class Unavailable(KvmeshError):
    """The server or its workers could not be reached (retried automatically where safe)."""


class DeadlineExceeded(KvmeshError):
    """The call's deadline passed."""


class Cancelled(KvmeshError):
    """The request was cancelled."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(error: grpc.RpcError) -> KvmeshError:
    code = error.code()
    return _BY_CODE.get(code, KvmeshError)(code, error.details() or "")
