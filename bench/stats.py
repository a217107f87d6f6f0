"""Percentiles shared by the benchmarks."""

from __future__ import annotations

import math
from typing import Sequence


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 < q <= 1) of ``ordered`` (sorted ascending) by nearest rank:
    the smallest sample that at least ``q`` of the samples do not exceed (of 100 samples,
    p99 is the 99th; of 20, the 20th)."""
    if not ordered:
        raise ValueError("no samples")
    rank = math.ceil(round(q * len(ordered), 9))  # round: 0.07 * 100 is 7.000000000000001
    return ordered[min(len(ordered), max(1, rank)) - 1]
