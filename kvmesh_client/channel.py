"""Connection settings shared by the synchronous and the asyncio client."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from kvmesh_client.calls import check_timeout
from kvmesh_proto.options import message_options

# The router's default message limit (its ``max_request_bytes``): a bigger request would
# only be refused by the server, so the client refuses it before sending.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ClientOptions:
    """``token``: bearer token sent on every call. ``tls``: use TLS (with
    ``root_certificates`` PEM bytes, or the system's roots when None).

    ``timeout_s``: the default deadline of a call (finite, above 0), counted from its first
    attempt and covering all of them, backoff sleeps included, and for ``stream`` the
    whole stream; past it the call raises ``DeadlineExceeded``. ``retries``: extra
    attempts after UNAVAILABLE, each after a backoff of ``retry_backoff_s`` doubled per
    retry, and only where it ends before the deadline — for ``generate``/``stream`` only
    before the first response arrived, so nothing is ever generated twice for the caller.

    ``max_message_bytes`` bounds messages both ways; the default is the router's (4 MiB).
    A request serializing to more raises ``InvalidArgument`` before anything is sent, and
    is never retried. ValueError for a bad value of any of these."""

    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    timeout_s: float = 120.0
    retries: int = 2
    retry_backoff_s: float = 0.2
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self):
        check_timeout(self.timeout_s)
        for name, low in (("retries", 0), ("max_message_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}, not {value!r}")
        backoff = self.retry_backoff_s
        if (isinstance(backoff, bool) or not isinstance(backoff, (int, float))
                or not math.isfinite(backoff) or backoff < 0):
            raise ValueError(f"retry_backoff_s must be a finite number of seconds of at least 0, "
                             f"not {backoff!r}")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_args(self) -> list[tuple[str, int]]:
        return message_options(self.max_message_bytes)

    def credentials(self) -> grpc.ChannelCredentials | None:
        return grpc.ssl_channel_credentials(self.root_certificates) if self.tls else None
