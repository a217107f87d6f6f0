"""Admission control: a bounded number of requests in flight and a bounded queue.

A request is admitted at once while fewer than ``max_inflight`` run; otherwise it waits
in a queue of at most ``max_queue`` requests for at most ``queue_timeout_s``. A request
that finds the queue full, or times out in it, is refused with ``Overloaded`` — a clear
"come back later" (HTTP 429, gRPC RESOURCE_EXHAUSTED) instead of unbounded latency.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator


class Overloaded(Exception):
    pass


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, queue_timeout_s: float = 30.0):
        if max_inflight < 1 or max_queue < 0:
            raise ValueError("max_inflight must be >= 1 and max_queue >= 0")
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.inflight = 0
        self.queued = 0
        self._slots = asyncio.Semaphore(max_inflight)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold a slot for the body; yields the seconds spent queued. Raises ``Overloaded``.
        The slot is given back however the body ends (done, failed or cancelled)."""
        start = time.monotonic()
        if self._slots.locked():
            if self.queued >= self.max_queue:
                raise Overloaded(f"server overloaded: {self.inflight} requests running and "
                                 f"{self.queued} queued; retry later")
            self.queued += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self.queue_timeout_s)
            except asyncio.TimeoutError:
                raise Overloaded(f"server overloaded: no slot within {self.queue_timeout_s:.0f}s; "
                                 "retry later") from None
            finally:
                self.queued -= 1
        else:
            await self._slots.acquire()
        self.inflight += 1
        try:
            yield time.monotonic() - start
        finally:
            self.inflight -= 1
            self._slots.release()
