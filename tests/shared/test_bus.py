"""Round trips over a real private redis-server: every typed operation of the bus."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import pytest

from shared.bus import SCHEDULER_GROUP, Bus, Malformed
from shared.protocol import (
    EngineInfo,
    EngineStats,
    GenerateRequest,
    NewRequestData,
    StepHeader,
    StepPlan,
    StepResult,
    TokenBatch,
    TokenDelta,
)
from shared.sampling_params import SamplingParams


@pytest.fixture
async def bus(redis_url):
    b = Bus(redis_url, namespace=f"t{uuid.uuid4().hex[:8]}")
    yield b
    await b.close()


def _req(i: int, reply_to: str = "") -> GenerateRequest:
    return GenerateRequest(
        req_id=f"r{i}",
        prompt_token_ids=[1, 2, 3 + i],
        sampling_params=SamplingParams(temperature=0.0, max_tokens=4),
        reply_to=reply_to,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )


async def _wait_subscribed(bus: Bus, channel: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        [(_, n)] = await bus.redis.pubsub_numsub(channel)
        if n > 0:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"nobody subscribed to {channel}")


async def test_submit_claim_ack(bus: Bus):
    await bus.ensure_group()
    await bus.ensure_group()  # idempotent
    for i in range(3):
        await bus.submit(_req(i, reply_to="gw"))
    got = await bus.claim_requests("sched-a", count=10, block_ms=100)
    assert [r.req_id for _, r in got] == ["r0", "r1", "r2"]
    assert got[0][1] == _req(0, reply_to="gw")
    # Claimed entries are pending until acknowledged; another consumer does not see them.
    assert await bus.claim_requests("sched-b", count=10, block_ms=50) == []
    pending = await bus.redis.xpending(bus.keys.requests, SCHEDULER_GROUP)
    assert pending["pending"] == 3
    await bus.ack_request(got[0][0], got[1][0])
    pending = await bus.redis.xpending(bus.keys.requests, SCHEDULER_GROUP)
    assert pending["pending"] == 1


async def test_pending_and_retire(bus: Bus):
    await bus.ensure_group()
    for i in range(3):
        await bus.submit(_req(i))
    claimed = await bus.claim_requests("s", count=10)
    # A restarted consumer of the same name finds what it had claimed and not finished.
    assert [r.req_id for _, r in await bus.pending_requests("s")] == ["r0", "r1", "r2"]
    assert await bus.pending_requests("other") == []
    await bus.retire_requests(claimed[0][0], claimed[2][0])
    assert [r.req_id for _, r in await bus.pending_requests("s")] == ["r1"]
    assert await bus.redis.xlen(bus.keys.requests) == 1  # retired entries are deleted, not just acked
    # An entry deleted while still pending comes back as Malformed, not as an exception.
    await bus.redis.xdel(bus.keys.requests, claimed[1][0])
    [(msg_id, gone)] = await bus.pending_requests("s")
    assert msg_id == claimed[1][0] and isinstance(gone, Malformed)


async def test_claim_blocks_then_times_out(bus: Bus):
    await bus.ensure_group()
    t0 = asyncio.get_running_loop().time()
    assert await bus.claim_requests("s", block_ms=200) == []
    assert asyncio.get_running_loop().time() - t0 >= 0.15


async def test_malformed_request_is_rejected_whole(bus: Bus):
    await bus.ensure_group()
    await bus.redis.xadd(bus.keys.requests, {b"m": b"\x93garbage"})
    await bus.redis.xadd(bus.keys.requests, {b"other": b"x"})
    # Right shape but a wrong type inside (prompt ids as a string): rejected as a whole.
    await bus.redis.xadd(bus.keys.requests, {b"m": msgspec.msgpack.encode(["r9", "abc", []])})
    await bus.submit(_req(1))
    got = await bus.claim_requests("s", count=10)
    assert [type(r) for _, r in got[:3]] == [Malformed] * 3
    assert got[3][1].req_id == "r1"
    # Each one is dead-lettered with where it came from and why.
    dead = await bus.redis.xrange(bus.keys.deadletter)
    assert [e[b"id"] for _, e in dead] == [msg_id for msg_id, _ in got[:3]]
    assert all(e[b"source"] == bus.keys.requests.encode() and e[b"error"] for _, e in dead)
    assert dead[0][1][b"m"] == b"\x93garbage"


async def test_aborts_pubsub(bus: Bus):
    received: list[list[str]] = []

    async def listen():
        async for msg in bus.aborts():
            received.append(msg.req_ids)
            if len(received) == 2:
                return

    task = asyncio.create_task(listen())
    await _wait_subscribed(bus, bus.keys.aborts)
    await bus.publish_abort([])  # nothing sent for an empty list
    await bus.redis.publish(bus.keys.aborts, b"not msgpack")  # dropped, listener survives
    await bus.publish_abort(["a", "b"])
    await bus.publish_abort(["c"])
    await asyncio.wait_for(task, 5)
    assert received == [["a", "b"], ["c"]]


async def test_steps_and_results(bus: Bus):
    start = await bus.stream_tail_id(bus.keys.steps("e0"))
    assert start == b"0-0"
    plan = StepPlan(
        step_id=7,
        new_requests=[
            NewRequestData(
                req_id="r0",
                prompt_token_ids=[5, 6],
                sampling_params=SamplingParams(),
                block_ids=[3],
                num_computed_tokens=0,
            )
        ],
        num_scheduled_tokens={"r0": 2},
        total_num_scheduled_tokens=2,
    )
    await bus.send_step("e0", plan)
    await bus.send_step("e0", StepPlan(step_id=8, shutdown=True))
    msg_id, got = await bus.read_step("e0", start, block_ms=100)
    assert got == plan
    msg_id2, got2 = await bus.read_step("e0", msg_id, block_ms=100)
    assert got2.shutdown and got2.step_id == 8
    assert await bus.stream_tail_id(bus.keys.steps("e0")) == msg_id2
    assert await bus.read_step("e0", msg_id2, block_ms=50) is None

    assert await bus.read_result("e0", "0-0", block_ms=50) is None
    result = StepResult(step_id=7, req_ids=["r0"], sampled_token_ids=[[11]])
    await bus.finish_step_and_read_next("e0", result, {}, msg_id2, 1)
    rid, got_result = await bus.read_result("e0", "0-0", block_ms=100)
    assert got_result == result
    assert await bus.read_result("e0", rid, block_ms=50) is None


async def test_token_pubsub(bus: Bus):
    channel = bus.keys.gateway_tokens("g1")
    batches: list[TokenBatch] = []

    async def listen():
        async for b in bus.token_batches("g1"):
            batches.append(b)
            return

    task = asyncio.create_task(listen())
    await _wait_subscribed(bus, channel)
    delta = TokenDelta(req_id="r0", token_ids=[1, 2], finish_reason=1, num_prompt_tokens=3)
    batch = TokenBatch(deltas=[delta])
    await bus.publish_tokens(channel, batch)
    await asyncio.wait_for(task, 5)
    assert batches == [batch]


SHORT_TTL_S = 1.5


async def _until(read, want, deadline_s: float = 15.0) -> None:
    """Poll `await read()` until it equals `want`; print how long expiry took."""
    t0 = time.monotonic()
    while (got := await read()) != want:
        assert time.monotonic() - t0 < deadline_s, f"still {got} after {deadline_s}s"
        await asyncio.sleep(0.05)
    print(f"expired {time.monotonic() - t0:.2f}s after the check (TTL {SHORT_TTL_S}s)")


async def test_rank_registration(bus: Bus):
    infos = [EngineInfo(engine_id="e1", num_blocks=10 + r, block_size=16, max_model_len=64, model_name="m",
                        tp_rank=r, tp_size=2, incarnation=f"inc{r}") for r in range(2)]
    # Short enough to wait out, long enough to read back in time on a busy 2-core machine.
    await bus.register_rank(infos[1], ttl_s=SHORT_TTL_S)
    await bus.register_rank(infos[0], ttl_s=5)
    assert await bus.live_ranks("e1") == infos  # sorted by rank
    assert await bus.lost_ranks("e1", ["inc0", "inc1"]) == []
    assert await bus.live_engines() == []  # ranks are not engines: gateways do not see them
    await _until(lambda: bus.live_ranks("e1"), infos[:1])
    assert await bus.lost_ranks("e1", ["inc0", "inc1"]) == [1]
    await bus.rank_heartbeat("e1", 1, ttl_s=5, incarnation="inc1")
    assert await bus.lost_ranks("e1", ["inc0", "inc1"]) == []
    # A rank restarted between two checks is lost too, though its key never expired.
    restarted = msgspec.structs.replace(infos[0], incarnation="new0")
    await bus.register_rank(restarted, ttl_s=5)
    assert await bus.lost_ranks("e1", ["inc0", "inc1"]) == [0]
    assert await bus.live_ranks("e1") == [restarted, infos[1]]
    await bus.unregister_rank("e1", 0)
    assert await bus.live_ranks("e1") == infos[1:]


async def test_malformed_messages_are_dead_lettered_everywhere(bus: Bus):
    """One decoder, one policy: on every stream and channel a bad message is logged, copied
    to the dead-letter stream and handed over as Malformed (with its header, if readable)."""
    await bus.redis.xadd(bus.keys.steps("e0"), {b"m": msgspec.msgpack.encode([41, "not-a-list"])})
    [(_, plan)] = [await bus.read_step("e0", "0-0")]  # type: ignore[misc]
    assert isinstance(plan, Malformed) and plan.header(StepHeader) == StepHeader(step_id=41)
    await bus.redis.xadd(bus.keys.results("e0"), {b"m": b"\xc1"})
    _, result = await bus.read_result("e0", "0-0")
    assert isinstance(result, Malformed) and result.header(StepHeader) is None
    channel = bus.keys.gateway_tokens("g")
    got: list[TokenBatch] = []

    async def listen():
        async for batch in bus.token_batches("g"):
            got.append(batch)

    task = asyncio.create_task(listen())
    await _wait_subscribed(bus, channel)
    await bus.redis.publish(channel, b"junk")
    good = TokenBatch(deltas=[TokenDelta(req_id="r", token_ids=[1], index=4)], engine_id="e0")
    await bus.publish_tokens(channel, good)
    deadline = asyncio.get_running_loop().time() + 5
    while not got:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    task.cancel()
    assert got == [good]  # the bad one was skipped, the subscription lives on
    sources = [e[b"source"] for _, e in await bus.redis.xrange(bus.keys.deadletter)]
    assert sources == [bus.keys.steps("e0").encode(), bus.keys.results("e0").encode(), channel.encode()]


async def test_token_log_trim_and_take_over(bus: Bus):
    await bus.ensure_group()
    for i in range(3):
        await bus.submit(_req(i, reply_to="gw"))
    claimed = await bus.claim_requests("dead", count=10)
    ids = [msg_id for msg_id, _ in claimed]
    batch = TokenBatch(deltas=[TokenDelta(req_id=f"r{i}", token_ids=[i], index=0) for i in range(3)])
    await bus.log_and_publish("dead", {"gw": batch})
    more = TokenBatch(deltas=[TokenDelta(req_id="r1", token_ids=[7], index=1)])
    await bus.log_and_publish("dead", {"gw": more})
    assert [b.engine_id for b in await bus.read_token_log("dead")] == ["dead", "dead"]
    # r0 finishes: the log keeps everything from the oldest unfinished request's entry on.
    await bus.retire_requests(ids[0], engine_id="dead", log_min_id=ids[1])
    assert len(await bus.read_token_log("dead")) == 2
    # "dead" never heartbeats: a live engine finds it and takes its requests, exclusively.
    await bus.heartbeat("live", ttl_s=5)
    assert await bus.dead_consumers() == ["dead"]
    assert await bus.take_over("dead", "live", min_idle_ms=0) != []
    assert [m.req_id for _, m in await bus.pending_requests("live")] == ["r1", "r2"]
    assert await bus.take_over("live", "third", min_idle_ms=60_000) == []  # too fresh: not taken
    assert await bus.forget_engine("dead")  # nothing pending any more: its log goes
    assert await bus.read_token_log("dead") == []
    await bus.log_and_publish("live", {"gw": TokenBatch(deltas=[TokenDelta(req_id="r2", token_ids=[5])])})
    await bus.retire_requests(ids[1], engine_id="live", log_min_id=ids[2])
    assert await bus.redis.xlen(bus.keys.token_log("live")) == 1
    # Its last request finished: nothing unfinished needs the log any more.
    await bus.retire_requests(ids[2], engine_id="live")
    assert await bus.redis.xlen(bus.keys.token_log("live")) == 0


async def test_registration_heartbeat_expiry(bus: Bus):
    info = EngineInfo(engine_id="e0", num_blocks=64, block_size=16, max_model_len=256, model_name="m")
    await bus.register_engine(info, ttl_s=SHORT_TTL_S)
    assert await bus.live_engines() == [info]
    await bus.publish_stats(EngineStats(engine_id="e0", num_running=2, kv_cache_usage=0.5), ttl_s=5)
    [stats] = await bus.engine_stats()
    assert stats.num_running == 2 and stats.kv_cache_usage == 0.5
    await _until(bus.live_engines, [])  # heartbeat expired: registered but not live
    assert await bus.engine_stats() == []
    await bus.heartbeat("e0", ttl_s=5)
    assert await bus.live_engines() == [info]
    await bus.unregister_engine("e0")
    assert await bus.live_engines() == []
    assert await bus.redis.hlen(bus.keys.engines) == 0


async def test_pipelined_step_round_trips(bus: Bus):
    await bus.ensure_group()
    await bus.submit(_req(1))
    plan = StepPlan(step_id=3, num_scheduled_tokens={"r1": 1}, total_num_scheduled_tokens=1)

    async def executor():
        got = await bus.read_step("e0", "0-0", block_ms=2000)
        assert got is not None and got[1] == plan
        channel = bus.keys.gateway_tokens("g")
        batch = TokenBatch(deltas=[TokenDelta(req_id="r1", token_ids=[9])], engine_id="e0")
        # Logging and publishing the tokens, the result, and waiting for the next plan: one round trip.
        result = StepResult(step_id=3, req_ids=["r1"], sampled_token_ids=[[9]])
        return await bus.finish_step_and_read_next("e0", result, {channel: batch}, got[0], 2000)

    task = asyncio.create_task(executor())
    claimed, got = await bus.send_step_and_read_result("e0", plan, "0-0", 2000, claim=("s", 10))
    assert [r.req_id for _, r in claimed] == ["r1"]
    assert got is not None and got[1] == StepResult(step_id=3, req_ids=["r1"], sampled_token_ids=[[9]])
    # Without a claim, and with nothing to read: a timeout comes back as None.
    claimed, nothing = await bus.send_step_and_read_result("e0", StepPlan(step_id=4), got[0], 50)
    assert claimed == [] and nothing is None
    next_step = await asyncio.wait_for(task, 5)
    assert next_step is not None and next_step[1].step_id == 4
    assert await bus.finish_step_and_read_next("e0", None, {}, next_step[0], 50) is None  # timeout
    assert [b.deltas[0].token_ids for b in await bus.read_token_log("e0")] == [[9]]  # logged
    # A malformed result is reported as Malformed, not raised.
    await bus.redis.xadd(bus.keys.results("e0"), {b"m": b"\x00junk"})
    _, bad = await bus.send_step_and_read_result("e0", StepPlan(step_id=5), got[0], 500)
    assert bad is not None and isinstance(bad[1], Malformed)


# ---------------------------------------------------------------------- Redis faults
def test_is_outage_tells_a_lost_redis_from_a_bug():
    from redis.exceptions import AuthenticationError, BusyLoadingError, ResponseError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from shared.bus import is_outage

    for e in (RedisConnectionError("refused"), RedisTimeoutError("t"), BusyLoadingError("loading"),
              ResponseError("NOGROUP No such key 'folio:requests'"), ConnectionResetError()):
        assert is_outage(e), e
    for e in (ResponseError("WRONGTYPE Operation against a key"), AuthenticationError("bad password"),
              ValueError("x"), msgspec.DecodeError("x")):
        assert not is_outage(e), e


def test_redacted_hides_the_password():
    from shared.bus import redacted

    assert redacted("rediss://:s3cret@redis.example:6380/0") == "rediss://:***@redis.example:6380/0"
    assert redacted("redis://folio:s3cret@h:6379") == "redis://folio:***@h:6379"
    assert redacted("unix:///tmp/r.sock") == "unix:///tmp/r.sock"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"


async def test_a_restart_surfaces_as_an_outage_and_wait_for_redis_backs_off_until_it_is_back():
    """The bus never retries by itself: a command on a connection to a Redis that restarted
    fails (is_outage), the pub/sub iterator raises instead of silently resubscribing, and
    wait_for_redis returns once Redis is back (False if told to stop first)."""
    from shared.bus import is_outage
    from shared.redis_server import start_private_redis

    server = start_private_redis()
    bus = Bus(server.url, "restart")
    try:
        await bus.ensure_group()
        got: list[TokenBatch] = []
        subscribed = asyncio.Event()

        async def listen():
            async for b in bus.token_batches("g", subscribed.set):
                got.append(b)

        sub = asyncio.create_task(listen())
        await asyncio.wait_for(subscribed.wait(), 5)
        server.process.kill()
        server.process.wait()
        with pytest.raises(Exception) as e:
            await bus.claim_requests("e0", block_ms=10)
        assert is_outage(e.value)
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(sub, 5)  # the subscription ends with the error, not a hang
        assert is_outage(e.value)
        assert await bus.wait_for_redis(lambda: True) is False  # told to stop: gives up

        async def restart_later():
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.restart)

        t0 = time.monotonic()
        restarter = asyncio.create_task(restart_later())
        assert await asyncio.wait_for(bus.wait_for_redis(), 10) is True
        await restarter
        assert 0.5 <= time.monotonic() - t0 < 3  # back within the 1 s backoff cap
        # It restarted empty: the group is gone (an outage, NOGROUP) until made again.
        with pytest.raises(Exception) as e:
            await bus.claim_requests("e0", block_ms=10)
        assert is_outage(e.value) and "NOGROUP" in str(e.value)
        await bus.ensure_group()
        await bus.submit(_req(1))
        [(_, req)] = await bus.claim_requests("e0", block_ms=10)
        assert req == _req(1)
    finally:
        await bus.close()
        server.stop()


async def _tls_proxy(cert: str, key: str, unix_path: str):
    """A TLS terminator on 127.0.0.1 in front of a unix-socket Redis (our redis-server build
    has no TLS of its own): what a managed Redis with rediss:// looks like to a client."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(unix_path)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:  # the test is over: the loop closes its connections
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


