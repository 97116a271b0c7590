"""Bounded admission through a real `folio serve` (issue 11's "Overload").

500 requests at once against a queue bounded at 64: the excess gets 429 in the OpenAI shape
with Retry-After, fast (the gateway answers before reading the body), and every admitted
request completes. The burst is sent over 500 connections opened beforehand, each request
written whole and timed from its write to the first bytes of its response (the transport's
callback): the OpenAI SDK's per-request work (500 coroutines building requests on the same
two cores as the server), or even asyncio streams parsing each response, would otherwise
be much of what is measured. The SDK then sees the same 429s, and its own retry
(which honours Retry-After) gets a burst larger than the queue through.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.parse

import httpx
import openai
import pytest

from tests.services.gateway.conftest import run_server
from tests.services.gateway.http_util import metrics, wait_metrics

QUEUE = 64
BURST = 500
# Issue 11's bar for the 429s' p99 is 100 ms. The gateway's own work for this burst is
# ~0.1-0.15 s of CPU (the 436 rejections and the 64 admitted requests' parsing, tokenizing and
# XADDs), but it shares the two cores with the executor computing the admitted requests and
# with this client: on a quiet 2-core Xeon (AMX) the p99 was 36-82 ms in most runs and
# 110-160 ms in about one run of six (docs/reliability.md); on the shared 2-core EPYC up to
# 600 ms. CI asserts a bound that still fails if a 429 waited on the engines (the admitted
# requests took 0.8-9 s here), not the figure.
P99_429_S = 1.0


@pytest.fixture(scope="module")
def overload_server():
    with run_server("--max-num-queued-reqs", str(QUEUE)) as srv:
        yield srv


class _Exchange(asyncio.Protocol):
    """One HTTP/1.1 request on its own connection, timed by the transport callbacks: from the
    write to the first bytes of the response. The client shares the two cores with the
    server, so its own parsing (asyncio streams: a readline per header line, for 500
    responses) must not sit inside the figure: it is done after the burst."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.sent = self.first = 0.0
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, request: bytes) -> None:
        self.sent = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if not self.data:
            self.first = time.perf_counter()
        self.data += data
        head, sep, body = bytes(self.data).partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        if sep and length is not None and len(body) >= length and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def response(self) -> tuple[int, float, bytes, dict]:
        head, _, body = bytes(self.data).partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), self.first - self.sent, body, headers


async def _raw_burst(url: str, api_key: str, bodies: list[bytes]) -> list[tuple[int, float, bytes, dict]]:
    """Open one connection per body, then write every request at once; (status, seconds from
    the write to the response's first bytes, body, headers) each."""
    u = urllib.parse.urlparse(url)
    loop = asyncio.get_running_loop()
    exchanges = [(await loop.create_connection(_Exchange, u.hostname, u.port))[1] for _ in bodies]
    for ex, body in zip(exchanges, bodies, strict=True):
        ex.send(f"POST /v1/completions HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {api_key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await asyncio.gather(*(ex.done for ex in exchanges))
    for ex in exchanges:
        ex.transport.close()
    return [ex.response() for ex in exchanges]


def _client(srv, max_retries: int, statuses: list[int]) -> openai.AsyncOpenAI:
    async def seen(response: httpx.Response) -> None:
        statuses.append(response.status_code)

    http = httpx.AsyncClient(timeout=120, event_hooks={"response": [seen]})
    return openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=srv.api_key, max_retries=max_retries,
                              http_client=http)


async def _one(client: openai.AsyncOpenAI, model: str, i: int):
    try:
        return await client.completions.create(model=model, prompt=f"Count: {i}", max_tokens=2,
                                               temperature=0)
    except openai.APIStatusError as e:
        return e


def test_burst_past_the_queue_gets_fast_429s_and_admitted_requests_complete(overload_server):
    srv = overload_server
    # A server that has served before, as one meeting an overload in production has: the
    # first request's one-off work (first tokenizing, Redis connections) is not the 429s' cost.
    openai.OpenAI(base_url=f"{srv.url}/v1", api_key=srv.api_key).completions.create(
        model=srv.model, prompt="warm up", max_tokens=2)
    before = metrics(srv.url)
    bodies = [json.dumps({"model": srv.model, "prompt": f"Count: {i}", "max_tokens": 2,
                          "temperature": 0}).encode() for i in range(BURST)]
    t0 = time.perf_counter()
    results = asyncio.run(_raw_burst(srv.url, srv.api_key, bodies))
    took = time.perf_counter() - t0
    statuses = [s for s, _, _, _ in results]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    done = [json.loads(b) for s, _, b, _ in results if s == 200]
    # At least the queue's worth got in (more may, as admitted ones get their first token).
    assert QUEUE <= len(done) < BURST
    for r in done:
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 2
    body, headers = next((b, h) for s, _, b, h in results if s == 429)
    assert headers["retry-after"] == "1"  # the OpenAI SDK waits this long before its retry
    error = json.loads(body)["error"]
    assert error["type"] == "RateLimitError" and error["code"] == 429
    assert "--max-num-queued-reqs" in error["message"]

    lat = sorted(t for s, t, _, _ in results if s == 429)
    p50, p99 = statistics.median(lat), lat[int(0.99 * (len(lat) - 1))]
    print(f"\n{BURST} at once, queue {QUEUE}: {len(done)} admitted, {len(lat)} got 429 "
          f"(p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms); "
          f"all done in {took:.1f}s")
    assert p99 < P99_429_S, f"429 p99 {p99 * 1000:.1f} ms"
    rejected = "folio:request_rejected_total:queue_full"
    assert metrics(srv.url)[rejected] - before[rejected] == len(lat)  # each 429 counted once
    wait_metrics(srv.url, lambda m: m["folio:num_requests_running"] == 0
                 and m["folio:num_requests_waiting"] == 0, what="an idle engine")


def test_sdk_retry_gets_a_burst_larger_than_the_queue_through(overload_server):
    """The SDK turns a 429 into RateLimitError and retries it after Retry-After (1 s): with
    max_retries, QUEUE + 16 requests at once all complete (the 16 over the bound would not
    without a retry)."""
    srv = overload_server
    before = metrics(srv.url)

    statuses: list[int] = []

    async def burst():
        async with _client(srv, 6, statuses) as client:
            return await asyncio.gather(*(_one(client, srv.model, i) for i in range(QUEUE + 16)))

    results = asyncio.run(burst())
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, failed[:3]
    assert all(r.usage.completion_tokens == 2 for r in results)
    assert statuses.count(429) > 0 and statuses.count(200) == QUEUE + 16  # retried, then served
    after = metrics(srv.url)
    key = "folio:request_success_total:length"
    assert after[key] - before[key] == QUEUE + 16
