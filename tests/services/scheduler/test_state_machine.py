"""Random add / step / abort / finish sequences against the scheduler and its block pool.

Small caches, random block sizes and prompts that share prefixes, so preemption,
prefix hits, lazy eviction and chunked prefill all happen often. The fake runner
checks the plan contract and that every request reads back its own tokens from the KV
cache; the invariants here check the block accounting after every rule.
"""

from collections import Counter

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.scheduler.kv_cache_manager import cdiv
from services.scheduler.request import Request, RequestStatus
from services.scheduler.scheduler import Scheduler
from shared.protocol import FinishReason
from shared.sampling_params import SamplingParams
from tests.services.scheduler.fake_runner import FIRST_TOKEN, FakeRunner

EOS = 2
BASES = [list(range(100, 140)), list(range(300, 340))]  # prompts start with a prefix of one of these


def expected_output(prompt: list[int], n: int, forced: dict[int, int], vocab_size: int = 1000) -> list[int]:
    seq = list(prompt)
    for k in range(n):
        tok = forced.get(k)
        if tok is None:
            tok = FIRST_TOKEN + sum((i + 1) * t for i, t in enumerate(seq)) % (vocab_size - FIRST_TOKEN)
        seq.append(tok)
    return seq[len(prompt) :]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 3, 4, 8]),
        num_blocks=st.integers(2, 12),
        budget=st.integers(1, 24),
        max_num_seqs=st.integers(1, 4),
        caching=st.booleans(),
        extra_len=st.integers(-4, 8),
    )
    def setup(self, block_size, num_blocks, budget, max_num_seqs, caching, extra_len):
        # max_model_len is sometimes beyond what the cache holds: requests then end at the cache's size.
        self.max_model_len = max(2, num_blocks * block_size + extra_len)
        self.s = Scheduler(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=self.max_model_len,
            enable_prefix_caching=caching,
        )
        self.runner = FakeRunner(block_size, num_blocks, frozenset([EOS]), self.max_model_len)
        self.all: dict[str, Request] = {}
        self.externally_finished: set[str] = set()
        self.next_id = 0

    @rule(
        base=st.sampled_from(range(len(BASES))),
        prefix_len=st.integers(0, 24),
        suffix_len=st.integers(0, 4),
        max_tokens=st.one_of(st.none(), st.integers(1, 16)),
        eos_at=st.one_of(st.none(), st.integers(0, 10)),
        copies=st.integers(1, 3),
    )
    def add(self, base, prefix_len, suffix_len, max_tokens, eos_at, copies):
        for _ in range(copies):  # copies share their prefix: hits once the first one is computed
            self._add(BASES[base][:prefix_len], suffix_len, max_tokens, eos_at)

    def _add(self, prefix, suffix_len, max_tokens, eos_at):
        rid = f"r{self.next_id}"
        self.next_id += 1
        prompt = prefix + [1000 + self.next_id * 10 + j for j in range(suffix_len)]
        req = Request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        if eos_at is not None:
            self.runner.forced[rid] = {eos_at: EOS}
        try:
            self.s.add_request(req)
        except ValueError:
            s = self.s
            assert (
                not prompt
                or len(prompt) >= self.max_model_len
                or (cdiv(len(prompt), s.block_size) > s.kv.num_blocks)
            )
            return
        self.all[rid] = req

    @rule(num_steps=st.integers(1, 4), abort_in_flight=st.integers(0, 3), data=st.data())
    def steps(self, num_steps, abort_in_flight, data):
        for i in range(num_steps):
            self.step(abort_in_flight=abort_in_flight == 0 and i == 0, data=data)

    def step(self, abort_in_flight, data):
        plan = self.s.schedule()
        result = self.runner.step(plan)
        if abort_in_flight and plan.num_scheduled_tokens:
            rid = data.draw(st.sampled_from(sorted(plan.num_scheduled_tokens)))
            self.s.abort_requests([rid])
            self.externally_finished.add(rid)
        for out in self.s.update_from_output(plan, result):
            assert out.req_id not in self.externally_finished
            if out.finished:
                self._check_finished(self.all[out.req_id])

    @precondition(lambda self: bool(self.s.requests))
    @rule(data=st.data(), reason=st.sampled_from([FinishReason.ABORT, FinishReason.STOP]))
    def finish_one(self, data, reason):
        rid = data.draw(st.sampled_from(sorted(self.s.requests)))
        assert self.s.finish_requests([rid], reason) == [rid]
        assert self.all[rid].status == RequestStatus.finished(reason)
        self.externally_finished.add(rid)

    @rule(often=st.integers(0, 3))
    def abort_all(self, often):
        if often:  # draining wipes the state the other rules build up: do it now and then
            return
        ids = sorted(self.s.requests)
        assert sorted(self.s.abort_requests(ids)) == ids
        self.externally_finished.update(ids)
        self._assert_drained()

    @rule(often=st.integers(0, 3))
    def drain(self, often):
        if not often:
            self.run_to_completion()

    def run_to_completion(self):
        for _ in range(5000):
            if not self.s.has_unfinished_requests():
                break
            self.step(abort_in_flight=False, data=None)
        self._assert_drained()

    def _check_finished(self, req: Request) -> None:
        forced = self.runner.forced.get(req.req_id, {})
        assert req.output_token_ids == expected_output(req.prompt_token_ids, req.num_output_tokens, forced)
        n = req.num_output_tokens
        limits = [
            self.max_model_len - req.num_prompt_tokens,
            self.s.kv.num_blocks * self.s.block_size + 1 - req.num_prompt_tokens,
        ]
        if req.sampling_params.max_tokens is not None:
            limits.append(req.sampling_params.max_tokens)
        if req.finish_reason == FinishReason.STOP:
            assert req.output_token_ids[-1] == EOS and n <= min(limits)
        else:
            assert req.finish_reason == FinishReason.LENGTH and n == min(limits)

    def _assert_drained(self) -> None:
        assert not self.s.has_unfinished_requests()
        assert self.s.stats().kv_cache_usage == 0.0
        assert len(self.s.kv.pool.free_queue) == self.s.kv.num_blocks

    @invariant()
    def blocks_are_accounted_for(self):
        s = self.s
        pool = s.kv.pool
        held = Counter()
        for rid, blocks in s.kv.req_to_blocks.items():
            req = s.requests[rid]
            assert req.status == RequestStatus.RUNNING
            ids = [b.block_id for b in blocks]
            assert len(set(ids)) == len(ids), f"{rid} holds a block twice"
            assert len(blocks) * s.block_size >= req.num_computed_tokens
            held.update(ids)
        assert {r.req_id for r in s.running} == set(s.kv.req_to_blocks)
        for b in pool.blocks:
            assert b.ref_cnt == held[b.block_id], (
                f"block {b.block_id}: ref {b.ref_cnt}, held {held[b.block_id]}"
            )
            if b.ref_cnt > 1:
                assert b.block_hash is not None, f"block {b.block_id} shared but not prefix-cached"
        assert sorted(pool.free_queue.block_ids()) == [b.block_id for b in pool.blocks if b.ref_cnt == 0]
        assert sum(b.ref_cnt for b in pool.blocks) == sum(held.values())
        for h, b in pool.cached.items():
            assert b.block_hash == h
        assert s.stats().kv_cache_usage == 1 - len(pool.free_queue) / pool.num_blocks

    @invariant()
    def queues_partition_the_live_requests(self):
        s = self.s
        assert len(s.running) <= s.max_num_seqs
        assert sorted([r.req_id for r in s.running] + [r.req_id for r in s.waiting]) == sorted(s.requests)
        for r in s.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and r.num_computed_tokens == 0
        for r in s.running:
            assert r.num_computed_tokens <= r.num_tokens

    def teardown(self):
        if hasattr(self, "s"):
            self.run_to_completion()


SchedulerMachine.TestCase.settings = settings(max_examples=75, stateful_step_count=50, deadline=None)
TestScheduler = SchedulerMachine.TestCase
