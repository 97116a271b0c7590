import pytest

from services.scheduler.request import Request, RequestStatus
from services.scheduler.scheduler import Scheduler
from shared.protocol import FinishReason, StepResult
from shared.sampling_params import SamplingParams
from tests.services.scheduler.fake_runner import FakeRunner, expected_tokens

EOS = 2


def make(**kw) -> tuple[Scheduler, FakeRunner]:
    args = dict(
        num_blocks=64,
        block_size=16,
        max_num_seqs=16,
        max_num_batched_tokens=2048,
        max_model_len=1024,
        enable_prefix_caching=True,
    )
    args.update(kw)
    runner = FakeRunner(args["block_size"], args["num_blocks"], frozenset([EOS]), args["max_model_len"])
    return Scheduler(**args), runner


def add(s: Scheduler, req_id: str, prompt, **params) -> Request:
    params.setdefault("temperature", 0.0)
    r = Request(req_id, list(prompt), SamplingParams(**params))
    s.add_request(r)
    return r


def step(s: Scheduler, runner: FakeRunner):
    plan = s.schedule()
    return plan, s.update_from_output(plan, runner.step(plan))


def run_all(s: Scheduler, runner: FakeRunner, max_steps: int = 2000) -> dict:
    """Run to completion; {req_id: (tokens, finish_reason)}."""
    out: dict[str, tuple[list[int], FinishReason | None]] = {}
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return out
        _, outputs = step(s, runner)
        for o in outputs:
            toks, _ = out.get(o.req_id, ([], None))
            out[o.req_id] = (toks + o.new_token_ids, o.finish_reason)
    raise AssertionError("requests did not finish")


def test_chunked_prefill_32_32_32_4_and_only_the_last_chunk_samples():
    s, runner = make(max_num_batched_tokens=32)
    prompt = list(range(1000, 1100))
    add(s, "a", prompt, max_tokens=2)
    plans = []
    for expect_n, expect_computed, expect_blocks in [(32, 0, [0, 1]), (32, 32, [2, 3]), (32, 64, [4, 5])]:
        plan, outputs = step(s, runner)
        plans.append(plan)
        assert plan.num_scheduled_tokens == {"a": expect_n} and outputs == []
        if expect_computed == 0:
            [new] = plan.new_requests
            assert new.num_computed_tokens == 0 and new.block_ids == expect_blocks
        else:
            [c] = plan.cached_requests
            assert (c.num_computed_tokens, c.new_block_ids) == (expect_computed, expect_blocks)
    plan, [out] = step(s, runner)
    [c] = plan.cached_requests
    assert plan.num_scheduled_tokens == {"a": 4} and (c.num_computed_tokens, c.new_block_ids) == (96, [6])
    assert out.new_token_ids == expected_tokens(prompt, 1) and out.finish_reason is None
    assert runner.samples == [(4, "a")]
    plan, [out] = step(s, runner)
    assert plan.num_scheduled_tokens == {"a": 1} and out.finish_reason == FinishReason.LENGTH
    assert s.stats().kv_cache_usage == 0.0 and not s.has_unfinished_requests()


