"""What the chaos tests share: `folio serve` with its private Redis, a load of streamed
completions whose every request must end (tokens or an error) within a deadline, and the
checks that the system is back to idle (no KV block held, nothing pending or logged in
Redis, keys and stream lengths at their idle level).

A request that neither finishes nor fails within its deadline is a hang: the one outcome
no fault may produce.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import psutil

from shared.bus import SCHEDULER_GROUP, Bus
from tests.services.serve_process import ServeProcess
from tests.services.test_cli_serve import _descendants

MODEL = "smollm2-135m-instruct"
ENGINE = "e0"


def start_serve(smollm2_dir, *flags: str) -> ServeProcess:
    """SmolLM2 (fp32) through `folio serve` with its own private Redis."""
    s = ServeProcess(smollm2_dir, "--served-model-name", MODEL, "--dtype", "float32",
                     "--max-model-len", "256", *flags)
    s.wait_ready()
    return s


def redis_url_of(serve: ServeProcess) -> str:
    """The unix socket of the private redis-server `folio serve` started."""
    # redis-server rewrites its process title (no argv to read): its --dir is its cwd, and
    # the socket lies there.
    return f"unix://{psutil.Process(pid_of(serve, 'redis')).cwd()}/redis.sock"


def pid_of(serve: ServeProcess, role: str) -> int:
    """The pid of the gateway, the scheduler or the executor (one engine, TP 1)."""
    pattern = {"gateway": "services.cli gateway ", "redis": "redis-server"}.get(
        role, f"services.cli {role} --engine-id {ENGINE} ")
    [pid] = [p for p, cmd in _descendants(serve.proc.pid).items() if pattern in cmd]
    return pid


def rss_mb(serve: ServeProcess) -> dict[str, float]:
    """Resident memory of each service, by role."""
    out = {}
    for pid, cmd in _descendants(serve.proc.pid).items():
        role = next((r for r in ("gateway", "scheduler", "executor") if f"services.cli {r} " in cmd),
                    "redis" if "redis-server" in cmd else None)
        if role is not None:
            try:
                out[role] = psutil.Process(pid).memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                pass
    return out


@dataclass
class Outcome:
    kind: str  # ok | error | hang
    tokens: int = 0
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Load:
    """Streamed /v1/completions at a fixed concurrency; `progress` counts tokens received."""

    base: str
    concurrency: int
    deadline_s: float = 90.0
    max_tokens: int = 16
    api_key: str = "x"
    progress: list[int] = field(default_factory=lambda: [0])

    def body(self, i: int) -> dict:
        return {"model": MODEL, "prompt": f"Note {i}: the weather on day {i % 13} was",
                "max_tokens": self.max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}

    async def one(self, client: httpx.AsyncClient, i: int,
                  cut: Callable[[int], bool] | None = None) -> Outcome:
        """One streamed request; `cut(tokens_so_far)` true disconnects the client there."""
        t0 = time.monotonic()
        tokens, error, usage = 0, "", None
        try:
            async with asyncio.timeout(self.deadline_s):
                if cut is not None and cut(-1):
                    return Outcome("cut")  # never sent
                async with client.stream("POST", f"{self.base}/v1/completions", json=self.body(i)) as r:
                    if r.status_code != 200:
                        await r.aread()
                        return Outcome("error", 0, f"{r.status_code} {r.text[:200]}", time.monotonic() - t0)
                    async for line in r.aiter_lines():
                        if cut is not None and cut(tokens):
                            return Outcome("cut", tokens)
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = str(event["error"].get("message"))[:200]
                            continue
                        # A chunk may carry several tokens (or none yet: held back by the
                        # detokenizer); the usage chunk at the end has the count.
                        n = sum(1 for c in event.get("choices", []) if c.get("text"))
                        tokens += n
                        self.progress[0] += n
                        if event.get("usage"):
                            usage = event["usage"]["completion_tokens"]
        except TimeoutError:
            return Outcome("hang", tokens, f"no end within {self.deadline_s:g}s", time.monotonic() - t0)
        except httpx.HTTPError as e:
            return Outcome("error", tokens, f"{type(e).__name__}: {e}", time.monotonic() - t0)
        dt = time.monotonic() - t0
        if error:
            return Outcome("error", tokens, error, dt)
        if usage != self.max_tokens:
            return Outcome("error", tokens, f"stream ended without an error event and usage {usage}", dt)
        return Outcome("ok", usage, "", dt)

    async def run(self, n: int, cut: Callable[[int, int], bool] | None = None) -> list[Outcome]:
        """n requests, `concurrency` at a time; `cut(i, tokens)` disconnects request i."""
        sem = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency + 8,
                              max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.deadline_s, connect=10), limits=limits,
                                     headers={"Authorization": f"Bearer {self.api_key}"},
                                     trust_env=False) as client:
            async def go(i: int) -> Outcome:
                async with sem:
                    return await self.one(client, i, None if cut is None else (lambda t: cut(i, t)))
            return await asyncio.gather(*(go(i) for i in range(n)))


def tally(outcomes: list[Outcome]) -> Counter:
    return Counter(o.kind for o in outcomes)


async def wait_progress(load: Load, tokens: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while load.progress[0] < tokens:
        assert time.monotonic() < deadline, f"only {load.progress[0]} tokens in {timeout_s}s"
        await asyncio.sleep(0.01)


async def idle_state(redis_url: str, ns: str = "folio") -> dict:
    """What an idle system holds in Redis: key count, stream lengths, pending requests, and
    the engine's KV usage and running count (None while no stats are published)."""
    bus = Bus(redis_url, ns)
    try:
        keys = sorted(k.decode() for k in await bus.redis.keys("*"))
        streams = {}
        for k in keys:
            if (await bus.redis.type(k)) == b"stream":
                streams[k] = await bus.redis.xlen(k)
        try:
            pending = (await bus.redis.xpending(bus.keys.requests, SCHEDULER_GROUP))["pending"]
        except Exception:  # no group yet
            pending = 0
        stats = await bus.engine_stats()
        return {
            "keys": len(keys),
            "streams": streams,
            "pending": pending,
            "kv_usage": stats[0].kv_cache_usage if stats else None,
            "running": stats[0].num_running + stats[0].num_waiting if stats else None,
        }
    finally:
        await bus.close()


async def wait_idle(redis_url: str, timeout_s: float = 60) -> dict:
    """Until nothing is pending, the token log is empty and the engine holds no KV block and
    runs nothing; returns that state (asserts on timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = await idle_state(redis_url)
        log_len = st["streams"].get(f"folio:engine:{ENGINE}:tokens", 0)
        if st["pending"] == 0 and log_len == 0 and st["kv_usage"] == 0 and st["running"] == 0:
            return st
        assert time.monotonic() < deadline, f"not idle after {timeout_s}s: {st}"
        await asyncio.sleep(0.25)


async def serves_again(base: str, timeout_s: float = 120) -> float:
    """Seconds until a fresh (non-streamed) completion succeeds."""
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=30, trust_env=False, headers={"Authorization": "Bearer x"}) as c:
        while True:
            try:
                r = await c.post(f"{base}/v1/completions",
                                 json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
                if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < timeout_s, "never served again"
            await asyncio.sleep(0.1)
