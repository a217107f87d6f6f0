"""Speculative-decoding figures of a worker's engine, for its health reply.

``SpecDecodeTotals`` adds up vLLM's per-step ``SpecDecodingStats`` (drafts proposed,
draft tokens, draft tokens accepted), handed to it by a vLLM stat logger
(``stat_logger_factory``, given to the engine when it is built). Its ``summary`` is what
the worker reports: the acceptance rate (accepted over proposed draft tokens) and the
tokens per step of a request that got a draft (one token the target computes anyway plus
the accepted ones); both None until a draft was proposed. An engine without speculative
decoding reports zeros.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def stat_logger_factory(totals: SpecDecodeTotals):
    """A vLLM ``StatLoggerFactory`` whose loggers add each step's speculative-decoding
    stats to ``totals`` (called on the engine's output loop; they log nothing)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SpecDecodeLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                totals.add(scheduler_stats.spec_decoding_stats)

        def log_engine_initialized(self):
            pass

    return SpecDecodeLogger
