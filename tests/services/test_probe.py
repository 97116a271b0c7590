"""`folio probe engine` (services/probe.py) against a real (private) Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.cli import main
from shared.bus import Bus
from shared.protocol import EngineInfo, EngineStats

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ns():
    return f"t{uuid.uuid4().hex[:8]}"


def _setup(redis_url: str, ns: str, *, alive: bool = True, stats: EngineStats | None = None,
           engine_id: str = "e0") -> None:
    async def go():
        bus = Bus(redis_url, ns)
        try:
            if alive:
                await bus.register_engine(EngineInfo(engine_id, 16, 16, 256, "m"), ttl_s=10.0)
            if stats is not None:
                await bus.publish_stats(stats, ttl_s=10.0)
        finally:
            await bus.close()
    asyncio.run(go())


def _drop_stats(redis_url: str, ns: str, engine_id: str = "e0") -> None:
    async def go():
        bus = Bus(redis_url, ns)
        try:
            await bus.redis.delete(bus.keys.stats(engine_id))
        finally:
            await bus.close()
    asyncio.run(go())


def _probe(redis_url: str, ns: str, tmp_path: Path, *extra: str, engine_id: str = "e0") -> int:
    return main(["probe", "engine", "--redis-url", redis_url, "--redis-namespace", ns,
                 "--engine-id", engine_id, "--state-file", str(tmp_path / "state"), *extra])


def _stats(age_s: float, running: int = 0, waiting: int = 0) -> EngineStats:
    return EngineStats("e0", num_running=running, num_waiting=waiting, timestamp=time.time() - age_s)


def test_alive_engine_passes(redis_url, ns, tmp_path, capsys):
    _setup(redis_url, ns, stats=_stats(0.2, running=3))
    assert _probe(redis_url, ns, tmp_path) == 0
    assert capsys.readouterr().err == ""


def test_missing_heartbeat_fails(redis_url, ns, tmp_path, capsys):
    assert _probe(redis_url, ns, tmp_path) == 1
    assert "engine e0: no heartbeat" in capsys.readouterr().err
    # Another engine's heartbeat does not count.
    _setup(redis_url, ns, stats=_stats(0.2), engine_id="e1")
    assert _probe(redis_url, ns, tmp_path) == 1


def test_stale_stats_with_work_fail(redis_url, ns, tmp_path, capsys):
    _setup(redis_url, ns, stats=_stats(90, waiting=2))
    assert _probe(redis_url, ns, tmp_path) == 1  # the default bound: 60 s, as the gateways'
    err = capsys.readouterr().err.strip()
    assert err.startswith("folio probe: engine e0: 0 running and 2 waiting") and "\n" not in err
    assert _probe(redis_url, ns, tmp_path, "--stall-timeout", "120") == 0


def test_stale_stats_without_work_pass(redis_url, ns, tmp_path):
    _setup(redis_url, ns, stats=_stats(600))
    assert _probe(redis_url, ns, tmp_path, "--stall-timeout", "10") == 0


def test_expired_stats_key_is_judged_by_the_last_stats_seen(redis_url, ns, tmp_path):
    """A stalled scheduler's stats key expires while its heartbeat goes on: the probe
    remembers the last stats it saw, so the engine does not turn idle."""
    _setup(redis_url, ns, stats=_stats(30, running=1))
    assert _probe(redis_url, ns, tmp_path, "--stall-timeout", "60") == 0  # seen, remembered
    _drop_stats(redis_url, ns)
    assert _probe(redis_url, ns, tmp_path, "--stall-timeout", "20") == 1
    # A probe that never saw them has nothing to judge by.
    assert main(["probe", "engine", "--redis-url", redis_url, "--redis-namespace", ns,
                 "--engine-id", "e0", "--state-file", str(tmp_path / "other"),
                 "--stall-timeout", "20"]) == 0
    # Fresh stats replace the remembered ones.
    _setup(redis_url, ns, stats=_stats(0.1, running=1))
    assert _probe(redis_url, ns, tmp_path, "--stall-timeout", "20") == 0


def test_unreachable_redis_passes_with_a_warning(tmp_path, capsys):
    sock = tmp_path / "no-redis.sock"
    assert _probe(f"unix://{sock}", "folio", tmp_path) == 0
    assert "cannot reach Redis" in capsys.readouterr().err


def test_probe_imports_neither_torch_nor_the_web_stack(redis_url, ns, tmp_path):
    _setup(redis_url, ns, stats=_stats(0.1))
    code = ("import sys; from services.cli import main\n"
            f"rc = main(['probe', 'engine', '--redis-url', {redis_url!r}, '--redis-namespace', {ns!r},"
            f" '--engine-id', 'e0', '--state-file', {str(tmp_path / 's')!r}])\n"
            "print(rc, [m for m in ('torch', 'fastapi', 'starlette', 'uvicorn', 'transformers',"
            " 'services.gateway.server', 'services.gateway.app') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.stdout.strip() == "0 []", (out.stdout, out.stderr)
