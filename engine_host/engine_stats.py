"""What a worker's engine reports after each step, kept for its health reply.

One vLLM stat logger (``EngineStats.stat_logger``, given to the engine when it is built)
receives the scheduler's stats with the outputs of every step (and after the step that
frees a finished request's blocks, a delayed free included) and keeps:

* ``spec`` (``SpecDecodeTotals``): vLLM's per-step ``SpecDecodingStats`` added up (drafts
  proposed, draft tokens, draft tokens accepted). Its ``summary`` is the acceptance rate
  (accepted over proposed draft tokens) and the tokens per step of a request that got a
  draft (one token the target computes anyway plus the accepted ones); both None until a
  draft was proposed. An engine without speculative decoding reports zeros.
* ``kv`` (``KvBlocks``): the KV cache blocks free at the last step, from the scheduler's
  ``kv_cache_usage`` (one minus the free share of its blocks, the null block left out).
  Before the first report every block counts as free; an idle engine whose requests all
  ended reports all its usable blocks free (vLLM counts a block only its prefix cache
  holds as free: it can be reused at once). The count is as fresh as the engine's last
  step, so it may lag a request that started since.

The logger runs on the engine's output loop and logs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass
class SpecDecodeTotals:
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    def add(self, stats) -> None:
        """One step's ``vllm.v1.spec_decode.metrics.SpecDecodingStats`` (None: nothing)."""
        if stats is None:
            return
        self.drafts += stats.num_drafts
        self.draft_tokens += stats.num_draft_tokens
        self.accepted_tokens += stats.num_accepted_tokens

    def summary(self) -> dict:
        return {
            "spec_drafts": self.drafts,
            "spec_draft_tokens": self.draft_tokens,
            "spec_accepted_tokens": self.accepted_tokens,
            "spec_acceptance_rate": self.accepted_tokens / self.draft_tokens if self.draft_tokens else None,
            "spec_tokens_per_step": 1 + self.accepted_tokens / self.drafts if self.drafts else None,
        }


@dataclass
class KvBlocks:
    usage: float = 0.0  # the scheduler's last kv_cache_usage, in [0, 1]
    total: int = 0      # the engine's KV blocks (known once the engine is initialized)

    @property
    def usable(self) -> int:
        """Blocks requests can get: all but vLLM's null block."""
        return max(0, self.total - 1)

    def free(self) -> int:
        """Usable blocks free at the engine's last step."""
        return round((1.0 - self.usage) * self.usable)


@dataclass
class EngineStats:
    spec: SpecDecodeTotals = field(default_factory=SpecDecodeTotals)
    kv: KvBlocks = field(default_factory=KvBlocks)

    def stat_logger(self, vllm_config: "VllmConfig", engine_index: int = 0):
        """A vLLM stat logger (``AsyncLLM(stat_loggers=[stats.stat_logger])``) that keeps
        this object current."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class _Recorder(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                self.vllm_config = vllm_config

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if scheduler_stats is not None:
                    stats.kv.usage = scheduler_stats.kv_cache_usage
                    stats.spec.add(scheduler_stats.spec_decoding_stats)

            def log_engine_initialized(self) -> None:
                # called once the engine core reported its cache size into the config
                stats.kv.total = self.vllm_config.cache_config.num_gpu_blocks or 0

        return _Recorder(vllm_config, engine_index)
