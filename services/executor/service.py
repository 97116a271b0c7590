"""The executor service: one tensor-parallel rank of an engine, over Redis.

    load model, size KV cache ──▶ register rank (heartbeat thread) ──▶ loop:
        step plan → runner.execute → rank 0: XADD result, then
        [PUBLISH tokens (one TokenBatch per gateway channel), XREAD next step]

Tokens go straight to the gateways (not through the scheduler), each with its finish
reason from `check_stop` — the same function the scheduler applies to the same tokens,
so both agree on when a request ends without another round trip. The result goes out
first, so the scheduler plans the next step while the tokens are published; publishing
and waiting for the next plan share one pipelined round trip.

The model runs on the event loop's thread (no thread hand-off on the per-token path);
the heartbeat beats from its own thread, so a long step does not look like a dead rank.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import redis

from shared.bus import Bus
from shared.config import ConfigError, EngineConfig
from shared.protocol import EngineInfo, StepPlan, StepResult, TokenBatch, TokenDelta
from shared.sampling_params import SamplingParams
from shared.stop import check_stop
from shared.telemetry import GenAI, RequestSpans

log = logging.getLogger("folio.executor")

RANK_TTL_S = 5.0
HEARTBEAT_INTERVAL_S = 1.0
STEP_POLL_MS = 500  # how often an idle executor checks whether it should stop


@dataclass(slots=True)
class _Seq:
    """What the executor needs to stream a request's tokens: its own view, built from plans
    (the runner's per-request state has no reply channel, and is the runner's business)."""

    num_prompt_tokens: int
    output_token_ids: list[int]
    params: SamplingParams
    reply_to: str
    finished: bool = False


class Heartbeat(threading.Thread):
    """Refreshes a TTL key from its own thread and Redis connection, whatever the loop does."""

    def __init__(self, url: str, key: str, ttl_s: float, interval_s: float) -> None:
        super().__init__(name="folio-heartbeat", daemon=True)
        self._client = redis.Redis.from_url(url, socket_timeout=max(interval_s, 1.0))
        self._key, self._ttl_ms, self._interval_s = key, int(ttl_s * 1000), interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval_s):
            try:
                self._client.set(self._key, b"1", px=self._ttl_ms)
            except redis.RedisError as e:  # a Redis hiccup must not kill the rank; the next beat retries
                log.warning("heartbeat failed: %s", e)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self._client.close()


class ExecutorService:
    def __init__(
        self,
        bus: Bus,
        engine_id: str,
        tp_rank: int,
        config: EngineConfig,
        runner,
        spans: RequestSpans | None = None,
        *,
        rank_ttl_s: float = RANK_TTL_S,
        heartbeat_s: float = HEARTBEAT_INTERVAL_S,
    ) -> None:
        self.bus = bus
        self.engine_id = engine_id
        self.tp_rank = tp_rank
        self.config = config
        self.runner = runner
        self.spans = spans or RequestSpans(None, "folio-executor", "folio.executor.request")
        self.rank_ttl_s = rank_ttl_s
        self.heartbeat_s = heartbeat_s
        self.publishes = tp_rank == 0  # only rank 0 reports results and streams tokens
        self.eos_token_ids = frozenset(runner.eos_token_ids)
        self.max_model_len = runner.max_model_len
        self.seqs: dict[str, _Seq] = {}
        self.last_step_id = 0
        self.stopping = asyncio.Event()

    def request_stop(self) -> None:
        self.stopping.set()

    def engine_info(self) -> EngineInfo:
        runner = self.runner
        return EngineInfo(
            engine_id=self.engine_id,
            num_blocks=runner.num_blocks,
            block_size=runner.block_size,
            max_model_len=runner.max_model_len,
            model_name=self.config.model_name,
            tp_rank=self.tp_rank,
            tp_size=self.config.tensor_parallel_size,
            eos_token_ids=sorted(self.eos_token_ids),
            max_num_batched_tokens=runner.max_num_batched_tokens,
        )

    async def run(self) -> None:
        bus, engine_id = self.bus, self.engine_id
        # Read from the current tail: steps already in the stream were meant for an earlier executor.
        last_id = await bus.stream_tail_id(bus.keys.steps(engine_id))
        info = self.engine_info()
        await bus.register_rank(info, self.rank_ttl_s)
        log.info("executor %s rank %d registered: %d KV blocks of %d tokens",
                 engine_id, self.tp_rank, info.num_blocks, info.block_size)
        beat = Heartbeat(bus.url, bus.keys.rank_alive(engine_id, self.tp_rank), self.rank_ttl_s,
                         self.heartbeat_s)
        beat.start()
        try:
            got = None
            while not self.stopping.is_set():
                if got is None:
                    got = await bus.read_step(engine_id, last_id, block_ms=STEP_POLL_MS)
                    continue
                last_id, plan = got
                if plan.shutdown:
                    log.info("executor %s rank %d: shutdown requested by the scheduler",
                             engine_id, self.tp_rank)
                    break
                result = self.execute(plan)
                if not self.publishes:
                    got = await bus.read_step(engine_id, last_id, block_ms=STEP_POLL_MS)
                    continue
                await bus.send_result(engine_id, result)
                batches = self.token_batches(result) if result.req_ids and not result.error else {}
                got = await bus.publish_tokens_and_read_step(batches, engine_id, last_id, STEP_POLL_MS)
        finally:
            beat.stop()
            await bus.unregister_rank(engine_id, self.tp_rank)
            self.spans.end_all("shutdown")

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step; a failure becomes an error result (the scheduler fails the step's
        requests) and the rank keeps serving."""
        if plan.step_id <= self.last_step_id and self.seqs:
            # Step ids only go back when a new scheduler took over this engine: the requests
            # we hold are the old one's, and nobody will ever finish them. Drop them.
            log.warning("scheduler restarted: dropping %d request(s) of its previous run", len(self.seqs))
            plan.finished_req_ids = [*self.seqs, *plan.finished_req_ids]
        self.last_step_id = plan.step_id
        self._apply_plan(plan)
        try:
            return self.runner.execute(plan)
        except Exception as e:
            log.exception("step %d failed", plan.step_id)
            return StepResult(step_id=plan.step_id, error=f"executor error: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ per-request view
    def _apply_plan(self, plan: StepPlan) -> None:
        seqs = self.seqs
        for req_id in plan.finished_req_ids:
            if seqs.pop(req_id, None) is not None and self.spans.enabled:
                self.spans.end(req_id)
        for new in plan.new_requests:
            seqs[new.req_id] = _Seq(len(new.prompt_token_ids), list(new.output_token_ids),
                                    new.sampling_params, new.reply_to)
            if self.spans.enabled and new.req_id not in self.spans:
                self.spans.start(new.req_id, new.traceparent, {
                    GenAI.USAGE_PROMPT_TOKENS: len(new.prompt_token_ids),
                    GenAI.REQUEST_MAX_TOKENS: new.sampling_params.max_tokens or 0,
                })

    def token_batches(self, result: StepResult) -> dict[str, TokenBatch]:
        """This step's new tokens, with finish reasons, grouped by gateway channel."""
        by_channel: dict[str, list[TokenDelta]] = defaultdict(list)
        seqs = self.seqs
        has_logprobs = bool(result.logprobs)
        for i, req_id in enumerate(result.req_ids):
            seq = seqs.get(req_id)
            if seq is None or seq.finished:
                continue
            sampled = result.sampled_token_ids[i]
            out = seq.output_token_ids
            reason = None
            n = 0
            for tok in sampled:
                out.append(tok)
                n += 1
                reason = check_stop(out, seq.num_prompt_tokens, seq.params, self.eos_token_ids,
                                    self.max_model_len)
                if reason is not None:
                    seq.finished = True
                    break
            lps = result.logprobs[i][:n] if has_logprobs and i < len(result.logprobs) else []
            by_channel[seq.reply_to].append(TokenDelta(
                req_id=req_id,
                token_ids=sampled if n == len(sampled) else sampled[:n],
                logprobs=lps,
                finish_reason=int(reason) if reason is not None else 0,
                num_prompt_tokens=seq.num_prompt_tokens,
            ))
            if reason is not None and self.spans.enabled:
                self.spans.end(req_id, {GenAI.USAGE_COMPLETION_TOKENS: len(out),
                                        GenAI.RESPONSE_FINISH_REASONS: [reason.openai]})
        return {ch: TokenBatch(deltas=d) for ch, d in by_channel.items() if ch}


# ---------------------------------------------------------------------- entry point
def build_runner(config: EngineConfig, tp_rank: int = 0):
    """Resolve the model and build the ModelRunner (loads weights, allocates the KV cache).

    NOTE: with tensor_parallel_size > 1 the ranks also need a torch.distributed group;
    that setup is not done here yet (only tp 1 is served).
    """
    from services.executor.loader import resolve_model
    from services.executor.model_runner import ModelRunner

    t0 = time.monotonic()
    resolved = resolve_model(config.model, config.load_format, config.download_dir)
    runner = ModelRunner(config, resolved, tp_rank=tp_rank)
    log.info("model %s loaded in %.1fs", resolved.path, time.monotonic() - t0)
    return runner


async def serve(
    bus: Bus, engine_id: str, tp_rank: int, config: EngineConfig, spans: RequestSpans | None = None
) -> int:
    """Load the model, then serve steps until the scheduler says shutdown or SIGTERM/SIGINT."""
    from services.executor.loader import ModelSourceError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loading = _load_in_daemon_thread(config, tp_rank)
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            log.info("stopped while loading the model")
            return 0
        stopper.cancel()
        try:
            runner = loading.result()
        except (ModelSourceError, ConfigError) as e:
            log.error("cannot load the model: %s", e)
            return 2
        service = ExecutorService(bus, engine_id, tp_rank, config, runner, spans)
        stop_waiter = asyncio.ensure_future(_forward(stop, service))
        try:
            await service.run()
        finally:
            stop_waiter.cancel()
        return 0
    finally:
        await bus.close()


def _load_in_daemon_thread(config: EngineConfig, tp_rank: int) -> asyncio.Future:
    """build_runner in a daemon thread: a SIGTERM while loading must not wait for the load
    to finish (asyncio.to_thread's pool threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(result, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def work() -> None:
        try:
            result, error = build_runner(config, tp_rank), None
        except BaseException as e:
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is gone: we were stopped while loading
            pass

    threading.Thread(target=work, name="folio-model-loader", daemon=True).start()
    return fut


async def _forward(stop: asyncio.Event, service: ExecutorService) -> None:
    await stop.wait()
    service.request_stop()
