"""The saves of one engine step, sent to the store in the background (for the
connector's save side).

A request whose step also loads some of its blocks from the store computes its new KV
on top of the loaded blocks. If any of them failed to load, that KV is wrong (vLLM
recomputes it from the first failed block and saves it again), and it must never be
stored under the prefix's keys, where another worker would load it. So the saves of
such a request are held until the load's outcome is known (``settle``) and then sent,
or dropped. The other requests' saves are sent at once, layer by layer, while the
forward pass goes on.

Contract: ``add`` and ``settle`` never block on the store. ``wait`` returns once every
send has finished or the deadline (``timeout_s`` from the call) has passed; a send that
fails or misses it is logged, and its blocks become future misses. Saves still held at
``wait`` are sent only after a ``settle``: ``wait`` settles them as dropped.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from typing import Callable, Collection, Sequence

from kvmesh.kv_store.client import StoreError

log = logging.getLogger("kvmesh.connector")

# (key, bytes, parent key, session id): one block of one layer
Item = tuple[bytes, bytes, "bytes | None", "str | None"]


class StepSaves:
    def __init__(self, put: Callable[[list[Item]], object], executor: cf.Executor, timeout_s: float):
        self._put, self._executor, self.timeout_s = put, executor, timeout_s
        self._sending: list[cf.Future] = []
        self._held: dict[str, list[list[Item]]] = {}  # request -> its held puts

    def add(self, items: Sequence[Item], held_for: str | None = None) -> None:
        """Save ``items`` in one put: now, or, ``held_for`` a request, once settled."""
        if not items:
            return
        if held_for is not None:
            self._held.setdefault(held_for, []).append(list(items))
        else:
            self._sending.append(self._executor.submit(self._put, list(items)))

    def settle(self, failed: Collection[str]) -> int:
        """Send the held saves of requests not in ``failed`` and drop the others'; returns
        how many blocks were dropped."""
        held, self._held = self._held, {}
        dropped = 0
        for req_id, puts in held.items():
            if req_id in failed:
                dropped += sum(len(items) for items in puts)
            else:
                self._sending.extend(self._executor.submit(self._put, items) for items in puts)
        if dropped:
            log.info("dropped %d block saves computed over blocks that failed to load", dropped)
        return dropped

    def wait(self) -> None:
        """Wait for every send (see the contract)."""
        self.settle(failed=set(self._held))
        deadline = time.monotonic() + self.timeout_s
        for future in self._sending:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except cf.TimeoutError:
                log.warning("KV save missed its %.1fs deadline; those blocks will miss", self.timeout_s)
            except StoreError as e:
                log.warning("KV save failed; those blocks will miss: %s", e)
        self._sending.clear()
