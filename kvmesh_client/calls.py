"""What the synchronous and the asyncio client share about one call: its deadline, the
size check of its request, and when and after how long it is retried.

A call has one deadline, ``timeout_s`` seconds after its first attempt starts (the
options' ``timeout_s`` when the call gives none). Every attempt gets only the time left
before it; a retry is started only when its backoff sleep ends before the deadline, so a
call never runs past it (give or take scheduling). When time is up the call raises
``DeadlineExceeded``.
"""

from __future__ import annotations

import math
import time

import grpc

from kvmesh_client.errors import DeadlineExceeded, InvalidArgument, KvmeshError, Unavailable

# The only failure retried: the server or its workers could not be reached.
RETRYABLE = (Unavailable,)


def check_timeout(timeout_s: float, name: str = "timeout_s") -> float:
    """``timeout_s`` as a float; ValueError unless it is a finite number of seconds above 0."""
    if (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
            or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise ValueError(f"{name} must be a finite number of seconds above 0, not {timeout_s!r}")
    return float(timeout_s)


def check_size(request, max_message_bytes: int) -> None:
    """Raise ``InvalidArgument`` when ``request`` serializes to more than
    ``max_message_bytes``: such a request can never be sent (nor accepted by the server),
    so it is refused before any attempt and never retried."""
    size = request.ByteSize()
    if size > max_message_bytes:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request is {size} bytes, over the {max_message_bytes}-byte "
                              f"message limit")


class Attempts:
    """The deadline and retry schedule of one call. ``options``: the client's
    ``ClientOptions``; ``timeout_s``: the call's own (None: the options'; ValueError unless
    finite and above 0). The deadline starts with the first ``time_left``.

    Use::

        attempts = Attempts(options, timeout_s)
        while True:
            try:
                return method(request, timeout=attempts.time_left())
            except grpc.RpcError as e:
                sleep(attempts.backoff(from_rpc_error(e)))
    """

    def __init__(self, options, timeout_s: float | None):
        self.timeout_s = options.timeout_s if timeout_s is None else check_timeout(timeout_s)
        self.retries = options.retries
        self.retry_backoff_s = options.retry_backoff_s
        self.attempt = 0                  # attempts failed so far
        self._deadline: float | None = None

    def _expired(self, last: KvmeshError | None = None) -> DeadlineExceeded:
        after = f" after {self.attempt} attempt(s); last error {last}" if last else ""
        return DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the call's deadline of {self.timeout_s:g} s passed{after}")

    def time_left(self) -> float:
        """Seconds the next attempt may take (the gRPC timeout to give it); raises
        ``DeadlineExceeded`` when the deadline has passed."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.timeout_s
        left = self._deadline - now
        if left <= 0:
            raise self._expired()
        return left

    def backoff(self, error: KvmeshError, retry: bool = True) -> float:
        """After an attempt failed with ``error``: the seconds to sleep before the next one.
        Raises ``error`` when it is not retried (not one of ``RETRYABLE``, an attempt that
        must not be repeated: ``retry=False``, or the options' ``retries`` spent), and
        ``DeadlineExceeded`` (caused by ``error``) when the sleep would not end before the
        deadline."""
        self.attempt += 1
        if not retry or not isinstance(error, RETRYABLE) or self.attempt > self.retries:
            raise error from None
        delay = self.retry_backoff_s * (2 ** (self.attempt - 1))
        if self._deadline is None or self._deadline - time.monotonic() <= delay:
            raise self._expired(error) from error
        return delay
