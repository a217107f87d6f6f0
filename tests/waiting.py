"""Waiting in tests for something another thread or process does, with a deadline."""

from __future__ import annotations

import time
from typing import Callable


def wait_until(condition: Callable[[], object], timeout_s: float = 15.0, every_s: float = 0.05) -> bool:
    """Whether ``condition()`` came true within ``timeout_s``: checked every ``every_s``
    and once more at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return bool(condition())
