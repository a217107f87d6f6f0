"""gRPC channel and server options shared by every kvmesh service and client (no torch, no vLLM)."""

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Raise gRPC's 4 MiB default message limit to a bound both ends agree on, and keep
    reconnects to a restarted peer quick."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A restarted peer is found again within a second, not after gRPC's default
        # exponential backoff (which reached 7-24 s after a worker restart).
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
