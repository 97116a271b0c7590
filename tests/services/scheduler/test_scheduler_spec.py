"""Speculative decoding in the scheduler, by exact block ids: drafts are budgeted and get
KV slots, a draft model's lookahead is reserved, rejected drafts are rolled back before
any block is cached, and preemption and aborts work mid-speculation."""

from services.scheduler.block_pool import hash_block
from services.scheduler.request import Request, RequestStatus
from services.scheduler.scheduler import Scheduler
from shared.protocol import FinishReason, StepResult
from shared.sampling_params import SamplingParams

BS = 4


def make(**kw) -> Scheduler:
    args = dict(
        num_blocks=16,
        block_size=BS,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=64,
        enable_prefix_caching=True,
    )
    args.update(kw)
    return Scheduler(**args)


def add(s: Scheduler, req_id: str, prompt: list[int], max_tokens: int = 32) -> Request:
    r = Request(req_id, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    s.add_request(r)
    return r


def result(plan, tokens: dict, drafts: dict | None = None, accepted: dict | None = None) -> StepResult:
    ids = list(tokens)
    return StepResult(
        step_id=plan.step_id,
        req_ids=ids,
        sampled_token_ids=[tokens[r] for r in ids],
        finish_reasons=[0] * len(ids),
        draft_token_ids=[(drafts or {}).get(r, []) for r in ids],
        num_accepted=[(accepted or {}).get(r, 0) for r in ids],
    )


def cached_blocks(s: Scheduler) -> dict[int, object]:
    """block id -> hash of every block registered in the prefix cache."""
    return {b.block_id: b.block_hash for b in s.kv.pool.blocks if b.block_hash is not None}


def chain(tokens: list[int]) -> list:
    hashes, parent = [], None
    for i in range(len(tokens) // BS):
        parent = hash_block(parent, tokens[i * BS : (i + 1) * BS])
        hashes.append(parent)
    return hashes


def test_drafts_are_scheduled_with_slots_and_rejected_ones_never_cached():
    s = make()
    a = add(s, "a", list(range(10, 17)))  # 7 prompt tokens: blocks 0, 1
    plan = s.schedule()
    assert plan.num_scheduled_tokens == {"a": 7} and plan.new_requests[0].block_ids == [0, 1]
    s.update_from_output(plan, result(plan, {"a": [100]}, drafts={"a": [101, 102, 103, 104]}))
    assert a.spec_token_ids == [101, 102, 103, 104]

    # Pending token at position 7 plus 4 drafts at 8..11: 5 tokens, one more block (2).
    plan = s.schedule()
    assert plan.num_scheduled_tokens == {"a": 5}
    assert plan.scheduled_spec_tokens == {"a": [101, 102, 103, 104]}
    assert plan.cached_requests[0].new_block_ids == [2] and plan.cached_requests[0].num_computed_tokens == 7
    assert a.num_computed_tokens == 12 and a.spec_token_ids == []
    # Every draft rejected: the target's own token instead. Block 2 (positions 8..11)
    # held only drafts: it must not be cached; blocks 0 and 1 are (all accepted tokens).
    outs = s.update_from_output(plan, result(plan, {"a": [200]}, drafts={"a": [201]}))
    assert outs[0].new_token_ids == [200] and a.output_token_ids == [100, 200]
    assert a.num_computed_tokens == 8  # = num_tokens - 1: rolled back over 4 drafts
    assert cached_blocks(s) == dict(zip([0, 1], chain(a.token_ids(0, 8)), strict=True))
    assert s.stats().spec_decode == (1, 4, 0, (0, 0, 0, 0))

    # Next: position 8 (200) + draft 201 at 9; accepted, bonus 202: block 2 fills later.
    plan = s.schedule()
    assert plan.num_scheduled_tokens == {"a": 2} and plan.cached_requests[0].new_block_ids == []
    s.update_from_output(plan, result(plan, {"a": [201, 202]}, drafts={"a": [203, 204]}, accepted={"a": 1}))
    assert a.num_computed_tokens == 10 and a.num_tokens == 11
    plan = s.schedule()  # 202 at 10, drafts at 11, 12: block 3 for position 12
    assert plan.num_scheduled_tokens == {"a": 3} and plan.cached_requests[0].new_block_ids == [3]
    s.update_from_output(plan, result(plan, {"a": [203, 300]}, accepted={"a": 1}))
    assert a.num_computed_tokens == 12
    # Block 2 now holds 200 201 202 203, all accepted: cached with the right chain hash.
    assert cached_blocks(s) == dict(zip([0, 1, 2], chain(a.token_ids(0, 12)), strict=True))
    assert s.stats().spec_decode == (3, 7, 2, (2, 0, 0, 0))


def test_token_budget_cuts_drafts_and_counts_them():
    s = make(max_num_batched_tokens=16)
    a, b = add(s, "a", list(range(10, 15))), add(s, "b", list(range(20, 25)))
    plan = s.schedule()
    s.update_from_output(plan, result(plan, {"a": [1], "b": [2]}, drafts={"a": [5] * 12, "b": [6] * 12}))
    plan = s.schedule()
    # a: 1 + 12 drafts = 13; b: 1 + the 2 drafts left in the budget of 16.
    assert plan.num_scheduled_tokens == {"a": 13, "b": 3}
    assert plan.scheduled_spec_tokens == {"a": [5] * 12, "b": [6] * 2}
    assert plan.total_num_scheduled_tokens == 16
    assert (a.num_computed_tokens, b.num_computed_tokens) == (18, 8)


def test_draft_model_lookahead_is_reserved_within_max_model_len():
    s = make(num_lookahead_slots=3, max_model_len=12)
    add(s, "a", list(range(10, 16)))  # 6 tokens + 3 lookahead: 9 slots, 3 blocks
    plan = s.schedule()
    assert plan.new_requests[0].block_ids == [0, 1, 2]
    s.update_from_output(plan, result(plan, {"a": [1]}, drafts={"a": [2, 3, 4]}))
    plan = s.schedule()  # positions 6..9 computed, lookahead capped at max_model_len 12
    assert plan.cached_requests[0].new_block_ids == []
    assert s.kv.block_ids("a") == [0, 1, 2]


def test_preemption_mid_speculation_drops_drafts_and_recomputes():
    s = make(num_blocks=4)  # 16 slots
    a = add(s, "a", list(range(10, 17)))
    b = add(s, "b", list(range(20, 24)))
    plan = s.schedule()  # a: blocks 0, 1; b: block 2
    s.update_from_output(
        plan, result(plan, {"a": [1], "b": [2]}, drafts={"a": [3, 4, 5, 6], "b": [7, 8, 9, 10]})
    )
    # a needs block 3 for its drafts, b then needs a fifth block: b (admitted last) is preempted.
    plan = s.schedule()
    assert plan.num_scheduled_tokens == {"a": 5} and plan.finished_req_ids == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.spec_token_ids == [] and b.num_computed_tokens == 0
    s.update_from_output(plan, result(plan, {"a": [3, 11]}, accepted={"a": 1}))
    assert a.num_computed_tokens == 9 and a.output_token_ids == [1, 3, 11]
    s.abort_requests(["a"])
    plan = s.schedule()  # b comes back as new, without drafts, its output recomputed
    assert plan.new_requests[0].req_id == "b" and plan.new_requests[0].output_token_ids == [2]
    # Its full prompt block was cached before the preemption: only token 2 is recomputed.
    assert plan.scheduled_spec_tokens == {} and plan.num_scheduled_tokens == {"b": 1}
    assert plan.new_requests[0].num_computed_tokens == 4
    assert plan.finished_req_ids == ["a"]


def test_abort_while_drafts_are_in_flight_frees_every_block():
    s = make()
    add(s, "a", list(range(10, 17)))
    plan = s.schedule()
    s.update_from_output(plan, result(plan, {"a": [1]}, drafts={"a": [2, 3, 4, 5]}))
    plan = s.schedule()
    assert s.kv.num_free_blocks == 13
    s.abort_requests(["a"])
    assert s.update_from_output(plan, result(plan, {"a": [2, 3]}, accepted={"a": 1})) == []
    assert s.kv.num_free_blocks == 16 and not s.has_unfinished_requests()


def test_a_request_with_drafts_that_gets_no_token_is_failed_and_nothing_cached():
    s = make()
    a = add(s, "a", list(range(10, 17)))
    plan = s.schedule()
    s.update_from_output(plan, result(plan, {"a": [1]}, drafts={"a": [2, 3, 4, 5]}))
    plan = s.schedule()
    outs = s.update_from_output(plan, StepResult(step_id=plan.step_id))
    assert outs[0].finish_reason == FinishReason.ABORT and "no token" in outs[0].error
    assert a.is_finished and set(cached_blocks(s)) == {0}  # block 1 was never full of accepted tokens
