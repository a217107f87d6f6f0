"""The figures of ``kvmesh bench layerwise``, from the responses' ``kvmesh`` objects.

``sample`` keeps what one response says about its decode worker's load; ``summarize``
turns the samples of one backend, in both load modes, into that backend's row of the
report; ``memcpy_seconds`` times the reference every load path is set against. Nothing
here starts a cluster.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import numpy as np

MODES = ("layerwise", "load_all")  # each layer just before its attention; everything first
PARTS = ("lookup", "locate", "read", "verify", "copy")


def memcpy_seconds(nbytes: int, repeats: int = 15) -> float:
    """Median time of one numpy copy of ``nbytes`` between two preallocated, touched
    buffers (the first copy, which may fault pages in, is not counted)."""
    src = np.ones(max(1, nbytes), dtype=np.uint8)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def sample(info: dict) -> dict:
    """One response's ``kvmesh`` object -> the figures the report uses (seconds)."""
    transfer = info["kv_transfer"]
    path = transfer.get("load_path") or {}
    stages = info.get("breakdown") or {}
    return {"backend": transfer["backend"], "bytes": transfer["bytes"],
            "transfer_s": transfer["seconds"], "waited_s": transfer["waited_s"],
            "load_path_s": path.get("seconds", 0.0), "placed_s": path.get("placed", 0.0),
            "parts": {p: path.get(p, 0.0) for p in PARTS},
            "ttft_s": info.get("ttft_s") or 0.0,
            # the decode worker's own time to first token: its engine queue, then its
            # first step (the load included)
            "decode_ttft_s": stages.get("decode_engine_queue", 0.0) + stages.get("decode_first_step", 0.0)}


def median_ms(values: Sequence[float]) -> float | None:
    """The median of ``values`` (seconds) in milliseconds, 3 decimals; None for none."""
    return round(statistics.median(values) * 1e3, 3) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _mode(rows: list[dict]) -> dict:
    hidden = [1 - r["waited_s"] / r["transfer_s"] for r in rows if r["transfer_s"] > 0]
    return {"requests": len(rows),
            "transfer_ms_p50": median_ms([r["transfer_s"] for r in rows]),
            "waited_ms_p50": median_ms([r["waited_s"] for r in rows]),
            "hidden_share_p50": round(statistics.median(hidden), 3) if hidden else None,
            "placed_ms_p50": median_ms([r["placed_s"] for r in rows]),
            "ttft_ms_p50": median_ms([r["ttft_s"] for r in rows]),
            "decode_ttft_ms_p50": median_ms([r["decode_ttft_s"] for r in rows])}


def summarize(backend: str, by_mode: dict[str, list[dict]], memcpy_s: float) -> dict:
    """One backend's row: its bytes; the load path (lookup + lease to the last block in
    the paged cache) as time, GB/s and ratio to ``memcpy_s`` (a copy of the same bytes),
    taken from the load-everything-first requests, where nothing else runs inside it;
    each mode's transfer, wait, hidden share and time to first token; and the time to
    first token of layer-wise loading over load-everything-first."""
    everything = by_mode.get("load_all", [])
    nbytes = int(statistics.median(r["bytes"] for rows in by_mode.values() for r in rows)) \
        if any(by_mode.values()) else 0
    path_s = statistics.median(r["load_path_s"] for r in everything) if everything else None
    modes = {m: _mode(by_mode.get(m, [])) for m in MODES}
    gbps = round(nbytes / path_s / 1e9, 3) if path_s else None
    memcpy_gbps = round(nbytes / memcpy_s / 1e9, 3) if memcpy_s > 0 else None
    return {
        "backend": backend, "kv_bytes": nbytes,
        "load_path": {"ms_p50": median_ms([path_s]) if path_s is not None else None, "GBps": gbps,
                      "memcpy_ms": round(memcpy_s * 1e3, 3), "memcpy_GBps": memcpy_gbps,
                      "ratio_to_memcpy": _ratio(gbps, memcpy_gbps),
                      "parts_ms_p50": {p: median_ms([r["parts"][p] for r in everything]) for p in PARTS}},
        **modes,
        "ttft_ratio_layerwise_to_load_all": _ratio(modes["layerwise"]["ttft_ms_p50"],
                                                   modes["load_all"]["ttft_ms_p50"]),
        "decode_ttft_ratio_layerwise_to_load_all": _ratio(modes["layerwise"]["decode_ttft_ms_p50"],
                                                          modes["load_all"]["decode_ttft_ms_p50"]),
    }
