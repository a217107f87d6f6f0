"""The figures of ``kvmesh bench layerwise`` (``bench.load_path_report``) from responses'
``kvmesh`` objects, without a cluster."""

from __future__ import annotations

import pytest

from kvmesh.bench.load_path_report import PARTS, memcpy_seconds, sample, summarize


def info(backend: str, transfer: float, waited: float, path: float, ttft: float) -> dict:
    parts = {"lookup": 0.001, "placed": path - 0.001, "locate": 0.001, "read": 0.002,
             "verify": 0.0005, "copy": 0.001}
    return {"ttft_s": ttft,
            "kv_transfer": {"backend": backend, "bytes": 16_000_000, "seconds": transfer,
                            "waited_s": waited, "load_path": {"seconds": path, **parts}},
            "breakdown": {"decode_engine_queue": 0.001, "decode_first_step": ttft / 2}}


def test_a_backend_row_sets_the_load_path_against_memcpy_and_the_modes_against_each_other():
    layerwise = [sample(info("shm", 0.010, 0.001, 0.030, 0.200)) for _ in range(3)]
    load_all = [sample(info("shm", 0.008, 0.008, 0.016, 0.250)) for _ in range(3)]
    row = summarize("shm", {"layerwise": layerwise, "load_all": load_all}, memcpy_s=0.002)
    assert row["backend"] == "shm" and row["kv_bytes"] == 16_000_000
    path = row["load_path"]
    # the load path comes from the requests that loaded everything first
    assert path["ms_p50"] == 16.0 and path["GBps"] == 1.0 and path["memcpy_GBps"] == 8.0
    assert path["ratio_to_memcpy"] == 0.125
    assert set(path["parts_ms_p50"]) == set(PARTS) and path["parts_ms_p50"]["read"] == 2.0
    assert row["layerwise"]["requests"] == 3 and row["layerwise"]["hidden_share_p50"] == 0.9
    assert row["load_all"]["hidden_share_p50"] == 0.0
    assert row["ttft_ratio_layerwise_to_load_all"] == 0.8
    assert row["decode_ttft_ratio_layerwise_to_load_all"] == pytest.approx(0.101 / 0.126, abs=1e-3)


def test_a_backend_without_samples_has_no_figures():
    row = summarize("grpc", {"layerwise": [], "load_all": []}, memcpy_s=0.001)
    assert row["kv_bytes"] == 0 and row["load_path"]["ms_p50"] is None
    assert row["load_path"]["ratio_to_memcpy"] is None and row["ttft_ratio_layerwise_to_load_all"] is None


def test_memcpy_is_timed():
    assert memcpy_seconds(1 << 20, repeats=3) > 0
