"""Redis killed (SIGKILL) under load and restarted by `folio serve` (empty, same socket):
no client hangs (every stream ends with its tokens or an error within its deadline), the
services reconnect on their own, new requests succeed within seconds, and the system is
back to idle (no KV block held, nothing pending or logged).

CI runs it at concurrency 8; `make chaos` at the issue's 32. The same with an external
Redis that requires a password and is restarted by someone else (CI).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from shared.redis_server import start_private_redis
from tests.chaos.harness import (
    MODEL,
    Load,
    pid_of,
    redis_url_of,
    serves_again,
    start_serve,
    tally,
    wait_idle,
    wait_progress,
)
from tests.services.serve_process import ServeProcess
from tests.services.test_cli_serve import _descendants, _tiny_model_with_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serve(smollm2_dir):
    s = start_serve(smollm2_dir)
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("concurrency", [8, pytest.param(32, marks=pytest.mark.chaos)])
async def test_redis_killed_and_restarted_under_load(serve, concurrency):
    load = Load(serve.base, concurrency, max_tokens=24, deadline_s=90)
    # Two waves: the first is mid-stream at the kill, the second arrives during the outage.
    task = asyncio.create_task(load.run(2 * concurrency))
    await wait_progress(load, 4 * concurrency)
    os.kill(pid_of(serve, "redis"), signal.SIGKILL)
    # Probed beside the load: how soon a new request succeeds after the kill.
    back_s, outcomes = await asyncio.gather(serves_again(serve.base), task)
    counts = tally(outcomes)
    print(f"redis kill at concurrency {concurrency}: {dict(counts)}; serving again "
          f"{back_s:.1f}s after the kill; slowest request {max(o.seconds for o in outcomes):.1f}s")
    assert counts["hang"] == 0, [o for o in outcomes if o.kind == "hang"]
    assert "the redis-server was killed by SIGKILL; restarting redis" in serve.everything()
    assert back_s < 15, serve.output()
    # Everything works as before: a full wave succeeds, and nothing is left over.
    again = await Load(serve.base, concurrency, max_tokens=8).run(concurrency)
    assert tally(again) == {"ok": concurrency}, [o for o in again if o.kind != "ok"]
    await wait_idle(redis_url_of(serve))


async def test_external_redis_with_a_password_restarted_under_load(smollm2_dir):
    """`folio serve --redis-url` on a Redis that requires a password and that something else
    (its orchestrator) restarts, empty, a second after it died: the password stays out of
    every child's argv, the services reconnect by themselves, no client hangs, and the
    system serves again and goes back to idle."""
    password = "chaos-s3cret"
    redis = start_private_redis(password=password)
    serve = None
    try:
        serve = start_serve(smollm2_dir, "--redis-url", redis.url)
        children = _descendants(serve.proc.pid)
        assert len(children) >= 3 and not any(password in cmd for cmd in children.values()), children
        load = Load(serve.base, 8, max_tokens=24, deadline_s=90)
        task = asyncio.create_task(load.run(16))
        await wait_progress(load, 32)
        redis.process.kill()
        await asyncio.to_thread(redis.process.wait)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(redis.restart)
        back_s, outcomes = await asyncio.gather(serves_again(serve.base), task)
        counts = tally(outcomes)
        print(f"external redis (password) restarted after 1 s at concurrency 8: {dict(counts)}; serving "
              f"again {back_s:.1f}s after Redis was back")
        assert counts["hang"] == 0, [o for o in outcomes if o.kind == "hang"]
        again = await Load(serve.base, 8, max_tokens=8).run(8)
        assert tally(again) == {"ok": 8}, [o for o in again if o.kind != "ok"]
        await wait_idle(redis.url)
    finally:
        if serve is not None:
            serve.stop()
        redis.stop()


@pytest.mark.chaos
async def test_redis_killed_under_a_tensor_parallel_engine(tmp_path):
    """TP 2 (a tiny model: SmolLM2's 9 heads do not split in two). The ranks may have seen
    different last plans when Redis died (one read the next step, the other's read failed),
    so they leave the group (exit 3) and `folio serve` restarts them together; no client
    hangs, a new request is served again, then a full wave at once, and the engine is idle
    after. (Before, the ranks reconnected on their own and sometimes ran mismatched
    collectives: gloo aborted rank 0.)"""
    model = _tiny_model_with_tokenizer(tmp_path / "tiny")
    serve = ServeProcess(model, "--served-model-name", MODEL, "--dtype", "float32", "--max-model-len", "64",
                         "--tensor-parallel-size", "2")
    try:
        serve.wait_ready()
        load = Load(serve.base, 8, max_tokens=24, deadline_s=120)
        task = asyncio.create_task(load.run(16))
        await wait_progress(load, 32)
        os.kill(pid_of(serve, "redis"), signal.SIGKILL)
        back_s, outcomes = await asyncio.gather(serves_again(serve.base), task)
        counts = tally(outcomes)
        print(f"redis kill under TP 2 at concurrency 8: {dict(counts)}; serving again {back_s:.1f}s "
              "after the kill")
        assert counts["hang"] == 0, [o for o in outcomes if o.kind == "hang"]
        assert "restarting executors e0" in serve.output(), serve.output()
        # A further wave at once is served in full. (It got 503 "No engine is available" in
        # two runs of five: the gateway had cached "no engine alive" from a query made while
        # the ranks were restarting, and served that answer for up to a second after the
        # engine registered; "none alive" is no longer cached.)
        again = await Load(serve.base, 8, max_tokens=8, deadline_s=120).run(8)
        assert tally(again) == {"ok": 8}, [o for o in again if o.kind != "ok"]
        await wait_idle(redis_url_of(serve))
    finally:
        serve.stop()
