"""The batching policy: which requests run each step, and how many tokens each.

One token budget per step (`max_num_batched_tokens`) and a cap on running requests
(`max_num_seqs`). RUNNING requests go first, in admission order, each taking
min(tokens left to compute, budget left): a decode takes 1, a request still in
prefill takes its next chunk. Then WAITING requests in arrival order (preempted ones
at the front), each after a prefix-cache lookup. A request simply computes until its
`num_computed_tokens` catches up with its `num_tokens`, so chunked prefill needs no
special case.

If a running request cannot get a block, the most recently admitted running request
is preempted (blocks freed, recomputed later; the prefix cache may spare most of it)
and the allocation retried; a request that is itself the last one preempts itself.

NOTE: `num_computed_tokens` is advanced when a step is *scheduled*; blocks are cached
when it *returns* (`update_from_output`). Steps never overlap: schedule, run, update.

Speculative decoding: a decoding request may carry drafts (`Request.spec_token_ids`,
proposed by the executor with the last step's result). They are scheduled after its
pending token, count against the token budget (cut to fit) and get KV slots like any
token. When the step returns, `num_computed_tokens` is rolled back over the rejected
drafts *before* any block is hashed, so no cached block ever holds a rejected token:

    known: ... t5 | t6 (pending)   drafts d7 d8 d9    scheduled 4, computed += 4
    result: accepted d7, then t8'  ─▶ output ... t6 d7 t8'   computed = num_tokens - 1

With a draft model, `num_lookahead_slots` more slots are reserved for every request that
may sample: the draft writes the KV of its next drafts there right after the step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from services.scheduler.kv_cache_manager import KVCacheManager, cdiv
from services.scheduler.outputs import EngineCoreOutput, SchedulerStats
from services.scheduler.request import Request, RequestStatus
from services.scheduler.spec_stats import SpecDecodeCounters
from shared.protocol import CachedRequestData, FinishReason, NewRequestData, StepPlan, StepResult


class Scheduler:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool,
        num_lookahead_slots: int = 0,
    ) -> None:
        for name, v in (
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.num_lookahead_slots = num_lookahead_slots
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        # Only unfinished requests live here; waiting and running partition them.
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self._known: set[str] = set()  # requests the executors hold state for
        self._finished_ids: list[str] = []  # known requests dropped since the last plan
        self._step_id = 0
        self.num_preemptions = 0
        self.spec = SpecDecodeCounters()

    # ------------------------------------------------------------------ requests in / out
    def add_request(self, req: Request) -> None:
        n = req.num_tokens
        if req.req_id in self.requests:
            raise ValueError(f"request {req.req_id!r} is already scheduled")
        if len(req.prompt_token_ids) == 0:
            raise ValueError(f"request {req.req_id!r}: the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(
                f"request {req.req_id!r}: the prompt has {n} tokens, but max_model_len is "
                f"{self.max_model_len} (the prompt must leave room for at least one new token)"
            )
        if cdiv(n, self.block_size) > self.kv.num_blocks:
            raise ValueError(
                f"request {req.req_id!r}: the prompt has {n} tokens, more than the KV cache can ever "
                f"hold ({self.kv.num_blocks} blocks of {self.block_size} tokens)"
            )
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def get_request(self, req_id: str) -> Request | None:
        return self.requests.get(req_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def abort_requests(self, req_ids: Iterable[str]) -> list[str]:
        """Abort requests in any state and free their blocks now; unknown ids are ignored."""
        return self.finish_requests(req_ids, FinishReason.ABORT)

    def finish_requests(self, req_ids: Iterable[str], reason: FinishReason) -> list[str]:
        """Finish requests from outside (stop strings, aborts); returns the ids that were live."""
        done = []
        for req_id in req_ids:
            req = self.requests.get(req_id)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, reason)
            done.append(req_id)
        return done

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            spec_decode=self.spec.snapshot(),
        )

    # ------------------------------------------------------------------ one step
    def schedule(self) -> StepPlan:
        """Plan the next step.

        Send every plan with scheduled tokens *or* `finished_req_ids` to the executors:
        the finished ids are reported once. Executors apply `finished_req_ids` before
        `new_requests` (a preempted request comes back later as new).
        """
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        cached: list[CachedRequestData] = []
        new: list[NewRequestData] = []
        spec_tokens: dict[str, list[int]] = {}
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:  # defensive: update_from_output aborts a request that got no token
                i += 1
                continue
            # Drafts ride only on a decode (one pending token), as many as the budget allows.
            drafts = req.spec_token_ids[: budget - n] if n == 1 else []
            req.spec_token_ids = []
            n += len(drafts)
            lookahead = self._lookahead(req.num_computed_tokens, n)
            block_ids = self.kv.allocate_slots(req, n, num_lookahead_tokens=lookahead)
            while block_ids is None:
                # Victims come from the back, so none of them was scheduled in this step.
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                block_ids = self.kv.allocate_slots(req, n, num_lookahead_tokens=lookahead)
            if block_ids is None:
                break  # req preempted itself: it was the last running request
            cached.append(
                CachedRequestData(
                    req_id=req.req_id, new_block_ids=block_ids, num_computed_tokens=req.num_computed_tokens
                )
            )
            num_scheduled[req.req_id] = n
            if drafts:
                spec_tokens[req.req_id] = drafts
            req.num_computed_tokens += n
            budget -= n
            i += 1

        # Admitting right after preempting would only thrash: wait for blocks to free up.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - num_hit, budget)
            lookahead = self._lookahead(num_hit, n)
            block_ids = self.kv.allocate_slots(req, n, hits, num_lookahead_tokens=lookahead)
            if block_ids is None:
                break  # strict arrival order: later requests wait too
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_hit
            self.running.append(req)
            self._known.add(req.req_id)
            new.append(
                NewRequestData(
                    req_id=req.req_id,
                    prompt_token_ids=req.prompt_token_ids,
                    sampling_params=req.sampling_params,
                    block_ids=block_ids,
                    num_computed_tokens=num_hit,
                    output_token_ids=list(req.output_token_ids),
                    reply_to=req.reply_to,
                    traceparent=req.traceparent,
                )
            )
            num_scheduled[req.req_id] = n
            req.num_computed_tokens += n
            budget -= n

        self._step_id += 1
        plan = StepPlan(
            step_id=self._step_id,
            new_requests=new,
            cached_requests=cached,
            num_scheduled_tokens=num_scheduled,
            finished_req_ids=self._finished_ids,
            total_num_scheduled_tokens=self.max_num_batched_tokens - budget,
            scheduled_spec_tokens=spec_tokens,
        )
        self._finished_ids = []
        return plan

    def update_from_output(self, plan: StepPlan, result: StepResult) -> list[EngineCoreOutput]:
        """Apply a step's sampled tokens; finish requests that stopped.

        Requests aborted or finished between `schedule` and here are ignored. A request
        that was due to sample but got no token is aborted with an error output.
        """
        if result.step_id != plan.step_id:
            raise ValueError(f"result of step {result.step_id} given for plan {plan.step_id}")
        live = [r for rid in plan.num_scheduled_tokens if (r := self.requests.get(rid)) is not None]
        live = [r for r in live if r.status == RequestStatus.RUNNING]
        if result.error:
            # The step's KV is untrusted: finish its requests without caching their blocks.
            outputs = [self._output(r, [], [], FinishReason.ABORT, result.error) for r in live]
            self.finish_requests([r.req_id for r in live], FinishReason.ABORT)
            return outputs

        outputs = []
        finished: list[tuple[Request, FinishReason]] = []
        sampled: set[str] = set()
        for i, req_id in enumerate(result.req_ids):
            req = self.requests.get(req_id)
            drafts = plan.scheduled_spec_tokens.get(req_id, ())
            # Only a request whose step reached the end of its known tokens may sample.
            if (
                req is None
                or req.status != RequestStatus.RUNNING
                or req_id not in plan.num_scheduled_tokens
                or req.num_computed_tokens - len(drafts) != req.num_tokens
            ):
                continue
            tokens = result.sampled_token_ids[i]
            logprobs = result.logprobs[i] if i < len(result.logprobs) else []
            # The runner decided where the request ends (and cut its tokens there).
            code = result.finish_reasons[i] if i < len(result.finish_reasons) else 0
            reason = FinishReason(code) if code else None
            req.output_token_ids.extend(tokens)
            sampled.add(req_id)
            deferred = not tokens and reason is None
            if drafts or deferred:
                # Roll back over the rejected drafts before any block is cached below; a
                # request the runner deferred (its grammar still compiling) computes its
                # last token again next step.
                req.num_computed_tokens = req.num_tokens - 1
            if drafts:
                accepted = result.num_accepted[i] if i < len(result.num_accepted) else 0
                self.spec.record(len(drafts), accepted)
            if deferred:
                req.spec_token_ids = []
                continue
            if i < len(result.draft_token_ids):
                req.spec_token_ids = list(result.draft_token_ids[i])
            streamed = reason is not None
            if reason is None and req.num_tokens > self.kv.num_blocks * self.block_size:
                # The next token could never be computed: the whole cache is too small for it.
                # Only the scheduler knows the cache, so this finish is its own to report.
                reason = FinishReason.LENGTH
            outputs.append(self._output(req, tokens, logprobs, reason, streamed=streamed))
            if reason is not None:
                finished.append((req, reason))
        for req in live:
            drafts = plan.scheduled_spec_tokens.get(req.req_id, ())
            if req.req_id not in sampled and req.num_computed_tokens - len(drafts) == req.num_tokens:
                # It was due to sample and got nothing: fail it loudly rather than stall forever
                # (and cache nothing: its unverified drafts are counted as computed).
                outputs.append(self._output(req, [], [], FinishReason.ABORT, "executor returned no token"))
                finished.append((req, FinishReason.ABORT))
            else:
                self.kv.cache_blocks(req, req.num_computed_tokens)
        for req, reason in finished:
            self._finish(req, reason)
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
        return outputs

    # ------------------------------------------------------------------ internals
    def _output(
        self,
        req: Request,
        tokens: list[int],
        logprobs: list,
        reason: FinishReason | None,
        error: str = "",
        streamed: bool = False,
    ) -> EngineCoreOutput:
        return EngineCoreOutput(
            req.req_id,
            list(tokens),
            list(logprobs),
            reason,
            req.num_prompt_tokens,
            req.num_cached_tokens,
            error,
            req,
            streamed,
        )

    def _lookahead(self, num_computed: int, num_new: int) -> int:
        """Slots reserved past a step's tokens for a draft model's next drafts, never past
        max_model_len (the proposer caps its drafts there too)."""
        room = self.max_model_len - (num_computed + num_new)
        return max(0, min(self.num_lookahead_slots, room))

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        self._forget(req.req_id)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        """Free a request already taken out of `running` / `waiting` (or about to be)."""
        self.kv.free(req)
        req.status = RequestStatus.finished(reason)
        req.finish_reason = reason
        del self.requests[req.req_id]
        self._forget(req.req_id)

    def _forget(self, req_id: str) -> None:
        if req_id in self._known:
            self._known.discard(req_id)
            self._finished_ids.append(req_id)
