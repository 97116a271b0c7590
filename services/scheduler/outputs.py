"""What the scheduler hands back after each step: per-request outputs and stats."""

from __future__ import annotations

from typing import NamedTuple

from services.scheduler.request import Request
from services.scheduler.spec_stats import SpecDecodeStats
from shared.protocol import FinishReason, Logprobs


class EngineCoreOutput(NamedTuple):
    """New tokens of one request from one step, and whether it finished.

    `error` is set (and `finish_reason` is ABORT) when the step failed on the executors.
    """

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprobs]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str = ""
    # The request itself, for the owner of what lives outside the scheduler (its stream
    # entry, its reply channel, its span); a finished one is no longer in Scheduler.requests.
    request: Request | None = None
    # The executors streamed this finish to the client with the tokens (they decided it);
    # False for a finish only the scheduler could decide, which it must then report itself.
    streamed: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(NamedTuple):
    """A snapshot for metrics; the prefix-cache counters and preemptions are cumulative."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use, 0..1
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # tokens found there
    num_preemptions: int
    spec_decode: SpecDecodeStats = SpecDecodeStats()
