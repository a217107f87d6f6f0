"""gRPC channel and server options shared by every kvmesh service and client (no torch, no vLLM)."""

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Raise gRPC's 4 MiB default message limit to a bound both ends agree on, keep
    reconnects to a restarted peer quick, and (servers) own the port bound."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A restarted peer is found again within a second, not after gRPC's default
        # exponential backoff (which reached 7-24 s after a worker restart).
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # A server must not share its port with another process's: gRPC's default
        # SO_REUSEPORT let a second store on a live one's port start, and the kernel
        # split connections between the two.
        ("grpc.so_reuseport", 0),
    ]


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def host_port(host: str, port: int | str) -> str:
    """``host:port`` as gRPC targets and URLs spell it: an IPv6 literal in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def split_host_port(address: str) -> tuple[str, int]:
    """The host (an IPv6 literal without its brackets) and port of ``HOST:PORT`` or
    ``[V6]:PORT``; ``ValueError`` for anything else (an IPv6 literal must be bracketed)."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not a HOST:PORT address: {address!r} (an IPv6 host goes in brackets: [::1]:50051)")
    return host, int(port)


def bind_port(server, host: str, port: int, what: str) -> int:
    """Bind a gRPC server (sync or asyncio) to ``host:port`` (port 0: a free one) and
    return the bound port; ``RuntimeError`` naming ``what`` when it cannot be bound
    (grpcio raises for a port in use; older releases returned 0)."""
    address = host_port(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise RuntimeError(f"cannot bind {what} to {address}")
    return bound
