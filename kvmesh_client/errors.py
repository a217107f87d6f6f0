"""Typed errors of the kvmesh client, one per gRPC status the server uses."""

from __future__ import annotations

import re

import grpc


class KvmeshError(Exception):
    """Base class; ``code`` is the gRPC status, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class InvalidArgument(KvmeshError):
    """The request was refused as malformed, or is larger than the message limit (refused
    before sending, or by gRPC as ``RESOURCE_EXHAUSTED`` "message larger than max"); fix
    it, don't retry."""


class NotFound(KvmeshError):
    """Unknown model."""


class Unauthenticated(KvmeshError):
    """Missing or wrong token."""


class Overloaded(KvmeshError):
    """The server's admission limit was reached (``RESOURCE_EXHAUSTED``, other than a
    message over the size limit); retry later."""


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


# gRPC's own RESOURCE_EXHAUSTED for a message over a channel's or server's limit ("Sent
# message larger than max (N vs. M)", "Received message larger than max ..."): the same
# message can never get through, so it is no overload.
_TOO_LARGE = re.compile(r"message larger than max", re.IGNORECASE)


def from_rpc_error(error: grpc.RpcError) -> KvmeshError:
    """The typed error of a failed call (``code`` and ``details`` kept as gRPC gave them)."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE.search(details):
        return InvalidArgument(code, details)
    return _BY_CODE.get(code, KvmeshError)(code, details)
