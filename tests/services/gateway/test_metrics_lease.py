"""The engine-metrics lease (engine_client.py): exactly one gateway exports the engine series,
another takes over when the holder stops or dies, and a holder cut off from Redis stops
exporting by itself. Real EngineClients on a real private Redis, short TTLs."""

from __future__ import annotations

import asyncio
import time
import uuid

from services.gateway.engine_client import EngineClient
from shared.bus import Bus
from shared.redis_server import start_private_redis


def _bus(url: str, ns: str) -> Bus:
    return Bus(url, ns)


async def _until(cond, timeout_s: float) -> float:
    """Seconds until cond() holds (fails after timeout_s)."""
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout_s, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - t


async def test_bus_lease_take_renew_release(redis_url):
    bus = _bus(redis_url, f"t{uuid.uuid4().hex[:8]}")
    key = bus.keys.metrics_exporter
    try:
        assert key == f"{bus.keys.ns}:metrics:engine-exporter"
        assert await bus.hold_lease(key, "a", 0.3)
        assert not await bus.hold_lease(key, "b", 0.3)  # held: b cannot take it
        assert await bus.hold_lease(key, "a", 0.3)  # a renews
        assert not await bus.release_lease(key, "b")  # only the holder releases
        assert await bus.redis.get(key) == b"a"
        await asyncio.sleep(0.4)  # a stopped renewing: expired
        assert await bus.hold_lease(key, "b", 0.3)
        assert not await bus.hold_lease(key, "a", 0.3)  # a late renewal does not steal it back
        assert await bus.release_lease(key, "b") and await bus.redis.get(key) is None
    finally:
        await bus.close()


async def test_one_exporter_handover_on_stop_and_takeover_after_death(redis_url):
    ns = f"t{uuid.uuid4().hex[:8]}"
    ttl = 0.6
    buses = [_bus(redis_url, ns) for _ in range(3)]
    a, b = (EngineClient(buses[i], f"gw-{i}", metrics_lease_ttl_s=ttl) for i in range(2))
    try:
        await a.start()
        await b.start()
        assert a.exports_engine_metrics and not b.exports_engine_metrics  # a was first
        for _ in range(3):  # renewals keep it with a, never both
            await asyncio.sleep(ttl / 2)
            assert a.exports_engine_metrics and not b.exports_engine_metrics
        # a stops: it hands the lease over at once, b takes it at its next round (ttl/3).
        await a.stop()
        assert not a.exports_engine_metrics
        took = await _until(lambda: b.exports_engine_metrics, ttl)
        assert took < ttl / 3 + 0.2, took
        assert await buses[2].redis.get(buses[2].keys.metrics_exporter) == b"gw-1"

        # b dies (its loop stops, nothing released): a new gateway takes over once the TTL ran out.
        for t in b._tasks:
            t.cancel()
        await asyncio.gather(*b._tasks, return_exceptions=True)
        b._tasks = []
        died = time.monotonic()
        c = EngineClient(buses[2], "gw-2", metrics_lease_ttl_s=ttl)
        await c.start()
        try:
            assert not c.exports_engine_metrics  # still b's
            await _until(lambda: c.exports_engine_metrics, 2 * ttl)
            assert time.monotonic() - died < ttl + ttl / 3 + 0.2
            # b's flag ran out with its lease: there was never a second exporter.
            assert not b.exports_engine_metrics
        finally:
            await c.stop()
    finally:
        await a.stop()
        await b.stop()
        for bus in buses:
            await bus.close()


async def test_holder_cut_off_from_redis_stops_exporting_within_ttl():
    server = start_private_redis()
    bus = Bus(server.url, "folio")
    client = EngineClient(bus, "gw-0", metrics_lease_ttl_s=0.6)
    try:
        await client.start()
        assert client.exports_engine_metrics
        server.stop()  # renewals fail from now on
        lost = await _until(lambda: not client.exports_engine_metrics, 1.0)
        assert lost <= 0.6 + 0.05, lost
    finally:
        await client.stop()
        await bus.close()
