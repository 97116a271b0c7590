"""Speculative decoding counters, with vLLM's meanings (exported as folio:spec_decode_*).

    num_drafts                 verified draft runs (one per request per step that had drafts)
    num_draft_tokens           draft tokens verified
    num_accepted_tokens        draft tokens accepted
    accepted_tokens_per_pos[i] runs whose draft at position i was accepted (acceptance is
                               a prefix, so position i accepted means 0..i-1 were too)

All cumulative since the scheduler started; the scheduler counts from each step's result
(the executor reports how many drafts it accepted).
"""

from __future__ import annotations

from typing import NamedTuple


class SpecDecodeStats(NamedTuple):
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_tokens_per_pos: tuple[int, ...] = ()


class SpecDecodeCounters:
    def __init__(self) -> None:
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.per_pos: list[int] = []

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        if not 0 <= num_accepted <= num_draft_tokens:
            raise ValueError(f"{num_accepted} drafts accepted of {num_draft_tokens}")
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.per_pos) < num_draft_tokens:
            self.per_pos.extend([0] * (num_draft_tokens - len(self.per_pos)))
        for i in range(num_accepted):
            self.per_pos[i] += 1

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(
            self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, tuple(self.per_pos)
        )
