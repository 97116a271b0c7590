"""Health by progress: the one decision of whether an engine has stalled, used by the
gateways' /health (services/gateway/app.py) and by `folio probe engine`, the engine pods'
liveness probe (services/probe.py). Kept free of torch and the web stack: the probe imports it.
"""

from __future__ import annotations

from shared.protocol import EngineInfo, EngineStats

DEFAULT_STALL_TIMEOUT_S = 60.0  # the gateways' --engine-stall-timeout and the probe's --stall-timeout


def stalled_engines(live: list[EngineInfo], stats: dict[str, EngineStats], now: float,
                    bound_s: float, serving: set[str] = frozenset()) -> list[str]:
    """Live engines with work whose last published stats are older than bound_s. A scheduler
    publishes after every step (at most every 0.5 s) and every 0.5 s while idle, so old stats
    from an engine with work mean no step has finished for that long; a heartbeat alone (its
    own task) would not show that. "With work": its stats say so (running or waiting
    requests), or it is streaming to this gateway (`serving`: its last stats may predate the
    request, being published at most every 0.5 s). Timestamps are wall-clock time of the
    scheduler's host: the bound (tens of seconds) dwarfs any sane clock skew."""
    out = []
    for e in live:
        s = stats.get(e.engine_id)
        busy = s is not None and (s.num_running + s.num_waiting > 0 or e.engine_id in serving)
        if busy and now - s.timestamp > bound_s:
            out.append(e.engine_id)
    return out
