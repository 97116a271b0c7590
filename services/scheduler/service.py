"""The scheduler service: one engine's batching loop over Redis.

    wait for executor ranks ──▶ register engine ──▶ loop:
        claim requests (block only when idle) → apply aborts → schedule
        → [XADD step, claim more, XREAD result]: one pipelined round trip
        → update → XACK finished requests → publish stats

The executors stream tokens (with finish reasons, from the same `check_stop`) straight
to the gateways; this service only speaks to a gateway when the executors cannot know:
a rejected or malformed request, a failed step, a finish only the scheduler decides.
It is on the critical path of every token: while busy, a step is one pipelined Redis
round trip (XADD the plan, claim new requests, block for the result), plus an XACK/XDEL
when requests finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import defaultdict

import msgspec

from services.scheduler.outputs import EngineCoreOutput
from services.scheduler.request import Request
from services.scheduler.scheduler import Scheduler
from shared.bus import Bus
from shared.config import EngineConfig
from shared.protocol import (
    EngineInfo,
    EngineStats,
    FinishReason,
    GenerateRequest,
    StepPlan,
    StepResult,
    TokenBatch,
    TokenDelta,
)
from shared.stop import check_stop
from shared.telemetry import GenAI, RequestSpans

log = logging.getLogger("folio.scheduler")

IDLE_BLOCK_MS = 100  # how long an idle scheduler blocks on the request stream
RESULT_POLL_MS = 500  # how often a scheduler waiting for a result checks executor heartbeats
STATS_INTERVAL_S = 0.5
ENGINE_TTL_S = 5.0
HEARTBEAT_INTERVAL_S = 1.0
UNKNOWN_ABORT_TTL_S = 60.0  # remember aborts of not-yet-claimed requests this long


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
        self.live: dict[str, tuple[bytes, Request]] = {}  # req_id -> (stream entry id, request)
        self._aborts: set[str] = set()
        self._unknown_aborts: dict[str, float] = {}  # aborted before we claimed them
        self._result_id: bytes = b"0-0"
        self._step_id = 0
        self._last_stats = 0.0

    def request_stop(self) -> None:
        self.stopping.set()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        await self.bus.ensure_group()
        await self._fail_orphans()
        aborts = asyncio.create_task(self._collect_aborts())
        try:
            while not self.stopping.is_set():
                infos = await self._wait_for_executors()
                if infos is None:
                    break
                self._build(infos)
                assert self.info is not None
                await self.bus.register_engine(self.info, ENGINE_TTL_S)
                beat = asyncio.create_task(self._heartbeat())
                try:
                    await self._serve()
                except ExecutorLost as e:
                    log.error("%s; failing %d in-flight request(s)", e, len(self.live))
                    await self._fail_all(str(e))
                finally:
                    beat.cancel()
                    await self.bus.unregister_engine(self.engine_id)
        finally:
            aborts.cancel()
            await self._shutdown()

    async def _shutdown(self) -> None:
        try:
            if self.live:
                await self._fail_all("the engine is shutting down")
            self._step_id += 1
            await self.bus.send_step(self.engine_id, StepPlan(step_id=self._step_id, shutdown=True))
            await self.bus.unregister_engine(self.engine_id)
        except Exception as e:  # Redis is gone: nothing left to tell anyone
            log.warning("incomplete shutdown: %s", e)
        self.spans.end_all("shutdown")
        log.info("scheduler %s stopped", self.engine_id)

    async def _fail_orphans(self) -> None:
        """Requests an earlier run of this engine claimed and never finished (it crashed):
        their clients already saw some tokens, so fail them rather than start them over."""
        orphans = await self.bus.pending_requests(self.engine_id)
        if not orphans:
            return
        log.warning("failing %d request(s) left unfinished by a previous run of engine %s",
                    len(orphans), self.engine_id)
        replies: dict[str, list[TokenDelta]] = defaultdict(list)
        for _msg_id, msg in orphans:
            if msg is not None:
                replies[msg.reply_to].append(
                    _error_delta(msg.req_id, "the engine restarted while serving this request",
                                 len(msg.prompt_token_ids)))
        await self._reply(replies)
        await self.bus.retire_requests(*(msg_id for msg_id, _ in orphans))

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
            eos_token_ids=rank0.eos_token_ids,
        )
        self.info = EngineInfo(
            engine_id=self.engine_id,
            num_blocks=num_blocks,
            block_size=rank0.block_size,
            max_model_len=max_model_len,
            model_name=rank0.model_name,
            tp_size=self.tp_size,
            eos_token_ids=rank0.eos_token_ids,
            max_num_batched_tokens=budget,
        )
        self.live.clear()
        self._last_stats = 0.0
        log.info("engine %s ready: %d KV blocks of %d tokens, max_model_len %d, %d tokens per step",
                 self.engine_id, num_blocks, rank0.block_size, max_model_len, budget)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self.bus.heartbeat(self.engine_id, ENGINE_TTL_S)
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
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ the loop
    async def _serve(self) -> None:
        sched = self.scheduler
        assert sched is not None
        self._result_id = await self.bus.stream_tail_id(self.bus.keys.results(self.engine_id))
        flush = False  # finished ids the executors have not been told about yet
        stalled = False
        while not self.stopping.is_set():
            busy = sched.has_unfinished_requests()
            if not busy or stalled:
                # While busy, requests are claimed during each step instead (no extra round trip).
                await self._claim(block_ms=IDLE_BLOCK_MS)
            flush |= await self._apply_aborts()
            if not sched.has_unfinished_requests() and not flush:
                if await self._publish_stats(force=busy):  # busy → idle: KV usage back to baseline now
                    await self._check_executors("while idle")
                continue
            plan = sched.schedule()
            flush = False
            stalled = plan.total_num_scheduled_tokens == 0
            if stalled and not plan.finished_req_ids:
                continue
            # One round trip: the plan goes out, new requests are claimed while the executors
            # compute, and the result comes back.
            room = self._room()
            claimed, got = await self.bus.send_step_and_read_result(
                self.engine_id, plan, self._result_id, RESULT_POLL_MS,
                claim=(self.engine_id, room) if room > 0 else None)
            await self._admit(claimed)
            result = await self._wait_result(plan, got)
            outputs = sched.update_from_output(plan, result)
            await self._finish(outputs)
            await self._publish_stats(force=not sched.has_unfinished_requests())

    async def _wait_result(self, plan: StepPlan, got: tuple[bytes, StepResult | None] | None) -> StepResult:
        while True:
            if got is None:
                await self._check_executors(f"during step {plan.step_id}")
            else:
                self._result_id, result = got
                if result is None:
                    raise ExecutorLost(f"malformed result while waiting for step {plan.step_id}")
                if result.step_id == plan.step_id:
                    if result.error:
                        log.error("step %d failed on the executors: %s", plan.step_id, result.error)
                    return result
                log.warning("skipping result of step %d while waiting for %d", result.step_id, plan.step_id)
            try:
                got = await self.bus.read_result(self.engine_id, self._result_id, block_ms=RESULT_POLL_MS)
            except msgspec.MsgspecError as e:
                self._result_id = await self.bus.stream_tail_id(self.bus.keys.results(self.engine_id))
                raise ExecutorLost(f"malformed step result: {e}") from e

    async def _check_executors(self, when: str) -> None:
        alive = await self.bus.num_ranks_alive(self.engine_id, self.tp_size)
        if alive < self.tp_size:
            raise ExecutorLost(f"engine {self.engine_id}: {self.tp_size - alive} executor rank(s) "
                               f"stopped heartbeating {when}")

    # ------------------------------------------------------------------ requests in
    def _room(self) -> int:
        """How many requests to claim: keep a queue, leave the rest for other engine replicas."""
        sched = self.scheduler
        assert sched is not None
        return 2 * sched.max_num_seqs - len(sched.waiting)

    async def _claim(self, block_ms: int) -> None:
        room = self._room()
        if room <= 0:
            await asyncio.sleep(block_ms / 1000)
            return
        await self._admit(await self.bus.claim_requests(self.engine_id, count=room, block_ms=block_ms))

    async def _admit(self, claimed: list[tuple[bytes, GenerateRequest | None]]) -> None:
        if not claimed:
            return
        sched = self.scheduler
        assert sched is not None
        replies: dict[str, list[TokenDelta]] = defaultdict(list)
        acks: list[bytes] = []
        for msg_id, msg in claimed:
            if msg is None:
                acks.append(msg_id)
                salvaged = await self._salvage(msg_id)
                if salvaged is not None:
                    req_id, reply_to = salvaged
                    replies[reply_to].append(_error_delta(req_id, "malformed request", 0))
                continue
            if self._unknown_aborts.pop(msg.req_id, None) is not None:
                acks.append(msg_id)
                continue
            try:
                req = Request.from_generate_request(msg)
                sched.add_request(req)
            except ValueError as e:
                acks.append(msg_id)
                replies[msg.reply_to].append(_error_delta(msg.req_id, str(e), len(msg.prompt_token_ids)))
                continue
            self.live[req.req_id] = (msg_id, req)
            if self.spans.enabled:
                p = req.sampling_params
                self.spans.start(req.req_id, req.traceparent, {
                    GenAI.REQUEST_MAX_TOKENS: p.max_tokens or 0,
                    GenAI.REQUEST_TEMPERATURE: p.temperature,
                    GenAI.REQUEST_TOP_P: p.top_p,
                    GenAI.USAGE_PROMPT_TOKENS: req.num_prompt_tokens,
                }, start_time=req.arrival_time)
        await self._reply(replies)
        await self.bus.retire_requests(*acks)

    async def _salvage(self, msg_id: bytes) -> tuple[str, str] | None:
        """(req_id, reply_to) of a malformed request, if its payload still names them."""
        try:
            raw = msgspec.msgpack.decode(await self.bus.read_request_raw(msg_id) or b"")
        except msgspec.MsgspecError:
            return None
        if isinstance(raw, list) and len(raw) > 3 and isinstance(raw[0], str) and isinstance(raw[3], str):
            return (raw[0], raw[3]) if raw[3] else None
        return None

    async def _apply_aborts(self) -> bool:
        """Abort what the gateways asked for; True if some request was live."""
        if not self._aborts:
            return False
        assert self.scheduler is not None
        ids, self._aborts = self._aborts, set()
        done = self.scheduler.abort_requests(ids)
        acks = []
        for req_id in done:
            msg_id, _ = self.live.pop(req_id)
            acks.append(msg_id)
            self.spans.end(req_id, {GenAI.RESPONSE_FINISH_REASONS: ["abort"]})
        await self.bus.retire_requests(*acks)
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
        info = self.info
        assert info is not None
        for o in outputs:
            if o.finish_reason is None:
                continue
            entry = self.live.pop(o.req_id, None)
            if entry is None:
                continue
            msg_id, req = entry
            acks.append(msg_id)
            if o.error:
                replies[req.reply_to].append(_error_delta(o.req_id, o.error, o.num_prompt_tokens))
            elif o.finish_reason != check_stop(req.output_token_ids, req.num_prompt_tokens,
                                               req.sampling_params, info.eos_token_ids, info.max_model_len):
                # A finish the executors cannot see (e.g. the KV cache is full for good): say it here.
                replies[req.reply_to].append(TokenDelta(req_id=o.req_id, token_ids=[],
                                                        finish_reason=int(o.finish_reason),
                                                        num_prompt_tokens=o.num_prompt_tokens))
            if self.spans.enabled:
                self.spans.end(o.req_id, {
                    GenAI.USAGE_COMPLETION_TOKENS: req.num_output_tokens,
                    GenAI.RESPONSE_FINISH_REASONS: [o.finish_reason.openai],
                    GenAI.LATENCY_E2E: time.time() - req.arrival_time,
                }, error=o.error)
        if replies:
            await self._reply(replies)
        if acks:
            await self.bus.retire_requests(*acks)

    async def _fail_all(self, error: str) -> None:
        replies: dict[str, list[TokenDelta]] = defaultdict(list)
        if self.scheduler is not None:
            self.scheduler.abort_requests(list(self.live))
        acks = []
        for req_id, (msg_id, req) in self.live.items():
            acks.append(msg_id)
            replies[req.reply_to].append(_error_delta(req_id, error, req.num_prompt_tokens))
            self.spans.end(req_id, error=error)
        self.live.clear()
        await self._reply(replies)
        await self.bus.retire_requests(*acks)

    async def _reply(self, replies: dict[str, list[TokenDelta]]) -> None:
        for channel, deltas in replies.items():
            if channel:
                await self.bus.publish_tokens(channel, TokenBatch(deltas=deltas))

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
        ))
        return True


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
