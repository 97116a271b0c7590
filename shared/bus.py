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

The scheduler registers its engine in {ns}:engines once all its executor ranks have
registered in {ns}:engine:{e}:ranks, so a gateway only ever sees engines ready to serve.

Every stream entry has one field, b"m", holding the msgpack message.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

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


class Keys:
    def __init__(self, namespace: str = "folio") -> None:
        self.ns = namespace
        self.requests = f"{namespace}:requests"
        self.aborts = f"{namespace}:aborts"
        self.engines = f"{namespace}:engines"

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

    def gateway_tokens(self, gateway_id: str) -> str:
        return f"{self.ns}:gateway:{gateway_id}:tokens"


class Bus:
    """One Redis connection pool plus the typed operations of every service."""

    def __init__(self, url: str, namespace: str = "folio") -> None:
        self.url = url
        self.keys = Keys(namespace)
        self.redis: aioredis.Redis = aioredis.from_url(url, decode_responses=False)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # ------------------------------------------------------------ gateway side
    async def submit(self, req: GenerateRequest) -> None:
        await self.redis.xadd(self.keys.requests, {_FIELD: encode(req)})

    async def publish_abort(self, req_ids: list[str]) -> None:
        if req_ids:
            await self.redis.publish(self.keys.aborts, encode(AbortRequest(req_ids=req_ids)))

    async def token_batches(self, gateway_id: str) -> AsyncIterator[TokenBatch]:
        """Yield TokenBatch messages from this gateway's channel until cancelled."""
        async for data in self._subscribe(self.keys.gateway_tokens(gateway_id)):
            try:
                yield decode(data, TokenBatch)
            except msgspec.MsgspecError as e:
                log.error("dropping malformed token batch: %s", e)

    async def live_engines(self) -> list[EngineInfo]:
        """Registered engines whose heartbeat has not expired."""
        raw = await self.redis.hgetall(self.keys.engines)
        engines = []
        for engine_id, data in raw.items():
            if await self.redis.exists(self.keys.alive(engine_id.decode())):
                engines.append(decode(data, EngineInfo))
        return engines

    async def engine_stats(self) -> list[EngineStats]:
        out = []
        for info in await self.live_engines():
            data = await self.redis.get(self.keys.stats(info.engine_id))
            if data is not None:
                out.append(decode(data, EngineStats))
        return out

    # ------------------------------------------------------------ scheduler side
    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.requests, SCHEDULER_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def claim_requests(
        self, consumer: str, count: int = 64, block_ms: int | None = None
    ) -> list[tuple[bytes, GenerateRequest | None]]:
        """New requests for this consumer. A malformed entry comes back as (id, None) so the
        caller acknowledges it and moves on; it is never half-applied."""
        return await self._read_group(consumer, ">", count, block_ms)

    async def pending_requests(
        self, consumer: str, count: int = 1000
    ) -> list[tuple[bytes, GenerateRequest | None]]:
        """Requests this consumer claimed earlier and never acknowledged (e.g. before a crash)."""
        return await self._read_group(consumer, "0", count, None)

    async def _read_group(
        self, consumer: str, start: str, count: int, block_ms: int | None
    ) -> list[tuple[bytes, GenerateRequest | None]]:
        resp = await self.redis.xreadgroup(
            SCHEDULER_GROUP, consumer, {self.keys.requests: start}, count=count, block=block_ms
        )
        return self._decode_requests(resp)

    @staticmethod
    def _decode_requests(resp) -> list[tuple[bytes, GenerateRequest | None]]:
        out: list[tuple[bytes, GenerateRequest | None]] = []
        for _stream, entries in resp or []:
            for msg_id, fields in entries:
                try:
                    out.append((msg_id, decode(fields[_FIELD], GenerateRequest)))
                except (msgspec.MsgspecError, KeyError, TypeError) as e:  # TypeError: a deleted entry
                    log.error("malformed request %s: %s", msg_id, e)
                    out.append((msg_id, None))
        return out

    async def read_request_raw(self, msg_id: bytes) -> bytes | None:
        """The raw payload of one request entry (to salvage the reply channel of a malformed one)."""
        entries = await self.redis.xrange(self.keys.requests, msg_id, msg_id, count=1)
        return entries[0][1].get(_FIELD) if entries else None

    async def ack_request(self, *msg_ids: bytes) -> None:
        if msg_ids:
            await self.redis.xack(self.keys.requests, SCHEDULER_GROUP, *msg_ids)

    async def retire_requests(self, *msg_ids: bytes) -> None:
        """Acknowledge and delete finished requests' entries (one round trip), so the
        requests stream holds only work in flight and does not grow without bound."""
        if msg_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(self.keys.requests, SCHEDULER_GROUP, *msg_ids)
                pipe.xdel(self.keys.requests, *msg_ids)
                await pipe.execute()

    async def aborts(self) -> AsyncIterator[AbortRequest]:
        async for data in self._subscribe(self.keys.aborts):
            try:
                yield decode(data, AbortRequest)
            except msgspec.MsgspecError as e:
                log.error("dropping malformed abort: %s", e)

    async def send_step(self, engine_id: str, plan: StepPlan) -> None:
        # Executors read every entry; old entries are only kept for a late-starting rank.
        await self.redis.xadd(
            self.keys.steps(engine_id), {_FIELD: encode(plan)}, maxlen=1000, approximate=True
        )

    async def read_result(
        self, engine_id: str, last_id: bytes | str, block_ms: int = 0
    ) -> tuple[bytes, StepResult] | None:
        resp = await self.redis.xread({self.keys.results(engine_id): last_id}, count=1, block=block_ms)
        for _stream, entries in resp or []:
            for msg_id, fields in entries:
                return msg_id, decode(fields[_FIELD], StepResult)
        return None

    async def send_step_and_read_result(
        self,
        engine_id: str,
        plan: StepPlan,
        last_result_id: bytes | str,
        block_ms: int,
        claim: tuple[str, int] | None = None,
    ) -> tuple[list[tuple[bytes, GenerateRequest | None]], tuple[bytes, StepResult | None] | None]:
        """One round trip for a whole step: XADD the plan, claim up to `claim = (consumer,
        count)` new requests (taken while the executors compute), then block up to
        `block_ms` for the next result. Returns (claimed, (result id, result) or None on
        timeout); a malformed result comes back as (id, None)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.keys.steps(engine_id), {_FIELD: encode(plan)}, maxlen=1000, approximate=True)
            if claim is not None:
                pipe.xreadgroup(SCHEDULER_GROUP, claim[0], {self.keys.requests: ">"}, count=claim[1])
            pipe.xread({self.keys.results(engine_id): last_result_id}, count=1, block=block_ms)
            replies = await pipe.execute()
        claimed = self._decode_requests(replies[1]) if claim is not None else []
        for _stream, entries in replies[-1] or []:
            for msg_id, fields in entries:
                try:
                    return claimed, (msg_id, decode(fields[_FIELD], StepResult))
                except (msgspec.MsgspecError, KeyError) as e:
                    log.error("malformed step result %s: %s", msg_id, e)
                    return claimed, (msg_id, None)
        return claimed, None

    async def publish_stats(self, stats: EngineStats, ttl_s: float = 10.0) -> None:
        await self.redis.set(self.keys.stats(stats.engine_id), encode(stats), px=int(ttl_s * 1000))

    async def stream_tail_id(self, key: str) -> bytes:
        """The id of the newest entry of a stream (b"0-0" if empty): read after it for new entries."""
        info = await self.redis.xrevrange(key, count=1)
        return info[0][0] if info else b"0-0"

    # ------------------------------------------------------------ executor side
    async def read_step(
        self, engine_id: str, last_id: bytes | str, block_ms: int = 0
    ) -> tuple[bytes, StepPlan] | None:
        resp = await self.redis.xread({self.keys.steps(engine_id): last_id}, count=1, block=block_ms)
        for _stream, entries in resp or []:
            for msg_id, fields in entries:
                return msg_id, decode(fields[_FIELD], StepPlan)
        return None

    async def publish_tokens_and_read_step(
        self, batches: dict[str, TokenBatch], engine_id: str, last_id: bytes | str, block_ms: int
    ) -> tuple[bytes, StepPlan] | None:
        """PUBLISH token batches, then block for the next step, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, batch in batches.items():
                pipe.publish(channel, encode(batch))
            pipe.xread({self.keys.steps(engine_id): last_id}, count=1, block=block_ms)
            replies = await pipe.execute()
        for _stream, entries in replies[-1] or []:
            for msg_id, fields in entries:
                return msg_id, decode(fields[_FIELD], StepPlan)
        return None

    async def send_result(self, engine_id: str, result: StepResult) -> None:
        await self.redis.xadd(
            self.keys.results(engine_id), {_FIELD: encode(result)}, maxlen=1000, approximate=True
        )

    async def publish_tokens(self, channel: str, batch: TokenBatch) -> None:
        await self.redis.publish(channel, encode(batch))

    async def publish_token_batches(self, batches: dict[str, TokenBatch]) -> None:
        """Several gateways' batches in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, batch in batches.items():
                pipe.publish(channel, encode(batch))
            await pipe.execute()

    async def register_engine(self, info: EngineInfo, ttl_s: float = 10.0) -> None:
        await self.redis.hset(self.keys.engines, info.engine_id, encode(info))
        await self.heartbeat(info.engine_id, ttl_s)

    async def heartbeat(self, engine_id: str, ttl_s: float = 10.0) -> None:
        await self.redis.set(self.keys.alive(engine_id), b"1", px=int(ttl_s * 1000))

    async def unregister_engine(self, engine_id: str) -> None:
        await self.redis.hdel(self.keys.engines, engine_id)
        await self.redis.delete(self.keys.alive(engine_id), self.keys.stats(engine_id))

    async def register_rank(self, info: EngineInfo, ttl_s: float = 5.0) -> None:
        """An executor rank announces itself to its scheduler (not to gateways)."""
        await self.redis.hset(self.keys.ranks(info.engine_id), str(info.tp_rank), encode(info))
        await self.rank_heartbeat(info.engine_id, info.tp_rank, ttl_s)

    async def rank_heartbeat(self, engine_id: str, tp_rank: int, ttl_s: float = 5.0) -> None:
        await self.redis.set(self.keys.rank_alive(engine_id, tp_rank), b"1", px=int(ttl_s * 1000))

    async def live_ranks(self, engine_id: str) -> list[EngineInfo]:
        """Registered executor ranks of one engine whose heartbeat has not expired, by rank."""
        raw = await self.redis.hgetall(self.keys.ranks(engine_id))
        infos = sorted((decode(data, EngineInfo) for data in raw.values()), key=lambda i: i.tp_rank)
        if not infos:
            return []
        alive = await self.redis.mget([self.keys.rank_alive(engine_id, i.tp_rank) for i in infos])
        return [i for i, a in zip(infos, alive, strict=True) if a is not None]

    async def num_ranks_alive(self, engine_id: str, tp_size: int) -> int:
        """How many of ranks 0..tp_size-1 have a live heartbeat (one round trip)."""
        return await self.redis.exists(*(self.keys.rank_alive(engine_id, r) for r in range(tp_size)))

    async def unregister_rank(self, engine_id: str, tp_rank: int) -> None:
        await self.redis.hdel(self.keys.ranks(engine_id), str(tp_rank))
        await self.redis.delete(self.keys.rank_alive(engine_id, tp_rank))

    # ------------------------------------------------------------ helpers
    async def _subscribe(self, channel: str) -> AsyncIterator[bytes]:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(channel)
        try:
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is not None and msg["type"] == "message":
                    yield msg["data"]
        finally:
            await pubsub.unsubscribe(channel)
            await pubsub.aclose()
