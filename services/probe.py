"""`folio probe engine`: the engine pods' liveness probe (exit 0: alive and making progress).

An engine (a scheduler and its executor ranks) serves no HTTP, so the probe asks Redis what a
gateway's /health asks, with the same decision (shared/health.py:stalled_engines):

  * no heartbeat ({ns}:engine:{id}:alive expired, or the engine not registered)  -> exit 1
  * work in its last published EngineStats (running or waiting requests) but no stats for
    longer than --stall-timeout                                                  -> exit 1
  * otherwise                                                                    -> exit 0
  * Redis unreachable: exit 0 with a warning. The engine waits for Redis on its own
    (shared/bus.py), and restarting it would only reload its model; Redis has its own probe.

A stalled scheduler's stats key expires (10 s TTL) while its heartbeat (its own task) goes on,
and a missing key must not make a stalled engine look idle: like a gateway, the probe judges
by the last stats it saw, which it keeps in a small file between runs (--state-file; the
container's /tmp by default; forgotten when the heartbeat goes).

Light on purpose: Redis, msgspec and shared/ only, no torch and no web stack, because the
kubelet (or Docker) starts it every few seconds next to a loaded model.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time

from shared.bus import Bus, is_outage, redacted
from shared.health import stalled_engines
from shared.protocol import EngineStats, decode, encode

REDIS_TIMEOUT_S = 3.0


def default_state_file(namespace: str, engine_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{namespace}-{engine_id}")
    return os.path.join(tempfile.gettempdir(), f"folio-probe-{safe}.stats")


def _load(path: str, engine_id: str) -> EngineStats | None:
    try:
        with open(path, "rb") as f:
            stats = decode(f.read(), EngineStats)
    except Exception:  # missing or unreadable: nothing remembered
        return None
    return stats if stats.engine_id == engine_id else None


def _save(path: str, stats: EngineStats | None) -> None:
    try:
        if stats is None:
            if os.path.exists(path):
                os.remove(path)
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(encode(stats))
        os.replace(tmp, path)
    except OSError:  # a read-only /tmp: judge by the live key alone
        pass


async def check_engine(bus: Bus, engine_id: str, stall_timeout_s: float, state_file: str,
                       now: float | None = None) -> str | None:
    """None if the engine is alive and not stalled, else the reason (one line)."""
    live = [e for e in await bus.live_engines() if e.engine_id == engine_id]
    if not live:
        _save(state_file, None)
        return (f"engine {engine_id}: no heartbeat (not registered, or its "
                f"{bus.keys.alive(engine_id)} key expired)")
    stats = await bus.engine_stats_of(engine_id)
    if stats is not None:
        _save(state_file, stats)
    else:
        stats = _load(state_file, engine_id)
    now = time.time() if now is None else now
    known = {engine_id: stats} if stats is not None else {}
    if stalled_engines(live, known, now, stall_timeout_s):
        assert stats is not None
        return (f"engine {engine_id}: {stats.num_running} running and {stats.num_waiting} "
                f"waiting request(s) but no step finished for {now - stats.timestamp:.0f}s "
                f"(> --stall-timeout {stall_timeout_s:g}s)")
    return None


async def _probe(redis_url: str, namespace: str, engine_id: str, stall_timeout_s: float,
                 state_file: str) -> int:
    bus = Bus(redis_url, namespace)
    try:
        reason = await asyncio.wait_for(
            check_engine(bus, engine_id, stall_timeout_s, state_file), REDIS_TIMEOUT_S)
    except Exception as e:
        if not is_outage(e):
            print(f"folio probe: engine {engine_id}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"folio probe: warning: cannot reach Redis at {redacted(redis_url)} "
              f"({type(e).__name__}); not failing the engine for it", file=sys.stderr)
        return 0
    finally:
        try:
            await bus.close()
        except Exception:
            pass
    if reason is not None:
        print(f"folio probe: {reason}", file=sys.stderr)
        return 1
    return 0


def probe_engine(redis_url: str, namespace: str, engine_id: str, stall_timeout_s: float,
                 state_file: str | None = None) -> int:
    """The exit status of `folio probe engine`."""
    path = state_file or default_state_file(namespace, engine_id)
    return asyncio.run(_probe(redis_url, namespace, engine_id, stall_timeout_s, path))
