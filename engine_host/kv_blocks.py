"""How many of the engine's KV cache blocks are free, as its scheduler last reported.

vLLM's scheduler reports its KV cache usage (``SchedulerStats.kv_cache_usage``, one minus
the free share of its blocks, the null block left out) with the outputs of every step, and
after the step that frees a finished request's blocks (a delayed free included) too.
``KvBlocks.stat_logger`` is a stat-logger factory for ``AsyncLLM`` that keeps the latest
report; ``free()`` turns it into a block count.

Guarantees: before the first report (nothing ran yet) every block counts as free; an
idle engine whose requests all ended reports all its usable blocks free (vLLM counts a
block that only its prefix cache holds as free: it can be reused at once). The count is
as fresh as the engine's last step, so it may lag a request that started since.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class KvBlocks:
    def __init__(self) -> None:
        self.usage = 0.0  # the scheduler's last kv_cache_usage, in [0, 1]
        self.total = 0    # the engine's KV blocks (known once a stat logger is made)

    @property
    def usable(self) -> int:
        """Blocks requests can get: all but vLLM's null block."""
        return max(0, self.total - 1)

    def free(self) -> int:
        """Usable blocks free at the engine's last step."""
        return round((1.0 - self.usage) * self.usable)

    def stat_logger(self, vllm_config: "VllmConfig", engine_index: int = 0):
        """A vLLM stat logger (``AsyncLLM(stat_loggers=[kv_blocks.stat_logger])``) that
        keeps this object current."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        blocks = self

        class _Recorder(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                self.vllm_config = vllm_config

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if scheduler_stats is not None:
                    blocks.usage = scheduler_stats.kv_cache_usage

            def log_engine_initialized(self) -> None:
                # called once the engine core reported its cache size into the config
                blocks.total = self.vllm_config.cache_config.num_gpu_blocks or 0

        return _Recorder(vllm_config, engine_index)
