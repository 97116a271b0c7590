"""The executor service: one tensor-parallel rank of an engine, over Redis.

    load model, size KV cache ──▶ register rank (heartbeat thread) ──▶ loop:
        step plan → runner.execute → rank 0, one round trip:
        [XADD the step's deltas to the engine's token log, PUBLISH them (one TokenBatch
         per gateway channel), XADD the result, XREAD next step]

Tokens go straight to the gateways (not through the scheduler), each delta with its
request's output index and, on its last token, the finish reason the runner decided;
the scheduler gets the same decision in the step result and applies it. The result goes
out right behind the tokens in the same pipeline (so a request the scheduler retires has
nothing more coming to the log), and waiting for the next plan shares that round trip.
Per-request state is the runner's (`runner.input_batch.requests`); this service keeps none.

The model runs on the event loop's thread (no thread hand-off on the per-token path);
the heartbeat beats from its own thread, so a long step does not look like a dead rank.

A Redis outage ends every request this rank holds (its scheduler drops them too, see
services/scheduler/service.py): the rank drops them, reconnects with backoff and
registers again (at TP > 1 all ranks restart instead, see `_reconnect`); the heartbeat
re-registers the rank with each beat as well, so a Redis that restarted empty knows it
again within a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from collections import defaultdict

import redis

from shared.bus import Bus, Malformed, is_outage
from shared.config import ConfigError, EngineConfig
from shared.gc_heap import freeze_startup_heap
from shared.protocol import (
    EngineInfo,
    FinishReason,
    StepHeader,
    StepPlan,
    StepResult,
    TokenBatch,
    TokenDelta,
    encode,
)
from shared.telemetry import GenAI, RequestSpans

log = logging.getLogger("folio.executor")

RANK_TTL_S = 5.0
HEARTBEAT_INTERVAL_S = 1.0
STEP_POLL_MS = 500  # how often an idle executor checks whether it should stop


class Heartbeat(threading.Thread):
    """Refreshes a TTL key from its own thread and Redis connection, whatever the loop does.

    With peers to watch (the other ranks of a tensor-parallel group), it also ends this
    process when one of them stops heartbeating or restarts: the group cannot take a new
    member, and a collective waiting for a dead peer would block the loop forever. The
    restart policy (folio serve, compose, k8s) then starts the rank again, and the ranks
    rendezvous afresh."""

    def __init__(self, url: str, key: str, ttl_s: float, interval_s: float, value: bytes = b"1",
                 register: tuple[str, str, bytes] | None = None) -> None:
        super().__init__(name="folio-heartbeat", daemon=True)
        self._client = redis.Redis.from_url(url, socket_timeout=max(interval_s, 1.0))
        self._key, self._ttl_ms, self._interval_s = key, int(ttl_s * 1000), interval_s
        self._value = value
        self._register = register  # (hash, field, value) written with every beat
        self._stop_event = threading.Event()
        self._peers: dict[str, bytes] = {}  # heartbeat key -> the incarnation it must hold
        self._peers_grace_until = 0.0

    def watch_peers(self, peers: dict[str, bytes]) -> None:
        self._peers = dict(peers)

    def run(self) -> None:
        while not self._stop_event.wait(self._interval_s):
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    if self._register is not None:
                        pipe.hset(*self._register)
                    pipe.set(self._key, self._value, px=self._ttl_ms)
                    pipe.execute()
                peers = self._peers
                # A peer's key missing right after Redis came back is not a dead peer: it
                # has not beaten into the new Redis yet.
                if peers and time.monotonic() >= self._peers_grace_until:
                    beats = self._client.mget(list(peers))
                    lost = [k for (k, want), got in zip(peers.items(), beats, strict=True) if got != want]
                    if lost and not self._stop_event.is_set():
                        log.critical("tensor-parallel peer(s) %s stopped or restarted: leaving the group "
                                     "so all ranks can rendezvous afresh", lost)
                        os._exit(3)  # a collective may be blocked on the dead peer: no clean way out
            except redis.RedisError as e:  # a Redis hiccup must not kill the rank; the next beat retries
                log.warning("heartbeat failed: %s", e)
                self._peers_grace_until = time.monotonic() + self._ttl_ms / 1000 + self._interval_s

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
        self.incarnation = uuid.uuid4().hex[:12]
        self.last_step_id = 0
        self._drop_held = False  # set by a Redis outage: the scheduler has dropped everything
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
            incarnation=self.incarnation,
            max_num_batched_tokens=runner.max_num_batched_tokens,
        )

    async def run(self) -> None:
        bus, engine_id = self.bus, self.engine_id
        # Read from the current tail: steps already in the stream were meant for an earlier executor.
        last_id = await bus.stream_tail_id(bus.keys.steps(engine_id))
        info = self.engine_info()
        freeze_startup_heap()  # the model is loaded: keep full collections off the steps
        await bus.register_rank(info, self.rank_ttl_s)
        log.info("executor %s rank %d registered: %d KV blocks of %d tokens",
                 engine_id, self.tp_rank, info.num_blocks, info.block_size)
        beat = Heartbeat(bus.url, bus.keys.rank_alive(engine_id, self.tp_rank), self.rank_ttl_s,
                         self.heartbeat_s, self.incarnation.encode(),
                         register=(bus.keys.ranks(engine_id), str(self.tp_rank), encode(info)))
        beat.start()
        try:
            if self.config.tensor_parallel_size > 1:
                beat.watch_peers(await self._peers())
            got = None
            while not self.stopping.is_set():
                try:
                    if got is None:
                        got = await bus.read_step(engine_id, last_id, block_ms=STEP_POLL_MS)
                        continue
                    last_id, plan = got
                    if isinstance(plan, Malformed):
                        result = self.fail_malformed(plan)
                        if result is None:  # not even a step id: nobody waits for an answer
                            got = await bus.read_step(engine_id, last_id, block_ms=STEP_POLL_MS)
                            continue
                    elif plan.shutdown:
                        log.info("executor %s rank %d: shutdown requested by the scheduler",
                                 engine_id, self.tp_rank)
                        beat.watch_peers({})  # the peers are leaving too
                        break
                    else:
                        result = self.execute(plan)
                    if not self.publishes:
                        got = await bus.read_step(engine_id, last_id, block_ms=STEP_POLL_MS)
                        continue
                    batches = self.token_batches(result) if result.req_ids and not result.error else {}
                    got = await bus.finish_step_and_read_next(engine_id, result, batches, last_id,
                                                              STEP_POLL_MS)
                except Exception as e:
                    if not is_outage(e):
                        raise
                    got = None  # keep last_id: a Redis that kept its data has the next plans after it
                    await self._reconnect(e, info)
        finally:
            beat.stop()
            try:
                await bus.unregister_rank(engine_id, self.tp_rank)
            except Exception as e:  # Redis is gone: the heartbeat key expires on its own
                if not is_outage(e):
                    raise
            self.spans.end_all("shutdown")

    async def _reconnect(self, error: BaseException, info: EngineInfo) -> None:
        """After a Redis outage: drop every request (the next plan finishes them in the
        runner), wait for Redis with backoff, register again. At TP > 1 the rank leaves
        instead (exit code 3, as for a lost peer): the ranks may have seen different last
        plans before the outage (one read step N+1, another's read failed), and would then
        run mismatched collectives; the restart policy starts all ranks afresh."""
        if self.config.tensor_parallel_size > 1:
            log.critical("executor %s rank %d lost Redis (%s: %s); leaving the group so all ranks "
                         "restart in step", self.engine_id, self.tp_rank, type(error).__name__, error)
            os._exit(3)  # a peer may be blocked in a collective with this rank: no clean way out
        log.error("executor %s rank %d lost Redis (%s: %s); dropping %d request(s), reconnecting",
                  self.engine_id, self.tp_rank, type(error).__name__, error,
                  len(self.runner.input_batch.requests))
        self._drop_held = True
        what = f"executor {self.engine_id} rank {self.tp_rank}"
        while await self.bus.wait_for_redis(self.stopping.is_set, what):
            try:
                await self.bus.register_rank(info, self.rank_ttl_s)
                return
            except Exception as e:
                if not is_outage(e):
                    raise

    async def _peers(self) -> dict[str, bytes]:
        """The other ranks' heartbeat keys and incarnations, once all have registered (they
        formed the group with this rank, so they are up or about to register)."""
        keys, size = self.bus.keys, self.config.tensor_parallel_size
        deadline = time.monotonic() + 60
        while True:
            ranks = {i.tp_rank: i for i in await self.bus.live_ranks(self.engine_id) if i.tp_rank < size}
            if len(ranks) == size:
                return {keys.rank_alive(self.engine_id, r): i.incarnation.encode()
                        for r, i in ranks.items() if r != self.tp_rank}
            if time.monotonic() > deadline:
                raise RuntimeError(f"the other ranks of engine {self.engine_id} never registered")
            await asyncio.sleep(0.1)

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step; a failure becomes an error result (the scheduler fails the step's
        requests) and the rank keeps serving."""
        held = self.runner.input_batch.requests
        # Step ids only go back when a new scheduler took over this engine, and after a Redis
        # outage the scheduler dropped its requests: either way the requests we hold are the
        # old run's, and nobody will ever finish them. Drop them.
        drop, self._drop_held = self._drop_held or plan.step_id <= self.last_step_id, False
        if drop and held:
            log.warning("dropping %d request(s) of the scheduler's previous run", len(held))
            plan.finished_req_ids = [*held, *plan.finished_req_ids]
        self.last_step_id = plan.step_id
        self._trace(plan)
        try:
            return self.runner.execute(plan)
        except Exception as e:
            if self.config.tensor_parallel_size > 1:
                # Past the ranks' agreement (inside the forward): the peers are in, or will
                # time out of, a collective this rank never reaches. The group is done for;
                # the restart policy starts every rank again.
                log.critical("step %d failed inside the forward on rank %d: %s: %s; leaving the group",
                             plan.step_id, self.tp_rank, type(e).__name__, e)
                raise
            log.exception("step %d failed", plan.step_id)
            return StepResult(step_id=plan.step_id, error=f"executor error: {type(e).__name__}: {e}")

    def fail_malformed(self, bad: Malformed) -> StepResult | None:
        """A plan that does not decode fails its step (the scheduler knows which requests it
        held); None if not even its step id can be read. Every rank reads the same bytes,
        so every rank takes the same branch, and at TP > 1 they agree on the failure."""
        header = bad.header(StepHeader)
        if header is None:
            return None
        self.last_step_id = header.step_id
        reason = f"malformed step plan: {bad.error}"
        if self.config.tensor_parallel_size > 1:
            return self.runner.fail_step(header.step_id, reason)
        return StepResult(step_id=header.step_id, error=reason)

    def _trace(self, plan: StepPlan) -> None:
        if not self.spans.enabled:
            return
        for req_id in plan.finished_req_ids:
            self.spans.end(req_id)
        for new in plan.new_requests:
            if new.req_id not in self.spans:
                self.spans.start(new.req_id, new.traceparent, {
                    GenAI.USAGE_INPUT_TOKENS: len(new.prompt_token_ids),
                    GenAI.REQUEST_MAX_TOKENS: new.sampling_params.max_tokens or 0,
                })

    def token_batches(self, result: StepResult) -> dict[str, TokenBatch]:
        """This step's new tokens, each delta with its output index and the finish reason the
        runner decided, grouped by gateway channel."""
        by_channel: dict[str, list[TokenDelta]] = defaultdict(list)
        held = self.runner.input_batch.requests
        has_logprobs = bool(result.logprobs)
        reasons = result.finish_reasons
        for i, req_id in enumerate(result.req_ids):
            state = held.get(req_id)
            if state is None:
                continue
            tokens = result.sampled_token_ids[i]
            reason = reasons[i] if i < len(reasons) else 0
            if not tokens and not reason:  # deferred (its grammar still compiling): nothing to say
                continue
            by_channel[state.reply_to].append(TokenDelta(
                req_id=req_id,
                token_ids=tokens,
                # The runner has appended this step's tokens already.
                index=state.num_output_tokens - len(tokens),
                logprobs=result.logprobs[i] if has_logprobs and i < len(result.logprobs) else [],
                finish_reason=reason,
                num_prompt_tokens=state.num_prompt_tokens,
            ))
            if reason and self.spans.enabled:
                self.spans.end(req_id, {GenAI.USAGE_OUTPUT_TOKENS: state.num_output_tokens,
                                        GenAI.RESPONSE_FINISH_REASONS: [FinishReason(reason).openai]})
        return {ch: TokenBatch(deltas=d, engine_id=self.engine_id) for ch, d in by_channel.items() if ch}


