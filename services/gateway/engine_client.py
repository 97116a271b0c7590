"""The gateway's side of the bus: submit requests, fan token deltas out, abort.

    handler ──submit()──▶ {ns}:requests
       ▲                        ┆ (engines)
       │ asyncio.Queue           ▼
    _route ◀── one subscription: {ns}:gateway:{g}:tokens (TokenBatch)

One subscription per gateway (not per request): the subscriber task routes each
TokenDelta by req_id to the queue of the HTTP request that owns it, so the per-token
path is one dict lookup and one `put_nowait`. Aborts are queued synchronously (handlers
call `abort` from `finally` blocks, even while being cancelled) and published in batches
by a background task.

Every delta carries the output index of its first token, and every batch the engine that
produced it. A request resumed on another engine after a crash re-sends what it had
generated; the route keeps the next index it expects and passes on only what is new, so
a client sees each token exactly once, in order. A watchdog ends a request whose engine
is dead (or, before its first token, while no engine is alive) and that nothing has
resumed within `resume_timeout_s`, so no request waits forever.

The same loop holds the engine-metrics lease: exactly one gateway at a time exports the
engine series (the schedulers' EngineStats) on its /metrics, so a plain Prometheus `sum`
over every gateway is the true value. The lease is a Redis key ({ns}:metrics:engine-exporter
= gateway id, PX ttl) taken when free and renewed by its holder every ttl/3; a holder that
stops gives it up, one that dies lets it expire, and another gateway takes it at its next
round. `exports_engine_metrics` is a cached flag (no Redis on a scrape): true only until
the lease this gateway last renewed would have expired, so during an outage the holder
stops exporting before another can start.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from services.gateway import admission
from services.gateway.admission import DeadlineExceededError, Ticket
from services.gateway.errors import APIError, ServiceUnavailableError
from shared.bus import Bus, is_outage
from shared.protocol import EngineInfo, GenerateRequest, TokenBatch, TokenDelta

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 10.0
_REDIS_TIMEOUT_S = 2.0
_MAX_CONCURRENT_SUBMITS = 4
# While the token subscription is being restored (Redis restarted), a new request waits
# this long for it, then gets a 503: submitted unsubscribed, its tokens could be lost.
_RESUBSCRIBE_WAIT_S = 5.0
_MAX_PENDING_ABORTS = 10_000  # kept across a Redis outage, to be sent once it is back


_INTERRUPT = object()  # queued after the deltas a stream got before it was interrupted


class RequestStream:
    """The deltas of one HTTP request's sub-requests (n choices × prompts), in arrival order."""

    __slots__ = ("queue", "req_ids", "error", "engines")

    def __init__(self, req_ids: list[str]) -> None:
        self.req_ids = req_ids
        self.queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self.error: APIError | None = None
        # req_id -> the engine whose batch carried its latest delta (set before the delta is
        # queued, so a reader sees the engine of every delta it got; absent before any).
        self.engines: dict[str, str] = {}

    async def get(self) -> TokenDelta:
        """The next delta; raises the error the stream was interrupted with (deadline, drain)."""
        delta = await self.queue.get()
        if delta is _INTERRUPT:
            assert self.error is not None
            raise self.error
        return delta

    def get_nowait(self) -> TokenDelta | None:
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None


class _Route:
    """Where one engine request's deltas go, and how far its client has got."""

    __slots__ = ("stream", "next_index", "engine_id", "stalled_since", "ticket", "prompt_len")

    def __init__(self, stream: RequestStream, ticket: Ticket | None = None, prompt_len: int = 0) -> None:
        self.stream = stream
        # The admission ticket: this request queues (counts against the bounds) until its
        # first delta, or until it ends without one.
        self.ticket = ticket
        self.prompt_len = prompt_len
        self.next_index = 0  # output index of the next token the client has not seen
        self.engine_id = ""  # the engine that last sent it something ("" before that)
        self.stalled_since: float | None = None  # when the watchdog found its engine gone


