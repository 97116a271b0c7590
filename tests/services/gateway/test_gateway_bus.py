"""The gateway against a real Redis, with the test speaking the engine's side of the wire.

No model runs here: the test reads the GenerateRequests the gateway submits and answers
with TokenBatch messages, so it can produce what a real engine rarely does on cue
(errors, dying, interleaved replies) and check the gateway's reaction exactly.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import uuid

import msgspec
import openai
import pytest
import uvicorn

from services.gateway.app import build_app
from services.gateway.state import GatewaySettings
from shared.bus import Bus
from shared.protocol import EngineInfo, FinishReason, GenerateRequest, TokenBatch, TokenDelta

MODEL = "smollm2-135m-instruct"


class EngineSide:
    """The scheduler/executor half of the protocol, driven by the test."""

    def __init__(self, bus: Bus, engine_id: str = "e-test") -> None:
        self.bus = bus
        self.engine_id = engine_id
        self.aborted: list[str] = []
        self._abort_task: asyncio.Task | None = None
        self._sent: dict[str, int] = {}  # req_id -> tokens sent so far (the next delta's index)

    async def start(self, max_model_len: int = 256, ttl_s: float = 30.0) -> None:
        await self.bus.ensure_group()
        info = EngineInfo(
            engine_id=self.engine_id, num_blocks=64, block_size=16, max_model_len=max_model_len,
            model_name=MODEL,
        )
        await self.bus.register_engine(info, ttl_s=ttl_s)
        self._abort_task = asyncio.create_task(self._collect_aborts())
        await asyncio.sleep(0.05)  # let the SUBSCRIBE land

    async def _collect_aborts(self) -> None:
        async for a in self.bus.aborts():
            self.aborted.extend(a.req_ids)

    async def requests(self, n: int, timeout_s: float = 10.0) -> list[GenerateRequest]:
        out: list[GenerateRequest] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n:
            assert time.monotonic() < deadline, f"got {len(out)} of {n} requests"
            for msg_id, req in await self.bus.claim_requests("test", count=n, block_ms=100):
                await self.bus.ack_request(msg_id)
                out.append(req)
        return out

    async def send(self, *deltas: TokenDelta, channel: str, indexed: bool = False) -> None:
        """Publish deltas as this engine; each gets its request's next output index unless
        `indexed` (the test set the index itself)."""
        out = []
        for d in deltas:
            if not indexed:
                d = msgspec.structs.replace(d, index=self._sent.get(d.req_id, 0))
            self._sent[d.req_id] = max(self._sent.get(d.req_id, 0), d.index + len(d.token_ids))
            out.append(d)
        await self.bus.publish_tokens(channel, TokenBatch(deltas=out, engine_id=self.engine_id))

    async def stop(self) -> None:
        if self._abort_task is not None:
            self._abort_task.cancel()
            await asyncio.gather(self._abort_task, return_exceptions=True)
        await self.bus.close()


@pytest.fixture
async def gateway(redis_url, tokenizer):
    ns = f"t{uuid.uuid4().hex[:8]}"
    settings = GatewaySettings(
        model=MODEL, redis_url=redis_url, redis_namespace=ns, gateway_id="gw-test", resume_timeout_s=1.0
    )
    app = build_app(settings, tokenizer=tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.01)
    engine = EngineSide(Bus(redis_url, ns))
    url = f"http://127.0.0.1:{port}"
    yield url, engine, openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
    await engine.stop()
    server.should_exit = True
    await task


async def status_of(url: str, path: str) -> int:
    """GET without blocking the loop the server runs on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    line = await reader.readline()
    writer.close()
    return int(line.split()[1])


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


async def test_noengine_is_503_fast(gateway):
    url, engine, client = gateway
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert e.value.status_code == 503 and time.monotonic() - t0 < 3
    assert e.value.body["type"] == "ServiceUnavailableError"
    assert await status_of(url, "/health") == 503
    await engine.start()
    assert await status_of(url, "/health") == 200


