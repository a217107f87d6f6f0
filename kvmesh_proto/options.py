"""gRPC channel and server options shared by every kvmesh service and client (no torch, no vLLM)."""

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Raise gRPC's 4 MiB default message limit to a bound both ends agree on."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
