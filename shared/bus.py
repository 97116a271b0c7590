"""The Redis bus: every key folio uses, and typed send/receive over them.

Keys (namespace `ns`, default "folio"):
    {ns}:requests                 stream, consumer group "schedulers"   GenerateRequest
    {ns}:aborts                   pub/sub                                AbortRequest
    {ns}:engine:{e}:steps         stream                                 StepPlan
    {ns}:engine:{e}:results       stream                                 StepResult
    {ns}:gateway:{g}:tokens       pub/sub                                TokenBatch
    {ns}:engines                  hash engine_id -> EngineInfo
    {ns}:engine:{e}:alive         string with TTL (heartbeat)
    {ns}:engine:{e}:stats         string with TTL                        EngineStats
    {ns}:engine:{e}:ranks         hash tp_rank -> EngineInfo (executors, read by their scheduler)
    {ns}:engine:{e}:rank:{r}:alive string with TTL (executor heartbeat)
    {ns}:engine:{e}:tokens        stream: the engine's durable token log   TokenBatch
    {ns}:deadletter               stream: messages no service could decode (source, id, error, raw)

The scheduler registers its engine in {ns}:engines once all its executor ranks have
registered in {ns}:engine:{e}:ranks, so a gateway only ever sees engines ready to serve.

Every stream entry has one field, b"m", holding the msgpack message.

Every message read from Redis goes through one decoder (`Bus._decode`) with one policy:
a message that does not decode is logged, copied to the dead-letter stream, and handed
to the caller as a `Malformed` value (with its raw bytes, so the caller can still answer
for it, e.g. fail the step it names); no service dies of a bad message.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.protocol import (
    AbortRequest,
    EngineInfo,
    EngineStats,
    GenerateRequest,
    StepPlan,
    StepResult,
    TokenBatch,
    decode,
    encode,
)

log = logging.getLogger(__name__)

SCHEDULER_GROUP = "schedulers"
_FIELD = b"m"
DEADLETTER_MAXLEN = 10_000
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 1.0  # the cap: a service is back within about a second of Redis

M = TypeVar("M", bound=msgspec.Struct)


def is_outage(e: BaseException) -> bool:
    """True for errors that mean Redis went away (or came back empty), not a bug: a lost or
    refused connection, a timeout, Redis still loading its data, and a consumer group or
    stream that vanished with a restart (NOGROUP)."""
    if isinstance(e, AuthenticationError | AuthorizationError) or "authenticated" in str(e):
        # A wrong or missing password (redis-py reports the latter as a ConnectionError) is a
        # configuration error: waiting will not fix it.
        return False
    if isinstance(e, RedisConnectionError | RedisTimeoutError | ConnectionError | asyncio.TimeoutError):
        return True
    return isinstance(e, ResponseError) and str(e).startswith(("NOGROUP", "LOADING"))


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


@dataclass(frozen=True, slots=True)
class Malformed:
    """A message that did not decode (already logged and dead-lettered)."""

    raw: bytes
    error: str

    def header(self, type_: type[M]) -> M | None:
        """The leading fields of the message, if at least those decode (see protocol's *Header)."""
        try:
            return decode(self.raw, type_)
        except msgspec.MsgspecError:
            return None


_HOLD_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if cur then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Keys:
    def __init__(self, namespace: str = "folio") -> None:
        self.ns = namespace
        self.requests = f"{namespace}:requests"
        self.aborts = f"{namespace}:aborts"
        self.engines = f"{namespace}:engines"
        self.deadletter = f"{namespace}:deadletter"

    def steps(self, engine_id: str) -> str:
        return f"{self.ns}:engine:{engine_id}:steps"

    def results(self, engine_id: str) -> str:
        return f"{self.ns}:engine:{engine_id}:results"

    def alive(self, engine_id: str) -> str:
        return f"{self.ns}:engine:{engine_id}:alive"

    def stats(self, engine_id: str) -> str:
        return f"{self.ns}:engine:{engine_id}:stats"

    def ranks(self, engine_id: str) -> str:
        return f"{self.ns}:engine:{engine_id}:ranks"

    def rank_alive(self, engine_id: str, tp_rank: int) -> str:
        return f"{self.ns}:engine:{engine_id}:rank:{tp_rank}:alive"

    def token_log(self, engine_id: str) -> str:
        return f"{self.ns}:engine:{engine_id}:tokens"

    def gateway_tokens(self, gateway_id: str) -> str:
        return f"{self.ns}:gateway:{gateway_id}:tokens"

    @property
    def metrics_exporter(self) -> str:
        """The gateway that exports the engine series on its /metrics (a lease: its id, PX)."""
        return f"{self.ns}:metrics:engine-exporter"


class Bus:
    """One Redis connection pool plus the typed operations of every service."""

    def __init__(self, url: str, namespace: str = "folio") -> None:
        self.url = url
        self.keys = Keys(namespace)
        # No automatic retries (see the module doc); a connect that hangs is an outage too.
        self.redis: aioredis.Redis = aioredis.from_url(
            url, decode_responses=False, retry=Retry(NoBackoff(), 0), socket_connect_timeout=5)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def wait_for_redis(self, stopping: Callable[[], bool] = lambda: False, what: str = "") -> bool:
        """Block until Redis answers PING, retrying with capped exponential backoff (with
        jitter, so a fleet of services does not reconnect in lockstep); False if `stopping()`
        turned true first. Logs when it is lost and when it is back."""
        delay, t0, last_log = RECONNECT_MIN_S, time.monotonic(), 0.0
        while not stopping():
            try:
                await asyncio.wait_for(self.redis.ping(), 2.0)
                if time.monotonic() - t0 > delay:
                    log.warning("%sRedis is back after %.1fs", what and what + ": ", time.monotonic() - t0)
                return True
            except Exception as e:
                if not is_outage(e):
                    raise
                if time.monotonic() - last_log > 10:
                    log.warning("%sRedis at %s unreachable (%s); retrying", what and what + ": ",
                                redacted(self.url), e or type(e).__name__)
                    last_log = time.monotonic()
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, RECONNECT_MAX_S)
        return False

    # ------------------------------------------------------------ the one decoder
    async def _decode(self, source: str, entry_id: bytes | None, data, type_: type[M]) -> M | Malformed:
        try:
            if not isinstance(data, bytes):
                raise msgspec.DecodeError(f"expected a bytes payload, got {type(data).__name__}")
            return decode(data, type_)
        except msgspec.MsgspecError as e:
            raw = data if isinstance(data, bytes) else b""
            where = f"{source} {entry_id.decode()}" if entry_id else source
            log.error("malformed %s on %s: %s (moved to %s)", type_.__name__, where, e, self.keys.deadletter)
            try:
                await self.redis.xadd(self.keys.deadletter, {
                    b"source": source.encode(), b"id": entry_id or b"", b"type": type_.__name__.encode(),
                    b"error": str(e).encode(), _FIELD: raw,
                }, maxlen=DEADLETTER_MAXLEN, approximate=True)
            except Exception as dl:  # dead-lettering is best effort: the log line stays
                log.warning("could not dead-letter it: %s", dl)
            return Malformed(raw, str(e))

    async def _decode_entries(self, key: str, resp, type_: type[M]) -> list[tuple[bytes, M | Malformed]]:
        out: list[tuple[bytes, M | Malformed]] = []
        for _stream, entries in resp or []:
            for msg_id, fields in entries:
                # A deleted entry still pending in a group comes back with fields None.
                out.append((msg_id, await self._decode(key, msg_id, (fields or {}).get(_FIELD), type_)))
        return out

    async def _first_entry(self, key: str, resp, type_: type[M]) -> tuple[bytes, M | Malformed] | None:
        entries = await self._decode_entries(key, resp, type_)
        return entries[0] if entries else None

    # ------------------------------------------------------------ gateway side
    async def submit(self, req: GenerateRequest) -> None:
        await self.redis.xadd(self.keys.requests, {_FIELD: encode(req)})

    async def publish_abort(self, req_ids: list[str]) -> None:
        if req_ids:
            await self.redis.publish(self.keys.aborts, encode(AbortRequest(req_ids=req_ids)))

    async def token_batches(
        self, gateway_id: str, on_subscribed: Callable[[], None] | None = None
    ) -> AsyncIterator[TokenBatch]:
        """Yield TokenBatch messages from this gateway's channel until cancelled (or the
        connection is lost: then the error is raised). `on_subscribed` is called once Redis
        has confirmed the subscription, i.e. once nothing published to it can be missed."""
        channel = self.keys.gateway_tokens(gateway_id)
        async for data in self._subscribe(channel, on_subscribed):
            msg = await self._decode(channel, None, data, TokenBatch)
            if not isinstance(msg, Malformed):
                yield msg

    async def live_engines(self) -> list[EngineInfo]:
        """Registered engines whose heartbeat has not expired."""
        raw = await self.redis.hgetall(self.keys.engines)
        if not raw:
            return []
        ids = list(raw)
        alive = await self.redis.mget([self.keys.alive(e.decode()) for e in ids])
        engines = []
        for engine_id, beat in zip(ids, alive, strict=True):
            if beat is None:
                continue
            info = await self._decode(self.keys.engines, engine_id, raw[engine_id], EngineInfo)
            if not isinstance(info, Malformed):
                engines.append(info)
        return engines

    async def engine_stats(self) -> list[EngineStats]:
        out = []
        for info in await self.live_engines():
            stats = await self.engine_stats_of(info.engine_id)
            if stats is not None:
                out.append(stats)
        return out

    async def engine_stats_of(self, engine_id: str) -> EngineStats | None:
        """One engine's last published stats (None: none, expired, or malformed)."""
        key = self.keys.stats(engine_id)
        data = await self.redis.get(key)
        if data is None:
            return None
        stats = await self._decode(key, None, data, EngineStats)
        return None if isinstance(stats, Malformed) else stats

    # ------------------------------------------------------------ scheduler side
    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.requests, SCHEDULER_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def claim_requests(
        self, consumer: str, count: int = 64, block_ms: int | None = None
    ) -> list[tuple[bytes, GenerateRequest | Malformed]]:
        """New requests for this consumer. A malformed entry comes back as Malformed so the
        caller acknowledges it and answers its gateway if it can; it is never half-applied."""
        return await self._read_group(consumer, ">", count, block_ms)

    async def pending_requests(
        self, consumer: str, count: int = 1000
    ) -> list[tuple[bytes, GenerateRequest | Malformed]]:
        """Requests this consumer claimed earlier and never acknowledged (e.g. before a crash)."""
        return await self._read_group(consumer, "0", count, None)

    async def _read_group(
        self, consumer: str, start: str, count: int, block_ms: int | None
    ) -> list[tuple[bytes, GenerateRequest | Malformed]]:
        resp = await self.redis.xreadgroup(
            SCHEDULER_GROUP, consumer, {self.keys.requests: start}, count=count, block=block_ms
        )
        return await self._decode_entries(self.keys.requests, resp, GenerateRequest)

    async def dead_consumers(self) -> list[str]:
        """Consumers of the request stream holding unfinished requests whose engine heartbeat
        has expired: their requests are for a live engine to take over."""
        consumers = await self.redis.xinfo_consumers(self.keys.requests, SCHEDULER_GROUP)
        names = [c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                 for c in consumers if c["pending"] > 0]
        if not names:
            return []
        alive = await self.redis.mget([self.keys.alive(n) for n in names])
        return [n for n, a in zip(names, alive, strict=True) if a is None]

    async def take_over(
        self, dead: str, consumer: str, min_idle_ms: int, count: int = 1000,
        exclude: frozenset[bytes] | set[bytes] = frozenset(),
    ) -> list[tuple[bytes, GenerateRequest | Malformed]]:
        """XCLAIM a dead consumer's unfinished requests for `consumer`, except the entries in
        `exclude` (those a live consumer is serving: never claimed, never fetched). min_idle_ms
        makes the claim exclusive: a claim resets an entry's idle time, so a second engine
        racing for the same entries right after gets none of them."""
        pending = await self.redis.xpending_range(
            self.keys.requests, SCHEDULER_GROUP, min="-", max="+", count=count + len(exclude),
            consumername=dead)
        ids = [p["message_id"] for p in pending if p["message_id"] not in exclude]
        if not ids:
            return []
        claimed = await self.redis.xclaim(self.keys.requests, SCHEDULER_GROUP, consumer, min_idle_ms, ids)
        key = self.keys.requests
        return await self._decode_entries(key, [(key, claimed)], GenerateRequest)

    async def subscribers(self, channels: list[str]) -> dict[str, int]:
        """How many subscribers each channel has (one PUBSUB NUMSUB)."""
        if not channels:
            return {}
        counts = await self.redis.pubsub_numsub(*channels)
        return {(c.decode() if isinstance(c, bytes) else c): int(n) for c, n in counts}

    async def ack_request(self, *msg_ids: bytes) -> None:
        if msg_ids:
            await self.redis.xack(self.keys.requests, SCHEDULER_GROUP, *msg_ids)

    async def retire_requests(
        self, *msg_ids: bytes, engine_id: str = "", log_min_id: bytes | None = None
    ) -> None:
        """Acknowledge and delete finished requests' entries (one round trip), so the
        requests stream holds only work in flight and does not grow without bound; with
        `engine_id`, also trim that engine's token log below `log_min_id` (the oldest
        request entry still unfinished on it: its tokens were all logged after it), or
        empty it when `log_min_id` is None."""
        if not msg_ids and not engine_id:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            if msg_ids:
                pipe.xack(self.keys.requests, SCHEDULER_GROUP, *msg_ids)
                pipe.xdel(self.keys.requests, *msg_ids)
            if engine_id:
                key = self.keys.token_log(engine_id)
                if log_min_id is None:
                    pipe.xtrim(key, maxlen=0)
                else:
                    pipe.xtrim(key, minid=log_min_id)
            await pipe.execute()

    async def read_token_log(self, engine_id: str) -> list[TokenBatch]:
        """An engine's whole token log, oldest first (read to resume its requests)."""
        key = self.keys.token_log(engine_id)
        entries = await self.redis.xrange(key)
        out = []
        for msg_id, fields in entries:
            msg = await self._decode(key, msg_id, fields.get(_FIELD), TokenBatch)
            if not isinstance(msg, Malformed):
                out.append(msg)
        return out

    async def log_and_publish(self, engine_id: str, batches: dict[str, TokenBatch]) -> None:
        """Append deltas to an engine's token log, then publish them to their gateways, in
        one round trip (used when a scheduler resumes requests or answers for them)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            self._log_and_publish(pipe, engine_id, batches)
            await pipe.execute()

    def _log_and_publish(self, pipe, engine_id: str, batches: dict[str, TokenBatch]) -> None:
        # The log entry goes first: Redis runs a pipeline in order, so whatever reached a
        # gateway is already in the log, whatever happens to this process mid-pipeline.
        if not batches:
            return
        deltas = [d for b in batches.values() for d in b.deltas]
        entry = encode(TokenBatch(deltas=deltas, engine_id=engine_id))
        pipe.xadd(self.keys.token_log(engine_id), {_FIELD: entry})
        for channel, batch in batches.items():
            if channel:
                pipe.publish(channel, encode(batch))

    # Atomic, so an engine restarting under the same id between the checks keeps its log.
    _FORGET = """
    if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
    if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
    return redis.call('DEL', KEYS[3])
    """

    _TRIM_IF_IDLE = """
    if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
    return redis.call('XTRIM', KEYS[2], 'MAXLEN', 0)
    """

    async def trim_idle_log(self, engine_id: str) -> None:
        """Empty an engine's token log if it holds no request at all (a restarted engine's
        log from before, once everything in it was resumed or finished)."""
        keys = [self.keys.requests, self.keys.token_log(engine_id)]
        await self.redis.eval(self._TRIM_IF_IDLE, 2, *keys, SCHEDULER_GROUP, engine_id)

    async def forget_engine(self, engine_id: str) -> bool:
        """Drop the token log of an engine that is dead and has no request pending any more
        (everything it held was taken over). True if it was dropped."""
        keys = [self.keys.requests, self.keys.alive(engine_id), self.keys.token_log(engine_id)]
        return bool(await self.redis.eval(self._FORGET, 3, *keys, SCHEDULER_GROUP, engine_id))

    async def aborts(self) -> AsyncIterator[AbortRequest]:
        async for data in self._subscribe(self.keys.aborts):
            msg = await self._decode(self.keys.aborts, None, data, AbortRequest)
            if not isinstance(msg, Malformed):
                yield msg

    async def send_step(self, engine_id: str, plan: StepPlan) -> None:
        # Executors read every entry; old entries are only kept for a late-starting rank.
        await self.redis.xadd(
            self.keys.steps(engine_id), {_FIELD: encode(plan)}, maxlen=1000, approximate=True
        )

    async def read_result(
        self, engine_id: str, last_id: bytes | str, block_ms: int = 0
    ) -> tuple[bytes, StepResult | Malformed] | None:
        key = self.keys.results(engine_id)
        resp = await self.redis.xread({key: last_id}, count=1, block=block_ms)
        return await self._first_entry(key, resp, StepResult)

    async def send_step_and_read_result(
        self,
        engine_id: str,
        plan: StepPlan,
        last_result_id: bytes | str,
        block_ms: int,
        claim: tuple[str, int] | None = None,
    ) -> tuple[list[tuple[bytes, GenerateRequest | Malformed]], tuple[bytes, StepResult | Malformed] | None]:
        """One round trip for a whole step: XADD the plan, claim up to `claim = (consumer,
        count)` new requests (taken while the executors compute), then block up to
        `block_ms` for the next result. Returns (claimed, (result id, result) or None on
        timeout)."""
        key = self.keys.results(engine_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.keys.steps(engine_id), {_FIELD: encode(plan)}, maxlen=1000, approximate=True)
            if claim is not None:
                pipe.xreadgroup(SCHEDULER_GROUP, claim[0], {self.keys.requests: ">"}, count=claim[1])
            pipe.xread({key: last_result_id}, count=1, block=block_ms)
            replies = await pipe.execute()
        claimed = []
        if claim is not None:
            claimed = await self._decode_entries(self.keys.requests, replies[1], GenerateRequest)
        return claimed, await self._first_entry(key, replies[-1], StepResult)

    async def hold_lease(self, key: str, holder: str, ttl_s: float) -> bool:
        """Take the lease `key` for `holder` if nobody holds it, or renew it if `holder` does;
        True if `holder` holds it for the next ttl_s. One atomic script: a renewal never
        overwrites a lease that expired and another holder took meanwhile."""
        return bool(await self.redis.eval(_HOLD_LEASE, 1, key, holder, int(ttl_s * 1000)))

    async def release_lease(self, key: str, holder: str) -> bool:
        """Give the lease up if `holder` still holds it (so another can take it at once)."""
        return bool(await self.redis.eval(_RELEASE_LEASE, 1, key, holder))

    async def publish_stats(self, stats: EngineStats, ttl_s: float = 10.0) -> None:
        await self.redis.set(self.keys.stats(stats.engine_id), encode(stats), px=int(ttl_s * 1000))

    async def stream_tail_id(self, key: str) -> bytes:
        """The id of the newest entry of a stream (b"0-0" if empty): read after it for new entries."""
        info = await self.redis.xrevrange(key, count=1)
        return info[0][0] if info else b"0-0"

    # ------------------------------------------------------------ executor side
    async def read_step(
        self, engine_id: str, last_id: bytes | str, block_ms: int = 0
    ) -> tuple[bytes, StepPlan | Malformed] | None:
        key = self.keys.steps(engine_id)
        resp = await self.redis.xread({key: last_id}, count=1, block=block_ms)
        return await self._first_entry(key, resp, StepPlan)

    async def finish_step_and_read_next(
        self, engine_id: str, result: StepResult | None, batches: dict[str, TokenBatch],
        last_id: bytes | str, block_ms: int,
    ) -> tuple[bytes, StepPlan | Malformed] | None:
        """One round trip per step for rank 0: log the step's deltas (one entry, whatever the
        number of requests), PUBLISH them, XADD the result, then block for the next plan.
        Redis runs the pipeline in order, so by the time the scheduler reads the result the
        tokens are in the log: when it retires a finished request and trims the log, no
        entry of that request can still arrive."""
        key = self.keys.steps(engine_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            self._log_and_publish(pipe, engine_id, batches)
            if result is not None:
                pipe.xadd(self.keys.results(engine_id), {_FIELD: encode(result)},
                          maxlen=1000, approximate=True)
            pipe.xread({key: last_id}, count=1, block=block_ms)
            replies = await pipe.execute()
        return await self._first_entry(key, replies[-1], StepPlan)

    async def publish_tokens(self, channel: str, batch: TokenBatch) -> None:
        """A reply that is not part of any engine's token stream (e.g. a rejected request)."""
        await self.redis.publish(channel, encode(batch))

    async def register_engine(self, info: EngineInfo, ttl_s: float = 10.0) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.engines, info.engine_id, encode(info))
            pipe.set(self.keys.alive(info.engine_id), b"1", px=int(ttl_s * 1000))
            await pipe.execute()

    async def heartbeat(self, engine_id: str, ttl_s: float = 10.0) -> None:
        await self.redis.set(self.keys.alive(engine_id), b"1", px=int(ttl_s * 1000))

    async def unregister_engine(self, engine_id: str) -> None:
        await self.redis.hdel(self.keys.engines, engine_id)
        await self.redis.delete(self.keys.alive(engine_id), self.keys.stats(engine_id))

    async def register_rank(self, info: EngineInfo, ttl_s: float = 5.0) -> None:
        """An executor rank announces itself to its scheduler (not to gateways); its heartbeat
        key holds its incarnation."""
        await self.redis.hset(self.keys.ranks(info.engine_id), str(info.tp_rank), encode(info))
        await self.rank_heartbeat(info.engine_id, info.tp_rank, ttl_s, info.incarnation)

    async def rank_heartbeat(self, engine_id: str, tp_rank: int, ttl_s: float = 5.0,
                             incarnation: str = "") -> None:
        await self.redis.set(self.keys.rank_alive(engine_id, tp_rank), incarnation.encode() or b"1",
                             px=int(ttl_s * 1000))

    async def live_ranks(self, engine_id: str) -> list[EngineInfo]:
        """Registered executor ranks of one engine whose heartbeat has not expired, by rank."""
        key = self.keys.ranks(engine_id)
        raw = await self.redis.hgetall(key)
        infos = []
        for rank, data in raw.items():
            info = await self._decode(key, rank, data, EngineInfo)
            if not isinstance(info, Malformed):
                infos.append(info)
        infos.sort(key=lambda i: i.tp_rank)
        if not infos:
            return []
        alive = await self.redis.mget([self.keys.rank_alive(engine_id, i.tp_rank) for i in infos])
        return [i for i, a in zip(infos, alive, strict=True)
                if a is not None and a == (i.incarnation.encode() or b"1")]

    async def lost_ranks(self, engine_id: str, incarnations: list[str]) -> list[int]:
        """Ranks (of 0..len(incarnations)-1) whose heartbeat expired or now belongs to another
        incarnation than the one given (one round trip)."""
        keys = [self.keys.rank_alive(engine_id, r) for r in range(len(incarnations))]
        beats = await self.redis.mget(keys)
        return [r for r, (beat, inc) in enumerate(zip(beats, incarnations, strict=True))
                if beat != (inc.encode() or b"1")]

    async def unregister_rank(self, engine_id: str, tp_rank: int) -> None:
        await self.redis.hdel(self.keys.ranks(engine_id), str(tp_rank))
        await self.redis.delete(self.keys.rank_alive(engine_id, tp_rank))

    # ------------------------------------------------------------ helpers
    async def _subscribe(
        self, channel: str, on_subscribed: Callable[[], None] | None = None
    ) -> AsyncIterator[bytes]:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is None:
                    continue
                if msg["type"] == "message":
                    yield msg["data"]
                elif msg["type"] == "subscribe" and on_subscribed is not None:
                    on_subscribed()
        finally:
            try:
                await pubsub.unsubscribe(channel)
            except Exception:  # the connection is gone: nothing to unsubscribe from
                pass
            await pubsub.aclose()
