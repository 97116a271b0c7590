"""Rebuilding a request's output from a token log (services/scheduler/resume.py)."""

from __future__ import annotations

from services.scheduler.resume import carries
from shared.protocol import Logprobs, TokenBatch, TokenDelta


def _lp(token_id: int) -> Logprobs:
    return Logprobs(token_id=token_id, logprob=-0.5, rank=1)


def _batch(*deltas: TokenDelta) -> TokenBatch:
    return TokenBatch(deltas=list(deltas), engine_id="e0")


def test_tokens_by_index_repeats_and_gaps():
    log = [
        _batch(TokenDelta(req_id="a", token_ids=[5], index=0, num_prompt_tokens=3),
               TokenDelta(req_id="b", token_ids=[9], index=0)),
        _batch(TokenDelta(req_id="a", token_ids=[6, 7], index=1)),
        # A resumed prefix logged again by the engine that took "a" over: changes nothing.
        _batch(TokenDelta(req_id="a", token_ids=[5, 6, 7], index=0)),
        _batch(TokenDelta(req_id="a", token_ids=[7, 8], index=2)),  # overlaps by one
        _batch(TokenDelta(req_id="b", token_ids=[11], index=3)),  # a gap: never guessed across
        _batch(TokenDelta(req_id="c", token_ids=[1], index=0)),
    ]
    got = carries(log, {"a", "b"})
    assert set(got) == {"a", "b"}
    assert got["a"].token_ids == [5, 6, 7, 8] and got["a"].num_prompt_tokens == 3
    assert got["b"].token_ids == [9]
    assert got["a"].delta("a") == TokenDelta(req_id="a", token_ids=[5, 6, 7, 8], index=0, num_prompt_tokens=3)


def test_finish_and_logprobs_are_carried():
    log = [
        _batch(TokenDelta(req_id="a", token_ids=[5, 6], index=0, logprobs=[_lp(5), _lp(6)])),
        _batch(TokenDelta(req_id="a", token_ids=[7], index=2, logprobs=[_lp(7)], finish_reason=2)),
        _batch(TokenDelta(req_id="b", token_ids=[5], index=0, logprobs=[_lp(5)])),
        _batch(TokenDelta(req_id="b", token_ids=[6], index=1)),  # one delta without: none carried
    ]
    got = carries(log, {"a", "b"})
    assert got["a"].finish_reason == 2
    assert [lp.token_id for lp in got["a"].delta("a").logprobs] == [5, 6, 7]
    assert got["b"].token_ids == [5, 6] and got["b"].delta("b").logprobs == []
