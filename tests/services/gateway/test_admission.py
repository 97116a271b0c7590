"""The gateway's admission bookkeeping and health-by-progress decision, on the real classes."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.admission import Admission, RateLimitError
from services.gateway.errors import BadRequestError, ServiceUnavailableError
from shared.health import stalled_engines
from shared.protocol import EngineInfo, EngineStats


def test_request_bound_reserves_at_once_and_releases_on_first_token():
    async def go():
        a = Admission(max_reqs=2, max_tokens=None)
        t1, t2 = a.enter(), a.enter()  # a burst: each takes its place before anything is parsed
        with pytest.raises(RateLimitError):
            a.enter()
        a.admit(t1, 1, 10)
        t1.started(10)  # first token: t1 no longer queues, though it still runs
        t3 = a.enter()
        assert (a.queued_reqs, a.queued_tokens, a.in_flight) == (2, 0, 3)
        for t in (t1, t2, t3):
            t.close()
            t.close()  # idempotent
        assert (a.queued_reqs, a.queued_tokens, a.in_flight) == (0, 0, 0) and a.idle.is_set()
        assert a.refused == {"queue_full": 1, "shutting_down": 0}

    asyncio.run(go())


def test_token_bound_and_requests_that_can_never_fit():
    async def go():
        a = Admission(max_reqs=4, max_tokens=100)
        big = a.enter()
        a.admit(big, 1, 500)  # alone in the queue: admitted though over the token bound
        other = a.enter()
        with pytest.raises(RateLimitError, match="--max-num-queued-tokens"):
            a.admit(other, 1, 10)
        with pytest.raises(BadRequestError):  # 5 completions can never fit a queue of 4
            a.admit(other, 5, 5)
        big.close()
        a.admit(other, 2, 60)
        assert (a.queued_reqs, a.queued_tokens) == (2, 60)
        other.close()
        a.draining = True
        with pytest.raises(ServiceUnavailableError):
            a.enter()

    asyncio.run(go())


def test_deadline_narrows_only():
    async def go():
        t = Admission(None, None, request_timeout_s=10).enter()
        t.narrow_timeout(30)
        assert t.timeout_s == 10
        t.narrow_timeout(2)
        assert t.timeout_s == 2 and t.deadline == t.arrival + 2
        assert Admission(None, None).enter().deadline is None

    asyncio.run(go())


def _info(engine_id: str) -> EngineInfo:
    return EngineInfo(engine_id=engine_id, num_blocks=10, block_size=16, max_model_len=64, model_name="m")


def test_stalled_engines_are_those_with_work_and_old_stats():
    now = 1000.0
    stats = {
        "busy-fresh": EngineStats(engine_id="busy-fresh", num_running=3, timestamp=now - 1),
        "busy-stuck": EngineStats(engine_id="busy-stuck", num_running=1, timestamp=now - 61),
        "waiting-stuck": EngineStats(engine_id="waiting-stuck", num_waiting=2, timestamp=now - 90),
        "idle-old": EngineStats(engine_id="idle-old", timestamp=now - 600),
    }
    live = [_info(e) for e in [*stats, "no-stats-yet"]]
    assert stalled_engines(live, stats, now, 60.0) == ["busy-stuck", "waiting-stuck"]
    # An engine no longer live is not judged (the heartbeat path already reports it).
    assert stalled_engines([_info("busy-fresh")], stats, now, 60.0) == []
    # Streaming to this gateway is work too, though its last stats (published before the
    # request came) say idle.
    assert stalled_engines(live, stats, now, 60.0, {"idle-old"}) == [
        "busy-stuck", "waiting-stuck", "idle-old"]


def test_serve_flags_reach_the_gateway_settings():
    """`folio serve` forwards the engine flags to `folio gateway`: the limits must survive the trip."""
    import argparse

    from services.gateway import server
    from shared.cli_args import engine_args_to_argv
    from shared.config import EngineConfig

    config = EngineConfig(max_num_queued_reqs=64, max_num_queued_tokens=4096, request_timeout=7.5,
                          shutdown_timeout=3.0)
    parser = argparse.ArgumentParser()
    server.add_cli_args(parser)
    args = parser.parse_args([*engine_args_to_argv(config), "--redis-url", "redis://x"])
    s = server.settings_from_args(args)
    assert (s.max_num_queued_reqs, s.max_num_queued_tokens, s.request_timeout_s, s.shutdown_timeout_s) == (
        64, 4096, 7.5, 3.0)
    assert (s.max_request_body_bytes, s.engine_stall_timeout_s) == (16 * 1024 * 1024, 60.0)
