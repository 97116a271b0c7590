"""kill -9 of the gateway, the scheduler and the executor, each under load at concurrency
32 (`make chaos`): no client hangs (every stream ends with its tokens or an error within
its deadline), `folio serve` restarts the dead service, the server serves again, and the
system is back to idle (no KV block held, nothing pending or logged in Redis).

A killed scheduler or executor restarts under the same engine id, which takes its own
pending requests over and resumes them from its token log, so their clients get every
token; a killed gateway takes its clients' connections with it (they get an error), and
the scheduler aborts the requests whose gateway is gone, freeing their KV blocks.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.chaos.harness import (
    Load,
    pid_of,
    redis_url_of,
    serves_again,
    start_serve,
    tally,
    wait_idle,
    wait_progress,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

CONCURRENCY = 32


@pytest.fixture(scope="module")
def serve(smollm2_dir):
    s = start_serve(smollm2_dir)
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("role", ["gateway", "scheduler", "executor"])
async def test_kill_9_under_load(serve, role):
    redis_url = redis_url_of(serve)
    load = Load(serve.base, CONCURRENCY, max_tokens=24, deadline_s=120)
    # Two waves: the first is mid-stream at the kill, the second arrives while the service
    # is being restarted.
    task = asyncio.create_task(load.run(2 * CONCURRENCY))
    await wait_progress(load, 4 * CONCURRENCY)
    os.kill(pid_of(serve, role), signal.SIGKILL)
    back_s, outcomes = await asyncio.gather(serves_again(serve.base), task)
    counts = tally(outcomes)
    slowest = max(o.seconds for o in outcomes)
    print(f"kill -9 {role} at concurrency {CONCURRENCY}: {dict(counts)}; serving again {back_s:.1f}s "
          f"after the kill; slowest request {slowest:.1f}s; errors: "
          f"{sorted({o.detail[:80] for o in outcomes if o.kind == 'error'})[:3]}")
    assert counts["hang"] == 0, [o for o in outcomes if o.kind == "hang"]
    assert f"the {role} was killed by SIGKILL; restarting" in serve.everything()
    if role != "gateway":
        # Resumed from the token log: nobody saw an error.
        assert counts == {"ok": 2 * CONCURRENCY}, [o for o in outcomes if o.kind != "ok"]
    idle = await wait_idle(redis_url)
    again = await Load(serve.base, CONCURRENCY, max_tokens=8).run(CONCURRENCY)
    assert tally(again) == {"ok": CONCURRENCY}, [o for o in again if o.kind != "ok"]
    print(f"  idle after: {idle}")
