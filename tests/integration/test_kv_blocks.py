"""``EngineStats.kv``: the calls vLLM makes on a stat logger (``log_engine_initialized``, then
``record`` with vLLM's own ``SchedulerStats``) keep it current, and the worker's health
reports it. (The cluster tests see it on a real engine: test_soak, test_chaos.)"""

from __future__ import annotations

import asyncio

from vllm.v1.metrics.stats import SchedulerStats

from kvmesh.engine_host.engine_stats import EngineStats
from kvmesh.engine_host.service import WorkerService
from kvmesh.engine_host.settings import DecodeSettings
from kvmesh_proto import worker_pb2
from tests.integration.test_worker_auth import StandInEngine


def test_the_last_scheduler_report_gives_the_free_blocks_health_reports():
    engine = StandInEngine()  # 8 blocks, one of them vLLM's null block
    stats = EngineStats()
    logger = stats.stat_logger(engine.vllm_config, 0)
    service = WorkerService(engine, DecodeSettings(port=0), stats)

    def health() -> tuple[int, int]:
        reply = asyncio.run(service.Health(worker_pb2.HealthRequest(), None))
        return reply.kv_blocks_free, reply.kv_blocks_total

    logger.log_engine_initialized()
    assert health() == (7, 7)  # nothing ran yet: all free
    logger.record(SchedulerStats(kv_cache_usage=3 / 7), None)
    assert health() == (4, 7)
    logger.record(None, None)  # a step that reports no scheduler stats changes nothing
    assert health() == (4, 7)
    logger.record(SchedulerStats(kv_cache_usage=0.0), None)
    assert health() == (7, 7)


def test_a_worker_without_it_reports_none():
    reply = asyncio.run(WorkerService(StandInEngine(), DecodeSettings(port=0)).Health(
        worker_pb2.HealthRequest(), None))
    assert (reply.kv_blocks_free, reply.kv_blocks_total) == (0, 0)