def test_decodes_are_not_starved_by_a_long_prefill():
    s, runner = make(max_num_batched_tokens=32)
    add(s, "d", range(1, 5), max_tokens=40)
    step(s, runner)  # d's prefill; it is decoding from now on
    add(s, "p", range(2000, 2500), max_tokens=1)
    prefill_steps = 0
    while "p" not in {sid for _, sid in runner.samples}:
        plan, outputs = step(s, runner)
        assert plan.num_scheduled_tokens["d"] == 1
        assert [o.req_id for o in outputs if o.req_id == "d"] == ["d"]
        assert plan.total_num_scheduled_tokens <= 32
        prefill_steps += 1
    assert prefill_steps == -(-500 // 31)
    assert [c for _, rid, c in runner.chunks if rid == "p"][:3] == [31, 31, 31]


def test_a_request_that_is_last_preempts_itself_and_comes_back_as_new():
    s, runner = make(num_blocks=4, block_size=4, max_model_len=16)
    a = add(s, "a", range(100, 105), max_tokens=3)  # blocks 0, 1
    b = add(s, "b", range(200, 208), max_tokens=3)  # blocks 2, 3: the cache is full
    plan, _ = step(s, runner)
    assert [(n.req_id, n.block_ids) for n in plan.new_requests] == [("a", [0, 1]), ("b", [2, 3])]
    first_b = list(b.output_token_ids)

    # b needs a 3rd block for its 9th token; it is the last admitted, so it preempts itself.
    plan, _ = step(s, runner)
    assert plan.num_scheduled_tokens == {"a": 1} and plan.finished_req_ids == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.stats().num_preemptions == 1 and list(s.waiting) == [b]
    assert s.kv.pool.free_queue.block_ids() == [3, 2]

    plan, _ = step(s, runner)  # a finishes; b still cannot fit beside it
    assert plan.num_scheduled_tokens == {"a": 1} and a.finish_reason == FinishReason.LENGTH

    plan, _ = step(s, runner)
    [new] = plan.new_requests
    assert plan.finished_req_ids == ["a"]
    # b's two prompt blocks are prefix hits; its sampled token is recomputed in a fresh block.
    assert (new.req_id, new.block_ids, new.num_computed_tokens) == ("b", [2, 3, 1], 8)
    assert new.output_token_ids == first_b and plan.num_scheduled_tokens == {"b": 1}
    assert b.num_cached_tokens == 0  # reported for the first admission only
    run_all(s, runner)
    assert b.output_token_ids[:1] == first_b and b.finish_reason == FinishReason.LENGTH
    assert b.output_token_ids == expected_tokens(list(range(200, 208)), 3)
    assert a.output_token_ids == expected_tokens(list(range(100, 105)), 3)
    assert s.stats().kv_cache_usage == 0.0


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_when_blocks_run_out_and_every_request_completes(prefix_caching):
    s, runner = make(num_blocks=8, block_size=4, max_model_len=32, enable_prefix_caching=prefix_caching)
    prompts = {f"r{i}": list(range(100 * i, 100 * i + 9)) for i in range(4)}
    for rid, p in prompts.items():
        add(s, rid, p, max_tokens=12)
    results = run_all(s, runner)
    assert s.stats().num_preemptions > 0
    for rid, p in prompts.items():
        assert results[rid] == (expected_tokens(p, 12), FinishReason.LENGTH)
    assert s.stats().kv_cache_usage == 0.0


def test_preempted_request_is_resent_with_its_output_so_far():
    s, runner = make(num_blocks=6, block_size=4, max_model_len=24)
    add(s, "a", range(100, 108), max_tokens=12)
    add(s, "b", range(200, 208), max_tokens=12)
    seen_preempt = None
    for _ in range(100):
        plan = s.schedule()
        for n in plan.new_requests:
            if seen_preempt is not None and n.req_id == seen_preempt[0]:
                assert n.output_token_ids == seen_preempt[1] and len(n.output_token_ids) > 0
                assert n.num_computed_tokens % 4 == 0 and n.num_computed_tokens < 8 + len(seen_preempt[1])
                seen_preempt = ("done", [])
        for rid in plan.finished_req_ids:
            r = s.get_request(rid)
            if r is not None and r.status == RequestStatus.PREEMPTED:
                seen_preempt = (rid, list(r.output_token_ids))
        s.update_from_output(plan, runner.step(plan))
        if not s.has_unfinished_requests():
            break
    assert seen_preempt == ("done", [])


def test_abort_waiting_running_and_preempted_frees_everything():
    s, runner = make(num_blocks=4, block_size=4, max_model_len=16)
    add(s, "a", range(100, 105), max_tokens=5)
    add(s, "b", range(200, 208), max_tokens=5)
    step(s, runner)
    step(s, runner)  # b preempted itself (see above)
    add(s, "c", range(300, 304))  # waiting, never sent
    assert s.get_request("b").status == RequestStatus.PREEMPTED
    assert s.get_request("a").status == RequestStatus.RUNNING
    plan = s.schedule()  # a's step is in flight while it is aborted
    assert s.abort_requests(["a", "b", "c", "nope"]) == ["a", "b", "c"]
    assert s.update_from_output(plan, runner.step(plan)) == []
    assert s.stats().kv_cache_usage == 0.0 and not s.has_unfinished_requests()
    assert s.stats().num_running == 0 and s.stats().num_waiting == 0
    # b was already reported when it was preempted; c was never known.
    assert s.schedule().finished_req_ids == ["a"]
    assert s.schedule().finished_req_ids == []
    assert s.abort_requests(["a"]) == []


def test_max_num_seqs_is_respected():
    s, runner = make(max_num_seqs=2)
    prompts = {f"r{i}": list(range(10 * i + 1, 10 * i + 6)) for i in range(5)}
    for rid, p in prompts.items():
        add(s, rid, p, max_tokens=3)
    plan = s.schedule()
    assert [n.req_id for n in plan.new_requests] == ["r0", "r1"]
    s.update_from_output(plan, runner.step(plan))
    results = {}
    while s.has_unfinished_requests():
        plan, outputs = step(s, runner)
        assert len(plan.num_scheduled_tokens) <= 2 and s.stats().num_running <= 2
        results.update({o.req_id: o for o in outputs if o.finished})
    assert set(results) == {"r0", "r1", "r2", "r3", "r4"}


@pytest.mark.parametrize(
    "params, forced, n_out, reason",
    [
        (dict(max_tokens=10), {2: EOS}, 3, FinishReason.STOP),
        (dict(max_tokens=10, stop_token_ids=[7]), {1: 7}, 2, FinishReason.STOP),
        (dict(max_tokens=10, ignore_eos=True), {2: EOS}, 10, FinishReason.LENGTH),
        (dict(max_tokens=4), {}, 4, FinishReason.LENGTH),
        (dict(max_tokens=None), {}, 64 - 10, FinishReason.LENGTH),  # max_model_len
        (dict(max_tokens=10, min_tokens=3), {0: EOS, 1: EOS, 2: EOS, 3: EOS}, 4, FinishReason.STOP),
    ],
)
def test_finish_reasons(params, forced, n_out, reason):
    s, runner = make(max_model_len=64)
    runner.forced["a"] = forced
    add(s, "a", range(100, 110), **params)
    results = run_all(s, runner)
    toks, got = results["a"]
    assert (len(toks), got) == (n_out, reason)
    assert s.stats().kv_cache_usage == 0.0


def test_a_request_that_outgrows_the_whole_cache_finishes_with_length():
    s, runner = make(num_blocks=2, block_size=4, max_model_len=100)
    add(s, "a", range(100, 105), max_tokens=None)
    toks, reason = run_all(s, runner)["a"]
    assert (len(toks), reason) == (4, FinishReason.LENGTH)  # 8 KV slots sample the 9th token


def test_finish_requests_for_stop_strings():
    s, runner = make()
    add(s, "a", range(100, 110), max_tokens=10)
    step(s, runner)
    assert s.finish_requests(["a"], FinishReason.STOP) == ["a"]
    r_plan = s.schedule()
    assert r_plan.finished_req_ids == ["a"] and r_plan.num_scheduled_tokens == {}
    assert s.stats().kv_cache_usage == 0.0


def test_add_request_validation():
    s, _ = make(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="empty"):
        add(s, "a", [])
    with pytest.raises(ValueError, match="max_model_len"):
        add(s, "a", range(32))
    with pytest.raises(ValueError, match="KV cache"):
        add(s, "a", range(17))
    add(s, "a", range(16))
    with pytest.raises(ValueError, match="already"):
        add(s, "a", range(3))


def test_failed_step_aborts_its_requests_and_caches_nothing():
    s, runner = make(block_size=4)
    add(s, "a", range(100, 120))
    add(s, "b", range(200, 210))
    plan = s.schedule()
    runner.step(plan)
    outputs = s.update_from_output(plan, StepResult(step_id=plan.step_id, error="CUDA error: boom"))
    assert {(o.req_id, o.finish_reason, o.error) for o in outputs} == {
        ("a", FinishReason.ABORT, "CUDA error: boom"),
        ("b", FinishReason.ABORT, "CUDA error: boom"),
    }
    assert s.stats().kv_cache_usage == 0.0 and s.kv.pool.cached == {}
    assert sorted(s.schedule().finished_req_ids) == ["a", "b"]


def test_prefix_cache_hit_end_to_end_and_stats():
    s, runner = make(block_size=4)
    shared = list(range(500, 516))
    add(s, "a", shared + [1, 2, 3], max_tokens=3)
    step(s, runner)
    b = add(s, "b", shared + [4, 5], max_tokens=3)
    plan, _ = step(s, runner)
    [new] = plan.new_requests
    assert new.num_computed_tokens == 16 and new.block_ids[:4] == [0, 1, 2, 3]
    assert plan.num_scheduled_tokens["b"] == 2
    assert [s.kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 2, 2]
    run_all(s, runner)
    assert b.output_token_ids == expected_tokens(shared + [4, 5], 3) and b.num_cached_tokens == 16
    st = s.stats()
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (19 + 18, 16)
    assert (st.num_running, st.num_waiting, st.kv_cache_usage) == (0, 0, 0.0)


def test_a_request_the_executors_did_not_sample_is_aborted_not_stalled():
    s, runner = make()
    add(s, "a", range(100, 110))
    add(s, "b", range(200, 210))
    plan = s.schedule()
    result = runner.step(plan)
    result.req_ids, result.sampled_token_ids = result.req_ids[:1], result.sampled_token_ids[:1]
    outputs = s.update_from_output(plan, result)
    assert [(o.req_id, o.finish_reason, o.error) for o in outputs] == [
        ("a", None, ""),
        ("b", FinishReason.ABORT, "executor returned no token"),
    ]
    assert s.stats().num_running == 1


def test_a_request_the_runner_deferred_computes_its_last_token_again():
    """No token and no finish for a request due to sample (its grammar still compiling):
    the scheduler computes its last token again next step; nothing is aborted."""
    s, runner = make()
    add(s, "a", range(100, 110), max_tokens=3)
    add(s, "b", range(200, 210), max_tokens=3)
    runner.defer.add("b")
    plan, outputs = step(s, runner)
    first_a = expected_tokens(list(range(100, 110)), 1)
    assert [(o.req_id, o.new_token_ids) for o in outputs] == [("a", first_a)]
    plan = s.schedule()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1}
    assert {c.req_id: c.num_computed_tokens for c in plan.cached_requests} == {"a": 10, "b": 9}
    outputs = s.update_from_output(plan, runner.step(plan))
    out = run_all(s, runner)
    assert out["b"] == (expected_tokens(list(range(200, 210)), 3)[1:], FinishReason.LENGTH)
    assert [o.req_id for o in outputs] == ["a", "b"]
    assert s.stats().kv_cache_usage == 0.0


def test_mismatched_step_result_is_rejected():
    s, runner = make()
    add(s, "a", range(100, 110))
    plan = s.schedule()
    with pytest.raises(ValueError, match="step"):
        s.update_from_output(plan, StepResult(step_id=plan.step_id + 1))