# ---------------------------------------------------------------------- entry point
def build_runner(config: EngineConfig, tp_rank: int = 0, tp_group=None):
    """Resolve the model and build the ModelRunner (loads weights, allocates the KV cache);
    at TP > 1 on this rank's device, in the group `tp_group` (see distributed.py)."""
    from services.executor.loader import resolve_model
    from services.executor.model_runner import ModelRunner

    t0 = time.monotonic()
    resolved = resolve_model(config.model, config.load_format, config.download_dir)
    runner = ModelRunner(config, resolved, tp_rank=tp_rank, tp_group=tp_group)
    log.info("model %s loaded in %.1fs", resolved.path, time.monotonic() - t0)
    return runner


def join_and_build(config: EngineConfig, tp_rank: int, bus: Bus, engine_id: str):
    """(runner, group): at TP > 1, form the engine's group first (through Redis, unless
    --distributed-init-method names rank 0's store), then build the runner in it."""
    if config.tensor_parallel_size == 1:
        return build_runner(config, tp_rank), None
    from services.executor.distributed import RedisRendezvous, form_tp_group

    rendezvous = None
    if config.distributed_init_method is None:
        # Across hosts rank 0 must publish an address the others reach (the pod IP in k8s).
        rendezvous = RedisRendezvous(bus.url, bus.keys.ns, engine_id,
                                     advertise_host=os.environ.get("FOLIO_DISTRIBUTED_HOST") or None)
    group = form_tp_group(config, tp_rank, rendezvous=rendezvous)
    try:
        return build_runner(config, tp_rank, group), group
    except BaseException:
        group.destroy()
        raise


