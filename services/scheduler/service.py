"""The scheduler service: one engine's batching loop over Redis.

    wait for executor ranks ──▶ register engine ──▶ loop:
        claim requests (block only when idle) → apply aborts → schedule
        → [XADD step, claim more, XREAD result]: one pipelined round trip
        → update → XACK finished requests → publish stats

The executors stream tokens straight to the gateways and decide token-level finishes
(reported in the step result, applied here, never re-derived). This service only speaks
to a gateway for what executors cannot know: a rejected or malformed request, a failed
step, a request whose cache can never hold its next token. It is on the critical path of
every token: while busy, a step is one pipelined Redis round trip (XADD the plan, claim
new requests, block for the result), plus an XACK/XDEL when requests finish.

Requests survive an engine failure. A request stays pending in the requests stream
(under this engine's consumer name) until it finishes. When the executors fail (a rank
stops heartbeating, a step outlasts --step-timeout), this service drops its in-memory
state without failing anything, unregisters the engine and waits for its ranks again;
any live engine, this one once whole again included, takes over the pending requests of
an engine whose heartbeat expired (XCLAIM, exclusive) and resumes each from the dead
engine's token log (see resume.py): prompt plus generated tokens are prefilled again
(prefix caching makes that cheap) and the stream goes on at the next index.

A Redis outage (restart, lost connection) drops the in-memory state the same way; the
service reconnects with backoff (`Bus.wait_for_redis`), recreates the consumer group and
builds the engine again once its ranks re-register (each beat re-registers, so a Redis
that restarted empty learns the engine and its ranks within a second).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import defaultdict

from services.scheduler.outputs import EngineCoreOutput
from services.scheduler.request import Request
from services.scheduler.resume import carries
from services.scheduler.scheduler import Scheduler
from shared.bus import SCHEDULER_GROUP, Bus, Malformed, is_outage
from shared.config import EngineConfig
from shared.gc_heap import freeze_startup_heap
from shared.metric_buckets import Histograms
from shared.protocol import (
    EngineInfo,
    EngineStats,
    FinishReason,
    GenerateRequest,
    RequestHeader,
    StepHeader,
    StepPlan,
    StepResult,
    TokenBatch,
    TokenDelta,
)
from shared.telemetry import Event, GenAI, RequestSpans

log = logging.getLogger("folio.scheduler")

IDLE_BLOCK_MS = 100  # how long an idle scheduler blocks on the request stream
RESULT_POLL_MS = 500  # how often a scheduler waiting for a result checks executor heartbeats
STATS_INTERVAL_S = 0.5
ENGINE_TTL_S = 5.0
HEARTBEAT_INTERVAL_S = 1.0
UNKNOWN_ABORT_TTL_S = 60.0  # remember aborts of not-yet-claimed requests this long
RESCUE_INTERVAL_S = 1.0  # how often to look for requests of dead engines
# XCLAIM only entries idle this long: a claim resets idle time, so two engines taking over
# the same dead engine's requests never both get one.
TAKEOVER_MIN_IDLE_MS = 2000


class ExecutorLost(RuntimeError):
    pass


class SchedulerService:
    def __init__(self, bus: Bus, engine_id: str, config: EngineConfig, spans: RequestSpans | None = None):
        self.bus = bus
        self.engine_id = engine_id
        self.config = config
        self.tp_size = config.tensor_parallel_size
        self.spans = spans or RequestSpans(None, "folio-scheduler", "folio.scheduler.request")
        self.stopping = asyncio.Event()
        self.scheduler: Scheduler | None = None
        self.info: EngineInfo | None = None
        self._incarnations: list[str] = []  # of the executor ranks this engine was built on
        self.step_timeout_s = config.resolved_step_timeout()
        self._aborts: set[str] = set()
        self._unknown_aborts: dict[str, float] = {}  # aborted before we claimed them
        self._result_id: bytes = b"0-0"
        self._step_id = 0
        self._last_stats = 0.0
        self._last_rescue = 0.0
        self._silent: set[str] = set()  # reply channels with no subscriber at the last check
        self.histograms = Histograms()  # request phases and step sizes, published in EngineStats
        self._drain_deadline: float | None = None  # set by the first SIGTERM while serving

    def request_stop(self) -> None:
        """First call while serving: drain (claim nothing new, let the requests held finish,
        up to --shutdown-timeout; the rest are then failed by _shutdown). Unclaimed requests stay
        in the stream for other engines. Otherwise, or on a second call: stop now."""
        timeout = self.config.shutdown_timeout
        if self._drain_deadline is not None or self.scheduler is None or timeout <= 0:
            self.stopping.set()
            return
        self._drain_deadline = time.monotonic() + timeout
        log.info("engine %s draining: %d request(s) held, up to %gs", self.engine_id,
                 len(self.scheduler.requests), timeout)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        aborts = asyncio.create_task(self._collect_aborts())
        try:
            while not self.stopping.is_set():
                try:
                    await self._run_engine()
                except Exception as e:
                    if not is_outage(e):
                        raise
                    # Redis went away (or came back empty): nothing this process holds can be
                    # trusted any more. Requests are not failed here: the gateways fail theirs
                    # when their subscription breaks, and a Redis that kept its data still has
                    # them pending under this engine's name, to be resumed once it is back.
                    held = len(self.scheduler.requests) if self.scheduler else 0
                    log.error("engine %s lost Redis (%s: %s); dropping %d request(s), reconnecting",
                              self.engine_id, type(e).__name__, e, held)
                    self._drop_state()
                    if not await self.bus.wait_for_redis(self.stopping.is_set, f"scheduler {self.engine_id}"):
                        break
        finally:
            aborts.cancel()
            await self._shutdown()

    async def _run_engine(self) -> None:
        """Build the engine on its executor ranks and serve; again after an executor failure."""
        await self.bus.ensure_group()
        while not self.stopping.is_set():
            infos = await self._wait_for_executors()
            if infos is None:
                break
            self._build(infos)
            assert self.info is not None
            # Stats first: whoever sees the engine alive (a gateway's /health, /metrics) then
            # also finds its stats, rather than no engine series until the first idle round.
            await self._publish_stats(force=True)
            await self.bus.register_engine(self.info, ENGINE_TTL_S)
            beat = asyncio.create_task(self._heartbeat())
            try:
                await self._serve()
            except ExecutorLost as e:
                # Nothing is failed: the requests stay pending under this engine's name,
                # for another engine (or this one, once whole) to resume.
                held = len(self.scheduler.requests) if self.scheduler else 0
                log.error("%s; engine %s is down, %d request(s) left to be resumed",
                          e, self.engine_id, held)
                self._drop_state()
            finally:
                beat.cancel()
                try:
                    await self.bus.unregister_engine(self.engine_id)
                except Exception as e:  # Redis is gone: its heartbeat key expires on its own
                    if not is_outage(e):
                        raise

    async def _shutdown(self) -> None:
        try:
            if self.scheduler is not None and self.scheduler.requests:
                await self._fail_all("the engine is shutting down")
            self._step_id += 1
            await self.bus.send_step(self.engine_id, StepPlan(step_id=self._step_id, shutdown=True))
            await self.bus.unregister_engine(self.engine_id)
        except Exception as e:  # Redis is gone: nothing left to tell anyone
            log.warning("incomplete shutdown: %s", e)
        self.spans.end_all("shutdown")
        log.info("scheduler %s stopped", self.engine_id)

    async def _wait_for_executors(self) -> list[EngineInfo] | None:
        """All tp ranks' EngineInfo, or None if asked to stop first."""
        want = list(range(self.tp_size))
        last_log = time.monotonic()
        while not self.stopping.is_set():
            infos = await self.bus.live_ranks(self.engine_id)
            if [i.tp_rank for i in infos if i.tp_rank < self.tp_size] == want:
                return infos[: self.tp_size]
            if time.monotonic() - last_log > 10:
                log.info("engine %s: waiting for executor ranks %s (have %s)", self.engine_id, want,
                         [i.tp_rank for i in infos])
                last_log = time.monotonic()
            try:
                await asyncio.wait_for(self.stopping.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        return None

    def _build(self, infos: list[EngineInfo]) -> None:
        rank0 = infos[0]
        self._incarnations = [i.incarnation for i in infos]
        num_blocks = min(i.num_blocks for i in infos)
        max_model_len = min(i.max_model_len for i in infos)
        if rank0.block_size != self.config.block_size:
            log.warning("executors use block_size %d (scheduler flag says %d): using theirs",
                        rank0.block_size, self.config.block_size)
        budget = rank0.max_num_batched_tokens or self.config.resolved_max_num_batched_tokens(on_gpu=False)
        self.scheduler = Scheduler(
            num_blocks=num_blocks,
            block_size=rank0.block_size,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            enable_prefix_caching=self.config.enable_prefix_caching,
            num_lookahead_slots=self.config.num_lookahead_slots(),
        )
        self.info = EngineInfo(
            engine_id=self.engine_id,
            num_blocks=num_blocks,
            block_size=rank0.block_size,
            max_model_len=max_model_len,
            model_name=rank0.model_name,
            tp_size=self.tp_size,
            max_num_batched_tokens=budget,
        )
        self._last_stats = 0.0
        self._last_rescue = 0.0
        freeze_startup_heap()
        log.info("engine %s ready: %d KV blocks of %d tokens, max_model_len %d, %d tokens per step",
                 self.engine_id, num_blocks, rank0.block_size, max_model_len, budget)

    async def _heartbeat(self) -> None:
        assert self.info is not None
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                # The registration with the beat: a Redis restarted empty lists the engine again.
                await self.bus.register_engine(self.info, ENGINE_TTL_S)
            except Exception as e:  # a Redis hiccup must not kill the engine; the next beat retries
                log.warning("heartbeat failed: %s", e)

    async def _collect_aborts(self) -> None:
        while True:
            try:
                async for msg in self.bus.aborts():
                    self._aborts.update(msg.req_ids)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("abort subscription failed (%s); resubscribing", e)
                await asyncio.sleep(0.1)  # at least: a bug that fails every time must not spin
                await self.bus.wait_for_redis(self.stopping.is_set, f"scheduler {self.engine_id} aborts")

    def _drop_state(self) -> None:
        """Forget every request (their stream entries stay pending) and the KV cache view."""
        if self.scheduler is not None:
            for req_id in self.scheduler.requests:
                self.spans.end(req_id, error="engine failed; request left to be resumed")
        self.scheduler = None

    # ------------------------------------------------------------------ the loop
    async def _serve(self) -> None:
        sched = self.scheduler
        assert sched is not None
        self._result_id = await self.bus.stream_tail_id(self.bus.keys.results(self.engine_id))
        flush = False  # finished ids the executors have not been told about yet
        stalled = False
        while not self.stopping.is_set():
            if self._drain_deadline is not None and (
                    not sched.has_unfinished_requests() or time.monotonic() > self._drain_deadline):
                self.stopping.set()
                break
            if self._drain_deadline is None:  # a draining engine takes over nobody's requests
                await self._rescue()
            busy = sched.has_unfinished_requests()
            if not busy or stalled:
                # While busy, requests are claimed during each step instead (no extra round trip).
                await self._claim(block_ms=IDLE_BLOCK_MS)
            flush |= await self._apply_aborts()
            if not sched.has_unfinished_requests() and not flush:
                if await self._publish_stats(force=busy):  # busy → idle: KV usage back to baseline now
                    await self._check_executors("while idle")
                continue
            preemptions = sched.num_preemptions
            plan = sched.schedule()
            self._note_scheduled(plan, sched.num_preemptions - preemptions)
            flush = False
            stalled = plan.total_num_scheduled_tokens == 0
            if stalled and not plan.finished_req_ids:
                continue
            # One round trip: the plan goes out, new requests are claimed while the executors
            # compute, and the result comes back.
            sent_at = time.monotonic()
            room = self._room()
            claimed, got = await self.bus.send_step_and_read_result(
                self.engine_id, plan, self._result_id, RESULT_POLL_MS,
                claim=(self.engine_id, room) if room > 0 else None)
            await self._admit(claimed)
            result = await self._wait_result(plan, got, sent_at)
            outputs = sched.update_from_output(plan, result)
            self._note_first_tokens(outputs)
            await self._finish(outputs)
            await self._publish_stats(force=not sched.has_unfinished_requests())

    async def _wait_result(
        self, plan: StepPlan, got: tuple[bytes, StepResult | Malformed] | None, sent_at: float
    ) -> StepResult:
        while True:
            if got is None:
                await self._check_executors(f"during step {plan.step_id}")
                if time.monotonic() - sent_at > self.step_timeout_s:
                    raise ExecutorLost(f"step {plan.step_id} took longer than --step-timeout "
                                       f"{self.step_timeout_s:g}s")
            else:
                self._result_id, result = got
                if isinstance(result, Malformed):
                    # One that names this step answers it; one that names nothing is skipped
                    # (if it was the real result, the step timeout ends the wait).
                    header = result.header(StepHeader)
                    if header is not None and header.step_id == plan.step_id:
                        error = f"malformed step result: {result.error}"
                        return StepResult(step_id=plan.step_id, error=error)
                elif result.step_id == plan.step_id:
                    if result.error:
                        log.error("step %d failed on the executors: %s", plan.step_id, result.error)
                    return result
                else:
                    log.warning("skipping result of step %d while waiting for %d",
                                result.step_id, plan.step_id)
            got = await self.bus.read_result(self.engine_id, self._result_id, block_ms=RESULT_POLL_MS)

    async def _check_executors(self, when: str) -> None:
        lost = await self.bus.lost_ranks(self.engine_id, self._incarnations)
        if lost:
            raise ExecutorLost(f"engine {self.engine_id}: executor rank(s) {lost} stopped "
                               f"heartbeating or restarted {when}")

    # ------------------------------------------------------------------ requests in
    def _room(self) -> int:
        """How many requests to claim: what this engine can run now. The rest stay in the
        shared stream for an engine replica with room (or for this one, a step later)."""
        sched = self.scheduler
        assert sched is not None
        if self._drain_deadline is not None:
            return 0  # draining: new requests are for other engines (or a restarted one)
        return sched.max_num_seqs - len(sched.requests)

    async def _claim(self, block_ms: int) -> None:
        room = self._room()
        if room <= 0:
            await asyncio.sleep(block_ms / 1000)
            return
        await self._admit(await self.bus.claim_requests(self.engine_id, count=room, block_ms=block_ms))

    async def _rescue(self) -> None:
        """At most once a second: take over the unfinished requests of engines whose
        heartbeat expired, and this engine's own from before a restart or an executor
        failure; abort the requests of gateways that are gone."""
        now = time.monotonic()
        if now - self._last_rescue < RESCUE_INTERVAL_S:
            return
        self._last_rescue = now
        sched = self.scheduler
        assert sched is not None
        held = {r.stream_id for r in sched.requests.values()}
        for owner in [self.engine_id, *await self.bus.dead_consumers()]:
            # Its own live requests are pending under its name too: leave those alone.
            taken = await self.bus.take_over(owner, self.engine_id, TAKEOVER_MIN_IDLE_MS, exclude=held)
            if taken:
                log.warning("engine %s: resuming %d request(s) of %s", self.engine_id, len(taken),
                            "its previous run" if owner == self.engine_id else f"dead engine {owner}")
                await self._admit(taken, resumed_from=owner)
            if owner != self.engine_id:
                await self.bus.forget_engine(owner)  # once all it held is taken, its log is garbage
        if not sched.requests:
            await self.bus.trim_idle_log(self.engine_id)
        await self._abort_orphans()

    async def _abort_orphans(self) -> None:
        """Abort requests whose gateway is gone (killed: it could not say so): their reply
        channel has had no subscriber at two checks in a row. A restarted gateway listens on
        a channel of its own, so nobody would ever read their tokens."""
        sched = self.scheduler
        assert sched is not None
        channels = {r.reply_to for r in sched.requests.values() if r.reply_to}
        silent = {ch for ch, n in (await self.bus.subscribers(sorted(channels))).items() if n == 0}
        gone, self._silent = silent & self._silent, silent
        if gone:
            ids = [r.req_id for r in sched.requests.values() if r.reply_to in gone]
            log.warning("aborting %d request(s) of gone gateway(s) %s", len(ids), sorted(gone))
            self._aborts.update(ids)

    async def _admit(
        self, claimed: list[tuple[bytes, GenerateRequest | Malformed]], resumed_from: str = ""
    ) -> None:
        if not claimed:
            return
        sched = self.scheduler
        assert sched is not None
        replies: dict[str, list[TokenDelta]] = defaultdict(list)
        acks: list[bytes] = []
        admitted: list[Request] = []
        for msg_id, msg in claimed:
            if isinstance(msg, Malformed):
                acks.append(msg_id)
                header = msg.header(RequestHeader)
                if header is not None and header.reply_to:
                    replies[header.reply_to].append(_error_delta(header.req_id, "malformed request", 0))
                continue
            if self._unknown_aborts.pop(msg.req_id, None) is not None:
                acks.append(msg_id)
                continue
            try:
                req = Request.from_generate_request(msg, msg_id)
                sched.add_request(req)
            except ValueError as e:
                acks.append(msg_id)
                replies[msg.reply_to].append(_error_delta(msg.req_id, str(e), len(msg.prompt_token_ids)))
                continue
            admitted.append(req)
            if self.spans.enabled:
                p = req.sampling_params
                self.spans.start(req.req_id, req.traceparent, {
                    GenAI.REQUEST_MAX_TOKENS: p.max_tokens or 0,
                    GenAI.REQUEST_TEMPERATURE: p.temperature,
                    GenAI.REQUEST_TOP_P: p.top_p,
                    GenAI.USAGE_INPUT_TOKENS: req.num_prompt_tokens,
                }, start_time=req.arrival_time)
                self.spans.event(req.req_id, Event.QUEUED)
        if resumed_from and admitted:
            await self._resume(admitted, resumed_from)
        await self._reply(replies)
        await self.bus.retire_requests(*acks)

    async def _resume(self, reqs: list[Request], owner: str) -> None:
        """Give taken-over requests what they generated before, from the owner's token log;
        log it again here (this engine may fail too) and publish it (fills any gap a gateway
        has; it drops indices it already sent). A request that had already finished is
        finished again, without computing anything."""
        sched = self.scheduler
        assert sched is not None
        found = carries(await self.bus.read_token_log(owner), {r.req_id for r in reqs})
        batches: dict[str, list[TokenDelta]] = defaultdict(list)
        done: list[Request] = []
        for req in reqs:
            carry = found.get(req.req_id)
            if carry is None:
                continue  # nothing was generated yet: it simply starts
            req.output_token_ids = list(carry.token_ids)
            batches[req.reply_to].append(carry.delta(req.req_id))
            if carry.finish_reason:
                done.append(req)
        if batches:
            await self.bus.log_and_publish(self.engine_id, {
                ch: TokenBatch(deltas=d, engine_id=self.engine_id) for ch, d in batches.items()})
        if done:
            sched.abort_requests([r.req_id for r in done])
            await self.bus.retire_requests(*(r.stream_id for r in done))

    async def _apply_aborts(self) -> bool:
        """Abort what the gateways asked for; True if some request was live."""
        if not self._aborts:
            return False
        sched = self.scheduler
        assert sched is not None
        ids, self._aborts = self._aborts, set()
        stream_ids = {rid: r.stream_id for rid in ids if (r := sched.get_request(rid)) is not None}
        done = sched.abort_requests(ids)
        for req_id in done:
            self.spans.event(req_id, Event.FINISHED)
            self.spans.end(req_id, {GenAI.RESPONSE_FINISH_REASONS: ["abort"]})
        await self._retire([stream_ids[r] for r in done])
        now = time.monotonic()
        for req_id in ids.difference(done):
            self._unknown_aborts[req_id] = now
        while self._unknown_aborts:
            oldest = next(iter(self._unknown_aborts))
            if now - self._unknown_aborts[oldest] < UNKNOWN_ABORT_TTL_S:
                break
            del self._unknown_aborts[oldest]
        return bool(done)

    # ------------------------------------------------------------------ requests out
    async def _finish(self, outputs: list[EngineCoreOutput]) -> None:
        acks: list[bytes] = []
        replies: dict[str, list[TokenDelta]] = defaultdict(list)
        for o in outputs:
            req = o.request
            if o.finish_reason is None or req is None:
                continue
            acks.append(req.stream_id)
            if o.error:
                replies[req.reply_to].append(_error_delta(o.req_id, o.error, o.num_prompt_tokens))
            elif not o.streamed:
                # A finish the executors could not see (the KV cache can never hold the next
                # token): the scheduler decided it, so the scheduler says it.
                replies[req.reply_to].append(TokenDelta(req_id=o.req_id, token_ids=[],
                                                        index=req.num_output_tokens,
                                                        finish_reason=int(o.finish_reason),
                                                        num_prompt_tokens=o.num_prompt_tokens))
            self._note_finished(req)
            if self.spans.enabled:
                now = time.time()
                self.spans.event(o.req_id, Event.FINISHED, now)
                self.spans.end(o.req_id, {
                    GenAI.USAGE_OUTPUT_TOKENS: req.num_output_tokens,
                    GenAI.RESPONSE_FINISH_REASONS: [o.finish_reason.openai],
                    GenAI.LATENCY_E2E: now - req.arrival_time,
                }, error=o.error)
        if replies:
            await self._reply(replies)
        await self._retire(acks)

    async def _retire(self, stream_ids: list[bytes]) -> None:
        """Acknowledge finished requests and trim this engine's token log to what the
        unfinished ones may still need (their tokens were all logged after their entry)."""
        if not stream_ids:
            return
        sched = self.scheduler
        live = [r.stream_id for r in sched.requests.values()] if sched is not None else []
        await self.bus.retire_requests(*stream_ids, engine_id=self.engine_id,
                                       log_min_id=min(live, key=_stream_order) if live else None)

    async def _fail_all(self, error: str) -> None:
        sched = self.scheduler
        assert sched is not None
        replies: dict[str, list[TokenDelta]] = defaultdict(list)
        reqs = list(sched.requests.values())
        sched.abort_requests([r.req_id for r in reqs])
        for req in reqs:
            replies[req.reply_to].append(_error_delta(req.req_id, error, req.num_prompt_tokens))
            self.spans.end(req.req_id, error=error)
        await self._reply(replies)
        await self._retire([r.stream_id for r in reqs])

    async def _reply(self, replies: dict[str, list[TokenDelta]]) -> None:
        for channel, deltas in replies.items():
            if channel:
                await self.bus.publish_tokens(channel, TokenBatch(deltas=deltas, engine_id=self.engine_id))

    async def _publish_stats(self, force: bool = False) -> bool:
        """Publish at most every STATS_INTERVAL_S unless forced; True if published."""
        now = time.monotonic()
        if not force and now - self._last_stats < STATS_INTERVAL_S:
            return False
        self._last_stats = now
        assert self.scheduler is not None and self.info is not None
        s = self.scheduler.stats()
        await self.bus.publish_stats(EngineStats(
            engine_id=self.engine_id,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            num_blocks=self.info.num_blocks,
            timestamp=time.time(),
            spec_num_drafts=s.spec_decode.num_drafts,
            spec_num_draft_tokens=s.spec_decode.num_draft_tokens,
            spec_num_accepted_tokens=s.spec_decode.num_accepted_tokens,
            spec_accepted_tokens_per_pos=list(s.spec_decode.accepted_tokens_per_pos),
            histograms=self.histograms.snapshot(),
            stream_unclaimed=await self._stream_unclaimed(),
        ))
        return True

    async def _stream_unclaimed(self) -> int:
        """Entries of the requests stream no engine has claimed: finished requests' entries
        are deleted, so the stream holds exactly the unclaimed and the pending (claimed,
        unfinished) ones. -1 if Redis cannot say."""
        key = self.bus.keys.requests
        try:
            async with self.bus.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(key)
                pipe.xinfo_groups(key)
                length, groups = await pipe.execute()
        except Exception as e:  # a metric must never stop the engine
            log.debug("cannot read the request stream's backlog: %s", e)
            return -1
        for g in groups:
            name = g.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == SCHEDULER_GROUP:
                return max(0, int(length) - int(g.get("pending", 0)))
        return int(length)

    # ------------------------------------------------------------------ metrics and span events
    # Times are wall-clock (time.time()): queue time starts at the gateway's arrival_time.
    def _note_scheduled(self, plan: StepPlan, num_preempted: int) -> None:
        sched = self.scheduler
        assert sched is not None
        now = time.time()
        if plan.total_num_scheduled_tokens:
            self.histograms.observe("iteration_tokens_total", plan.total_num_scheduled_tokens)
        for new in plan.new_requests:  # new, or back after a preemption
            req = sched.get_request(new.req_id)
            if req is not None and not req.scheduled_ts:
                req.scheduled_ts = now
                if self.spans.enabled:
                    self.spans.event(req.req_id, Event.FIRST_SCHEDULED, now)
                    self.spans.set(req.req_id, {GenAI.LATENCY_TIME_IN_QUEUE: now - req.arrival_time})
        # A step admits nothing after it preempts, and preemption puts its victims at the
        # front of the waiting queue: the first num_preempted waiting requests are this step's.
        if num_preempted and self.spans.enabled:
            for req in list(sched.waiting)[:num_preempted]:
                self.spans.event(req.req_id, Event.PREEMPTED, now)

    def _note_first_tokens(self, outputs: list[EngineCoreOutput]) -> None:
        now = time.time()
        for o in outputs:
            req = o.request
            if req is not None and o.new_token_ids and not req.first_token_ts:
                req.first_token_ts = now
                if self.spans.enabled:
                    self.spans.event(req.req_id, Event.FIRST_TOKEN, now)
                    self.spans.set(req.req_id, {GenAI.LATENCY_TIME_TO_FIRST_TOKEN: now - req.arrival_time})

    def _note_finished(self, req: Request) -> None:
        """vLLM's request phases, for a request that ran to a token-level finish."""
        if not (req.scheduled_ts and req.first_token_ts):
            return  # failed before its first token: no phases to report
        now = time.time()
        h = self.histograms
        h.observe("request_queue_time_seconds", max(0.0, req.scheduled_ts - req.arrival_time))
        h.observe("request_prefill_time_seconds", req.first_token_ts - req.scheduled_ts)
        h.observe("request_decode_time_seconds", now - req.first_token_ts)
        h.observe("request_inference_time_seconds", now - req.scheduled_ts)


def _stream_order(stream_id: bytes) -> tuple[int, int]:
    ms, _, seq = stream_id.partition(b"-")
    return int(ms), int(seq or 0)


def _error_delta(req_id: str, error: str, num_prompt_tokens: int) -> TokenDelta:
    return TokenDelta(req_id=req_id, token_ids=[], finish_reason=int(FinishReason.ABORT),
                      num_prompt_tokens=num_prompt_tokens, error=error)


# ---------------------------------------------------------------------- entry point
async def serve(bus: Bus, engine_id: str, config: EngineConfig, spans: RequestSpans | None = None) -> None:
    """Run until SIGTERM/SIGINT, then tell the executors to shut down."""
    service = SchedulerService(bus, engine_id, config, spans)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    try:
        await service.run()
    finally:
        await bus.close()