async def test_an_engine_that_registers_is_served_at_once(gateway):
    """"No engine alive" is not cached: the request right after an engine registers is
    served, not 503 for the rest of the second (as the first wave after a Redis restart under
    a TP 2 engine was: the gateway had asked while the ranks were still coming back)."""
    _url, engine, client = gateway
    with pytest.raises(openai.APIStatusError) as e:
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert e.value.status_code == 503
    t0 = time.monotonic()
    await engine.start()
    call = asyncio.create_task(client.completions.create(model=MODEL, prompt="hi", max_tokens=2))
    [req] = await engine.requests(1)
    assert time.monotonic() - t0 < 0.9  # within the engine list's cache second
    await engine.send(TokenDelta(req_id=req.req_id, token_ids=[2], finish_reason=int(FinishReason.STOP)),
                      channel=req.reply_to)
    r = await asyncio.wait_for(call, 10)
    assert r.choices[0].finish_reason == "stop"


async def test_request_fields_and_default_max_tokens(gateway, tokenizer):
    _url, engine, client = gateway
    await engine.start(max_model_len=256)
    call = asyncio.create_task(client.completions.create(model=MODEL, prompt="Hello there", n=2, seed=5))
    reqs = await engine.requests(2)
    rid = reqs[0].req_id.rsplit("-", 1)[0]
    assert rid.startswith("cmpl-") and [r.req_id for r in reqs] == [f"{rid}-0", f"{rid}-1"]
    prompt = tokenizer.encode("Hello there")
    assert all(r.prompt_token_ids == prompt for r in reqs)
    assert [r.sampling_params.seed for r in reqs] == [5, 6]
    assert all(r.sampling_params.max_tokens == 256 - len(prompt) for r in reqs)
    assert all(r.reply_to == reqs[0].reply_to and r.reply_to.endswith("gw-test:tokens") for r in reqs)
    # Interleaved replies are routed to the right choice.
    a, b = ids(tokenizer, " one"), ids(tokenizer, " two")
    await engine.send(
        TokenDelta(req_id=reqs[1].req_id, token_ids=b),
        TokenDelta(req_id=reqs[0].req_id, token_ids=a),
        channel=reqs[0].reply_to,
    )
    await engine.send(
        TokenDelta(req_id=reqs[0].req_id, token_ids=[], finish_reason=int(FinishReason.LENGTH)),
        TokenDelta(req_id=reqs[1].req_id, token_ids=[2], finish_reason=int(FinishReason.STOP)),
        channel=reqs[0].reply_to,
    )
    r = await asyncio.wait_for(call, 10)
    assert [(c.text, c.finish_reason) for c in r.choices] == [(" one", "length"), (" two", "stop")]
    assert r.usage.completion_tokens == len(a) + len(b) + 1


async def test_engine_error_is_500_non_streaming(gateway):
    _url, engine, client = gateway
    await engine.start()
    call = asyncio.create_task(client.completions.create(model=MODEL, prompt="hi", max_tokens=4))
    (req,) = await engine.requests(1)
    await engine.send(
        TokenDelta(
            req_id=req.req_id,
            token_ids=[],
            finish_reason=int(FinishReason.ABORT),
            error="executor error: boom",
        ),
        channel=req.reply_to,
    )
    with pytest.raises(openai.InternalServerError) as e:
        await asyncio.wait_for(call, 10)
    assert "boom" in str(e.value)


