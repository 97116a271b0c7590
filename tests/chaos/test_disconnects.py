"""1,000 client disconnects at random points of random requests (`make chaos`): before the
first token, mid-stream, or after a random delay (queued, prefilling, decoding). Afterwards
the engine holds no KV block, Redis holds the same keys as when idle before, the requests
stream and the token log are back to their idle length (the step and result streams are
capped at ~1,000 entries by XADD MAXLEN), and the gateway's and scheduler's memory is flat
(< 10% above its level after the first 200).
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from tests.chaos.harness import Load, Outcome, redis_url_of, rss_mb, start_serve, tally, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

N = 1000
WARMUP = 200
CONCURRENCY = 32
STREAM_CAP = 1100  # XADD MAXLEN ~1000 (approximate trimming)


@pytest.fixture(scope="module")
def serve(smollm2_dir):
    s = start_serve(smollm2_dir)
    try:
        yield s
    finally:
        s.stop()


async def _disconnecting(load: Load, n: int, first: int, seed: int) -> list[Outcome]:
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(timeout=60, trust_env=False, headers={"Authorization": "Bearer x"},
                                 limits=httpx.Limits(max_connections=CONCURRENCY + 8)) as client:
        async def go(i: int) -> Outcome:
            rng = random.Random(seed * 100_003 + i)
            async with sem:
                if rng.random() < 1 / 3:  # after a random delay, wherever the request is then
                    try:
                        return await asyncio.wait_for(load.one(client, first + i), rng.uniform(0.01, 1.5))
                    except TimeoutError:
                        return Outcome("cut")
                at = rng.randrange(load.max_tokens)  # at a random token (0: before the first)
                return await load.one(client, first + i, cut=lambda tokens: tokens >= at)
        return await asyncio.gather(*(go(i) for i in range(n)))


async def test_1000_client_disconnects_leave_nothing_behind(serve):
    redis_url = redis_url_of(serve)
    load = Load(serve.base, CONCURRENCY, max_tokens=32)
    warmup = await load.run(CONCURRENCY)  # warm: the streams and the stats exist
    assert tally(warmup) == {"ok": CONCURRENCY}, [o for o in warmup if o.kind != "ok"]
    before = await wait_idle(redis_url)
    warm = tally(await _disconnecting(load, WARMUP, 0, seed=1))
    await wait_idle(redis_url)
    rss_warm = rss_mb(serve)
    rest = tally(await _disconnecting(load, N - WARMUP, WARMUP, seed=2))
    after = await wait_idle(redis_url)
    rss_end = rss_mb(serve)
    counts = warm + rest
    print(f"{N} disconnects: {dict(counts)}; redis idle before {before}, after {after}; "
          f"RSS MB after warm-up {rss_warm}, at the end {rss_end}")
    assert counts["error"] == 0 and counts["hang"] == 0, counts
    assert counts["cut"] >= 0.9 * N, counts  # nearly all were cut before their last token
    assert after["keys"] == before["keys"], (before, after)
    for key, length in after["streams"].items():
        if key.endswith((":steps", ":results")):
            assert length <= STREAM_CAP, (key, length)
        else:
            assert length == before["streams"].get(key, 0), (key, before, after)
    for role in ("gateway", "scheduler"):
        assert rss_end[role] < 1.10 * rss_warm[role], (role, rss_warm, rss_end)
    # And it still serves.
    assert tally(await Load(serve.base, CONCURRENCY, max_tokens=8).run(CONCURRENCY)) == {"ok": CONCURRENCY}