async def serve(
    bus: Bus, engine_id: str, tp_rank: int, config: EngineConfig, spans: RequestSpans | None = None
) -> int:
    """Load the model, then serve steps until the scheduler says shutdown or SIGTERM/SIGINT."""
    from services.executor.loader import ModelSourceError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    group = None
    try:
        loading = _load_in_daemon_thread(config, tp_rank, bus, engine_id)
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            log.info("stopped while loading the model")
            return 0
        stopper.cancel()
        try:
            runner, group = loading.result()
        except (ModelSourceError, ConfigError) as e:
            log.error("cannot load the model: %s", e)
            return 2
        service = ExecutorService(bus, engine_id, tp_rank, config, runner, spans)
        stop_waiter = asyncio.ensure_future(_forward(stop, service, config.shutdown_timeout + 10.0))
        try:
            await service.run()
        finally:
            stop_waiter.cancel()
        return 0
    finally:
        if group is not None:
            group.destroy()
        await bus.close()


def _load_in_daemon_thread(config: EngineConfig, tp_rank: int, bus: Bus, engine_id: str) -> asyncio.Future:
    """join_and_build in a daemon thread: a SIGTERM while loading (or waiting for the other
    ranks) must not wait for it to finish (asyncio.to_thread's pool threads are joined at exit)."""
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
            result, error = join_and_build(config, tp_rank, bus, engine_id), None
        except BaseException as e:
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is gone: we were stopped while loading
            pass

    threading.Thread(target=work, name="folio-model-loader", daemon=True).start()
    return fut


async def _forward(stop: asyncio.Event, service: ExecutorService, grace_s: float) -> None:
    """A first signal lets the scheduler drain its requests and send the shutdown plan (it
    gives up after --shutdown-timeout); this rank stops by itself after grace_s, or at once on
    a second signal."""
    await stop.wait()
    stop.clear()
    log.info("signal received: serving until the scheduler's shutdown plan (at most %gs)", grace_s)
    try:
        await asyncio.wait_for(stop.wait(), grace_s)
    except asyncio.TimeoutError:
        pass
    service.request_stop()