class EngineClient:
    def __init__(
        self,
        bus: Bus,
        gateway_id: str,
        *,
        engine_cache_s: float = 1.0,
        watchdog_interval_s: float = 1.0,
        resume_timeout_s: float = 30.0,
        metrics_lease_ttl_s: float = 10.0,
    ) -> None:
        self.bus = bus
        self.gateway_id = gateway_id
        self.reply_to = bus.keys.gateway_tokens(gateway_id)
        self._routes: dict[str, _Route] = {}
        self._pending_aborts: list[str] = []
        self._abort_event = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # Set by stop(): the background loops end on it even where Python 3.11's wait_for
        # lost a cancellation (its inner call failed as the cancel came, and the loop's
        # `except Exception` took the failure; the task then ran on and stop() hung).
        self._stopping = False
        self._engines: list[EngineInfo] = []
        self._engines_at = -1e9
        self._refresh: asyncio.Future | None = None
        self._engine_cache_s = engine_cache_s
        self._watchdog_interval_s = watchdog_interval_s
        self._resume_timeout_s = resume_timeout_s
        self._subscribed = asyncio.Event()
        self._lease_ttl_s = metrics_lease_ttl_s
        self._lease_until = 0.0  # monotonic: the lease this gateway holds lasts until then
        # Each concurrent Redis command takes its own pooled connection, and a new one costs
        # ~3 ms of CPU (redis-py reads its package metadata for CLIENT SETINFO): a burst of 64
        # submits opened 60 connections, the largest cost of a burst's 429s. A few in flight
        # keep the pool small; an XADD is a ~0.1 ms round trip, so they still pass 10k/s.
        self._submit_slots = asyncio.Semaphore(_MAX_CONCURRENT_SUBMITS)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._hold_lease()  # before serving: a first scrape already knows
        self._tasks = [
            asyncio.create_task(self._subscriber(), name="gateway-subscriber"),
            asyncio.create_task(self._aborter(), name="gateway-aborter"),
            asyncio.create_task(self._watchdog(), name="gateway-watchdog"),
        ]
        # Tokens published before the SUBSCRIBE is in place would be lost: serve only after
        # Redis confirmed it (the subscriber sets the event).
        try:
            await asyncio.wait_for(self._subscribed.wait(), _READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"could not subscribe to {self.reply_to} within {_READY_TIMEOUT_S}s") from None

    async def stop(self) -> None:
        if self._routes:
            self.abort(list(self._routes))
            await self._flush_aborts()
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.exports_engine_metrics:  # hand the engine series over now, not at expiry
            self._lease_until = 0.0
            try:
                await asyncio.wait_for(
                    self.bus.release_lease(self.bus.keys.metrics_exporter, self.gateway_id),
                    _REDIS_TIMEOUT_S)
            except Exception as e:
                log.warning("could not release the engine-metrics lease (it expires): %s", e)

    # ------------------------------------------------------------------ metrics lease
    @property
    def exports_engine_metrics(self) -> bool:
        """Whether this gateway's /metrics carries the engine series now (no Redis call)."""
        return time.monotonic() < self._lease_until

    async def _hold_lease(self) -> None:
        """Take or renew the engine-metrics lease; on a Redis error keep what is known (the
        flag turns false by itself when the last renewal would have expired)."""
        before = self.exports_engine_metrics
        t = time.monotonic()
        try:
            held = await asyncio.wait_for(
                self.bus.hold_lease(self.bus.keys.metrics_exporter, self.gateway_id, self._lease_ttl_s),
                _REDIS_TIMEOUT_S)
        except Exception as e:
            log.debug("cannot renew the engine-metrics lease: %s", e)
        else:
            self._lease_until = t + self._lease_ttl_s if held else 0.0
        if self.exports_engine_metrics != before:
            log.info("gateway %s %s the engine series on /metrics", self.gateway_id,
                     "now exports" if not before else "no longer exports")

    @property
    def num_in_flight(self) -> int:
        return len(self._routes)

    def serving_engines(self) -> set[str]:
        """Engines streaming to this gateway now (they have sent a request of it a token)."""
        return {r.engine_id for r in self._routes.values() if r.engine_id}

    # ------------------------------------------------------------------ engines
    async def engines(self, fresh: bool = False) -> list[EngineInfo]:
        """Live engines, cached for a second so requests do not each cost Redis round trips.

        Only a list with an engine in it is served from the cache. "None alive" is asked
        again each time (requests arriving together still share one query): cached, it
        turned an engine that registered within the second into a 503 for every request of
        that second, e.g. the first wave after a Redis restart under a TP 2 engine, whose
        ranks take seconds to come back while requests keep the gateway asking."""
        if fresh or not self._engines or time.monotonic() - self._engines_at > self._engine_cache_s:
            # Requests arriving together share one refresh instead of each querying Redis.
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.ensure_future(self._fetch_engines())
            await asyncio.shield(self._refresh)
        return self._engines

    async def _fetch_engines(self) -> None:
        try:
            self._engines = await asyncio.wait_for(self.bus.live_engines(), _REDIS_TIMEOUT_S)
        except Exception as e:  # a Redis outage means no engine is reachable
            log.warning("cannot list engines: %s", e)
            self._engines = []
        self._engines_at = time.monotonic()

    # ------------------------------------------------------------------ requests
    async def submit(self, reqs: list[GenerateRequest]) -> RequestStream:
        """Register a queue for the requests, then send them (tokens may arrive at once)."""
        if not self._subscribed.is_set():
            try:
                await asyncio.wait_for(self._subscribed.wait(), _RESUBSCRIBE_WAIT_S)
            except asyncio.TimeoutError:
                raise ServiceUnavailableError("The gateway lost its connection to Redis and is "
                                              "reconnecting; retry shortly.") from None
        stream = RequestStream([r.req_id for r in reqs])
        ticket = admission.current()
        for r in reqs:
            self._routes[r.req_id] = _Route(stream, ticket, len(r.prompt_token_ids))
        if ticket is not None and ticket.deadline is not None:
            # One timer per HTTP request (nothing on the per-token path); the ticket cancels it.
            timeout = ticket.timeout_s

            def expired() -> None:
                if stream.error is None:  # not ended already (the drain)
                    ticket.admission.deadlines_exceeded += 1
                self.interrupt(stream, DeadlineExceededError(
                    f"The request did not finish within its deadline of {timeout:g}s "
                    "(--request-timeout, or the body's request_timeout); it was aborted."))

            ticket.timer = asyncio.get_running_loop().call_at(
                asyncio.get_running_loop().time() + max(0.0, ticket.deadline - time.monotonic()), expired)
        try:
            async with self._submit_slots:
                for r in reqs:
                    await self.bus.submit(r)
        except BaseException as e:
            self.abort(stream.req_ids)
            if isinstance(e, Exception) and is_outage(e):
                raise ServiceUnavailableError("The gateway lost its connection to Redis; retry "
                                              "shortly.") from e
            raise
        return stream

    def abort(self, req_ids: list[str]) -> None:
        """Stop routing these requests and tell the engines (sync: safe in `finally`)."""
        to_abort = [rid for rid in req_ids if self._drop(rid)]
        if to_abort:
            self._pending_aborts.extend(to_abort)
            self._abort_event.set()

    def finished(self, req_id: str) -> None:
        """The engine finished this request: stop routing it (no abort needed)."""
        self._drop(req_id)

    def _drop(self, req_id: str) -> bool:
        route = self._routes.pop(req_id, None)
        if route is None:
            return False
        if route.ticket is not None:
            route.ticket.started(route.prompt_len)  # ends while queued: leaves the queue
            route.ticket = None
        return True

    def interrupt(self, stream: RequestStream, error: APIError) -> None:
        """End an HTTP request's stream with `error` (its deadline passed, or the drain ended):
        abort its unfinished engine requests (the schedulers free their KV blocks) and make its
        handler's next read raise, after the deltas already queued."""
        if stream.error is not None:
            return
        stream.error = error
        self.abort(stream.req_ids)
        stream.queue.put_nowait(_INTERRUPT)  # type: ignore[arg-type]

    def interrupt_all(self, error: APIError) -> int:
        """Interrupt every stream in flight; how many there were."""
        streams = {id(r.stream): r.stream for r in self._routes.values()}
        for stream in streams.values():
            self.interrupt(stream, error)
        return len(streams)

    # ------------------------------------------------------------------ background tasks
    async def _subscriber(self) -> None:
        while not self._stopping:
            try:
                async for batch in self.bus.token_batches(self.gateway_id, self._subscribed.set):
                    self._route(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # Deltas may have been lost while the connection was down: the requests in
                # flight cannot be completed faithfully, so fail them rather than hang. New
                # requests wait (submit) until the subscription is back.
                self._subscribed.clear()
                log.error("token subscription failed (%s: %s); resubscribing", type(e).__name__, e)
                self._fail_all(f"lost the connection to the token stream: {e or type(e).__name__}")
                await asyncio.sleep(0.1)  # at least: a bug that fails every time must not spin
                await self.bus.wait_for_redis(what=f"gateway {self.gateway_id}")

    def _route(self, batch: TokenBatch) -> None:
        routes = self._routes
        for delta in batch.deltas:
            route = routes.get(delta.req_id)
            if route is None:
                continue  # aborted, or another gateway's leftover
            if batch.engine_id:
                route.engine_id = batch.engine_id
                route.stream.engines[delta.req_id] = batch.engine_id
            ended = bool(delta.finish_reason or delta.error)
            seen = route.next_index - delta.index
            if seen > 0 and delta.token_ids:
                # A resumed request re-sends what it had generated: pass on only what is new.
                if seen >= len(delta.token_ids) and not ended:
                    continue
                delta = msgspec.structs.replace(
                    delta, token_ids=delta.token_ids[seen:], index=route.next_index,
                    logprobs=delta.logprobs[seen:] if delta.logprobs else [])
            elif seen < 0:
                log.error("request %s: tokens %d..%d never arrived", delta.req_id, route.next_index,
                          delta.index - 1)
            if route.ticket is not None:
                route.ticket.started(route.prompt_len)  # its first token: no longer queued
                route.ticket = None
            route.next_index = max(route.next_index, delta.index + len(delta.token_ids))
            route.stalled_since = None
            if ended:
                del routes[delta.req_id]
            route.stream.queue.put_nowait(delta)

    async def _aborter(self) -> None:
        while not self._stopping:
            await self._abort_event.wait()
            if not await self._flush_aborts():
                # Redis is away: an engine that kept the requests would compute them to the
                # end for nobody. Send the aborts once it is back.
                await self.bus.wait_for_redis(what=f"gateway {self.gateway_id} aborts")

    async def _flush_aborts(self) -> bool:
        """Publish the queued aborts; False (they stay queued) if Redis is unreachable."""
        self._abort_event.clear()
        ids, self._pending_aborts = self._pending_aborts, []
        if not ids:
            return True
        try:
            await asyncio.wait_for(self.bus.publish_abort(ids), _REDIS_TIMEOUT_S)
        except Exception as e:
            log.error("could not publish abort of %d request(s): %s", len(ids), e)
            if is_outage(e):
                self._pending_aborts[:0] = ids[-_MAX_PENDING_ABORTS:]
                self._abort_event.set()
                return False
        return True

    async def _watchdog(self) -> None:
        # Often enough to renew the lease twice more before it expires.
        interval = min(self._watchdog_interval_s, self._lease_ttl_s / 3)
        while not self._stopping:
            await asyncio.sleep(interval)
            await self._hold_lease()
            if self._routes:
                alive = {e.engine_id for e in await self.engines(fresh=True)}
                self._check_routes(alive, time.monotonic())

    def _check_routes(self, alive: set[str], now: float) -> None:
        """End requests nothing can finish: the engine that served it is gone (or, before
        any token, no engine is alive) and no engine has resumed it for resume_timeout_s."""
        doomed = []
        for req_id, route in self._routes.items():
            if (route.engine_id in alive) if route.engine_id else bool(alive):
                route.stalled_since = None
            elif route.stalled_since is None:
                route.stalled_since = now
            elif now - route.stalled_since >= self._resume_timeout_s:
                doomed.append(req_id)
        if doomed:
            why = ("the engine serving the request failed and no engine resumed it within "
                   f"{self._resume_timeout_s:g}s")
            self._fail(doomed, why)

    def _fail_all(self, message: str) -> None:
        self._fail(list(self._routes), message)

    def _fail(self, req_ids: list[str], message: str) -> None:
        for rid in req_ids:
            route = self._routes[rid]
            self._drop(rid)
            route.stream.queue.put_nowait(TokenDelta(req_id=rid, token_ids=[], index=route.next_index,
                                                     error=message))
        if req_ids:
            self._pending_aborts.extend(req_ids)
            self._abort_event.set()
