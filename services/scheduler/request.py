"""One request's state inside the scheduler.

A request is small on purpose (DESIGN §8, durable requests): what is needed to resume
it elsewhere is its prompt, the tokens generated so far and its sampling params. Every
other field is either bookkeeping that is rebuilt on resume (`num_computed_tokens`,
`block_hashes`) or metadata carried through to the executors and the gateway.

Life cycle:

    WAITING ──admit──▶ RUNNING ──stop / length / abort──▶ FINISHED_*
       ▲                  │
       └──── PREEMPTED ◀──┘  (blocks freed; recomputed from scratch when re-admitted)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from shared.protocol import FinishReason, GenerateRequest
from shared.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @staticmethod
    def finished(reason: FinishReason) -> RequestStatus:
        return _FINISHED_STATUS[reason]


_FINISHED_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
}


@dataclass(slots=True, eq=False)
class Request:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    reply_to: str = ""
    arrival_time: float = field(default_factory=time.time)
    traceparent: str = ""
    # The request's entry in the requests stream (acknowledged when it finishes); b"" in-process.
    stream_id: bytes = b""
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache (or scheduled to be written by the step in flight:
    # the scheduler advances it when it schedules, not when the step returns).
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    # Prompt tokens served from the prefix cache at first admission (reported to clients).
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # Wall-clock times (0: not yet) for metrics and span events: the first step that
    # scheduled it (a preempted request keeps its first) and its first sampled token.
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    # Speculative decoding: draft tokens the executor proposed for the next step (never
    # part of output_token_ids; verified, then dropped or turned into output).
    spec_token_ids: list[int] = field(default_factory=list)
    # Chained hashes of the request's full blocks, filled lazily by the KV cache manager.
    # Derived from the tokens alone, so it stays valid across preemption.
    block_hashes: list[Any] = field(default_factory=list, repr=False)

    @classmethod
    def from_generate_request(cls, msg: GenerateRequest, stream_id: bytes = b"") -> Request:
        return cls(
            req_id=msg.req_id,
            prompt_token_ids=list(msg.prompt_token_ids),
            sampling_params=msg.sampling_params,
            reply_to=msg.reply_to,
            arrival_time=msg.arrival_time or time.time(),
            traceparent=msg.traceparent,
            stream_id=stream_id,
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known so far: prompt + output. All but the last sampled one have KV once caught up."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the whole sequence."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]