async def test_engine_error_mid_stream_is_an_error_event(gateway, tokenizer):
    url, engine, _client = gateway
    await engine.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    body = json.dumps({"prompt": "hi", "max_tokens": 8, "stream": True}).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )
    (req,) = await engine.requests(1)
    await engine.send(TokenDelta(req_id=req.req_id, token_ids=ids(tokenizer, " Hi")), channel=req.reply_to)
    await engine.send(
        TokenDelta(req_id=req.req_id, token_ids=[], error="executor error: boom"), channel=req.reply_to
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    events = [line[6:] for line in re.split(rb"\r?\n", raw) if line.startswith(b"data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == " Hi"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 500 and "boom" in err["message"]
    assert events[-1] == b"[DONE]"


async def test_stop_string_hit_publishes_abort(gateway, tokenizer):
    _url, engine, client = gateway
    await engine.start()
    call = asyncio.create_task(
        client.completions.create(model=MODEL, prompt="hi", max_tokens=20, stop=["world"])
    )
    (req,) = await engine.requests(1)
    for piece in ("Hello", " wor", "ld", " and more"):
        await engine.send(
            TokenDelta(req_id=req.req_id, token_ids=ids(tokenizer, piece)), channel=req.reply_to
        )
    r = await asyncio.wait_for(call, 10)
    assert r.choices[0].text == "Hello " and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == "world"
    deadline = time.monotonic() + 2
    while req.req_id not in engine.aborted:
        assert time.monotonic() < deadline, "no abort published for the stop-string hit"
        await asyncio.sleep(0.02)


async def test_engine_death_fails_in_flight_request(gateway):
    _url, engine, client = gateway
    await engine.start(ttl_s=1.0)  # no heartbeats follow: the engine "dies" after 1 s
    t0 = time.monotonic()
    call = asyncio.create_task(client.completions.create(model=MODEL, prompt="hi", max_tokens=4))
    await engine.requests(1)
    with pytest.raises(openai.InternalServerError) as e:
        await asyncio.wait_for(call, 10)
    assert "no engine resumed it" in str(e.value)
    assert time.monotonic() - t0 < 6


async def test_resumed_request_reaches_the_client_once(gateway, redis_url, tokenizer):
    """Engine A streams two pieces and dies; engine B (alive all along) resumes the request:
    it re-sends what A had generated (from A's token log), overlapping what the client saw,
    then goes on. The client gets every token exactly once, with the right usage."""
    _url, a, client = gateway
    b = EngineSide(Bus(redis_url, a.bus.keys.ns), engine_id="e-b")
    await a.start(ttl_s=1.0)
    await b.start()
    call = asyncio.create_task(client.completions.create(model=MODEL, prompt="hi", max_tokens=6, stream=True))
    (req,) = await a.requests(1)
    one, two, three = ids(tokenizer, " one"), ids(tokenizer, " two"), ids(tokenizer, " three")
    await a.send(TokenDelta(req_id=req.req_id, token_ids=one), channel=req.reply_to)
    await a.send(TokenDelta(req_id=req.req_id, token_ids=two), channel=req.reply_to)
    await asyncio.sleep(1.2)  # A's heartbeat expires
    carried = TokenDelta(req_id=req.req_id, token_ids=one + two, index=0)
    await b.send(carried, channel=req.reply_to, indexed=True)
    await b.send(TokenDelta(req_id=req.req_id, token_ids=three, index=len(one + two), finish_reason=2),
                 channel=req.reply_to, indexed=True)
    stream = await asyncio.wait_for(call, 10)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == " one two three"
    await b.stop()


async def test_request_of_a_dead_engine_fails_when_nobody_resumes_it(gateway, redis_url, tokenizer):
    """Another engine is alive, but the one that served the request died and nobody resumed
    it: the request still ends (after resume_timeout_s = 1 s here), never hangs."""
    _url, a, client = gateway
    b = EngineSide(Bus(redis_url, a.bus.keys.ns), engine_id="e-b")
    await a.start(ttl_s=1.0)
    await b.start()
    t0 = time.monotonic()
    call = asyncio.create_task(client.completions.create(model=MODEL, prompt="hi", max_tokens=6))
    (req,) = await a.requests(1)
    await a.send(TokenDelta(req_id=req.req_id, token_ids=ids(tokenizer, " one")), channel=req.reply_to)
    with pytest.raises(openai.InternalServerError) as e:
        await asyncio.wait_for(call, 10)
    assert "failed and no engine resumed it" in str(e.value)
    print(f"ended {time.monotonic() - t0:.1f}s after submission")
    assert time.monotonic() - t0 < 6
    await b.stop()


async def test_client_disconnect_publishes_abort(gateway, tokenizer):
    url, engine, _client = gateway
    await engine.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    body = json.dumps({"prompt": "hi", "max_tokens": 50, "stream": True}).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    (req,) = await engine.requests(1)
    await engine.send(TokenDelta(req_id=req.req_id, token_ids=ids(tokenizer, " Hi")), channel=req.reply_to)
    await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
    writer.close()
    t0 = time.monotonic()
    while req.req_id not in engine.aborted:
        assert time.monotonic() - t0 < 15.0, "disconnect never turned into an abort"
        await asyncio.sleep(0.01)
    print(f"abort published {time.monotonic() - t0:.3f}s after the disconnect")