async def test_rediss_url_with_a_password(tmp_path):
    """`--redis-url rediss://:PASSWORD@host:port/0?ssl_ca_certs=...` reaches a Redis that
    requires a password over TLS: streams, pub/sub and blocking reads all work; a wrong
    password is an error, not an outage to wait out."""
    import shutil
    import subprocess

    from redis.exceptions import AuthenticationError

    from shared.bus import is_outage
    from shared.redis_server import start_private_redis

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    server = start_private_redis()
    admin = Bus(server.url)
    proxy = None
    try:
        await admin.redis.config_set("requirepass", "s3cret")
        await admin.close()
        proxy = await _tls_proxy(cert, key, server.socket_path)
        port = proxy.sockets[0].getsockname()[1]
        bus = Bus(f"rediss://:s3cret@localhost:{port}/0?ssl_ca_certs={cert}", "tls")
        try:
            assert await bus.ping()
            await bus.ensure_group()
            subscribed = asyncio.Event()
            got: list[TokenBatch] = []

            async def listen():
                async for b in bus.token_batches("g", subscribed.set):
                    got.append(b)

            sub = asyncio.create_task(listen())
            await asyncio.wait_for(subscribed.wait(), 5)
            await bus.submit(_req(7, reply_to=bus.keys.gateway_tokens("g")))
            [(_, req)] = await bus.claim_requests("e0", block_ms=1000)
            batch = TokenBatch(deltas=[TokenDelta(req_id=req.req_id, token_ids=[5])], engine_id="e0")
            await bus.publish_tokens(req.reply_to, batch)
            deadline = time.monotonic() + 5
            while not got:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert got == [batch]
            sub.cancel()
        finally:
            await bus.close()
        wrong = Bus(f"rediss://:nope@localhost:{port}/0?ssl_ca_certs={cert}", "tls")
        try:
            with pytest.raises(AuthenticationError) as e:
                await wrong.ping()
            assert not is_outage(e.value)
        finally:
            await wrong.close()
        missing = Bus(f"rediss://localhost:{port}/0?ssl_ca_certs={cert}", "tls")
        try:
            with pytest.raises(Exception) as e:
                await missing.ping()
            assert not is_outage(e.value), e.value
        finally:
            await missing.close()
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()
