"""Connection settings shared by the synchronous and the asyncio client."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from kvmesh_proto.options import message_options

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass(frozen=True)
class ClientOptions:
    """``token``: bearer token sent on every call. ``tls``: use TLS (with
    ``root_certificates`` PEM bytes, or the system's roots when None). ``timeout_s``: the
    default deadline of a call. ``retries``: extra attempts after UNAVAILABLE — for
    ``generate``/``stream`` only before the first response arrived, so nothing is ever
    generated twice for the caller. ``max_message_bytes`` bounds messages both ways."""

    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    timeout_s: float = 120.0
    retries: int = 2
    retry_backoff_s: float = 0.2
    max_message_bytes: int = 16 * 1024 * 1024

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_args(self) -> list[tuple[str, int]]:
        return message_options(self.max_message_bytes)

    def credentials(self) -> grpc.ChannelCredentials | None:
        return grpc.ssl_channel_credentials(self.root_certificates) if self.tls else None
