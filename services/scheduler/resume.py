"""Resuming a request from an engine's token log (pure: no Redis, no torch).

An engine's executor appends each step's deltas to the engine's token log before it
publishes them, so the log holds at least what any client has seen. An engine that takes
over a request (its own after a restart, or a dead engine's) rebuilds what was generated:

    log:   [a: idx 0 "The"] [a: idx 1 " cat", b: idx 0 "Hi"] [a: idx 1 " cat"] ...
    carry: a -> idx 0, tokens ["The", " cat"]      b -> idx 0, tokens ["Hi"]

Deltas are applied by index, so a delta logged twice (a resumed prefix re-logged by the
engine that took it over) or out of order changes nothing. The carry is logged again by
the new engine (its own log must hold it if it dies too) and published, so a gateway that
missed a delta in the crash fills the gap; the gateway drops indices it has already sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.protocol import Logprobs, TokenBatch, TokenDelta


@dataclass
class Carry:
    """What one request generated before it was taken over."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] = field(default_factory=list)
    has_logprobs: bool = True  # False once any delta came without them (then none are carried)
    finish_reason: int = 0
    num_prompt_tokens: int = 0

    def apply(self, d: TokenDelta) -> None:
        have = len(self.token_ids)
        if d.index > have:
            return  # a gap cannot be filled from later tokens; the engine logs in order
        skip = have - d.index
        new = d.token_ids[skip:]
        if not new and not d.finish_reason:
            return
        self.token_ids.extend(new)
        if d.logprobs and len(d.logprobs) == len(d.token_ids):
            self.logprobs.extend(d.logprobs[skip:])
        elif new:
            self.has_logprobs = False
        self.finish_reason = d.finish_reason or self.finish_reason
        self.num_prompt_tokens = d.num_prompt_tokens or self.num_prompt_tokens

    def delta(self, req_id: str) -> TokenDelta:
        """The whole carried output as one delta from index 0."""
        return TokenDelta(
            req_id=req_id,
            token_ids=list(self.token_ids),
            index=0,
            logprobs=list(self.logprobs) if self.has_logprobs else [],
            finish_reason=self.finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
        )


def carries(batches: list[TokenBatch], req_ids: set[str]) -> dict[str, Carry]:
    """The carried output of each request in `req_ids` found in the log, oldest entry first."""
    out: dict[str, Carry] = {}
    for batch in batches:
        for d in batch.deltas:
            if d.req_id in req_ids:
                out.setdefault(d.req_id, Carry()).apply(d)
    return out
