"""Block checksums: computed by the writer, verified by every reader."""

import xxhash


def checksum(data: bytes | memoryview) -> int:
    """64-bit xxh64 of ``data``."""
    return xxhash.xxh64_intdigest(data)


def verify(data: bytes | memoryview, expected: int) -> bool:
    return checksum(data) == expected
