"""`folio serve`: the whole system in one command, as child processes.

    folio serve ─┬─ redis-server (private, unix socket)     unless --redis-url
                 ├─ folio executor --tp-rank r              one per rank
                 ├─ folio scheduler
                 └─ folio gateway --host --port

The children are the same entry points compose and k8s run. Each child gets its own
session (a terminal's Ctrl-C reaches only this supervisor, which then stops them in
order: gateway and scheduler first, so the scheduler can tell the executors to shut
down, then executors, then Redis) and dies with the supervisor if it is killed. A child
that exits on its own is reported by name and exit code and stops everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from shared.cli_args import engine_args_to_argv
from shared.config import EngineConfig
from shared.redis_server import PrivateRedis, RedisNotFoundError, die_with_parent, start_private_redis

GRACE_S = 5.0  # per stage, before SIGKILL
# The health probe goes to our own child: never through an http_proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ROOT = str(Path(__file__).resolve().parent.parent)


def _say(msg: str) -> None:
    print(f"folio: {msg}", file=sys.stderr, flush=True)


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


@dataclass
class Child:
    name: str
    role: str  # executor | scheduler | gateway
    proc: subprocess.Popen


class Supervisor:
    def __init__(self) -> None:
        self.children: list[Child] = []
        self.redis: PrivateRedis | None = None
        self.stop_requested = False
        self._signals = 0

    def on_signal(self, signum: int, _frame) -> None:
        self._signals += 1
        self.stop_requested = True
        if self._signals > 1:  # second Ctrl-C: do not wait for a graceful stop
            for c in self.children:
                if c.proc.poll() is None:
                    c.proc.kill()

    def spawn(self, name: str, role: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        env = {**os.environ, **(extra_env or {})}
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *argv], env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        self.children.append(Child(name, role, proc))

    def dead_child(self) -> Child | None:
        for c in self.children:
            if c.proc.poll() is not None:
                return c
        return None

    def wait_ready(self, health_url: str) -> int | None:
        """None once /health answers 200; an exit code if stopped or a child died first."""
        while True:
            if self.stop_requested:
                return 0
            if (c := self.dead_child()) is not None:
                _say(f"the {c.name} {_describe_exit(c.proc.returncode)} during startup; stopping")
                return 1
            try:
                with _NO_PROXY.open(health_url, timeout=2) as resp:
                    if resp.status == 200:
                        return None
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)

    def watch(self) -> int:
        while not self.stop_requested:
            if (c := self.dead_child()) is not None:
                _say(f"the {c.name} {_describe_exit(c.proc.returncode)}; stopping")
                return 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        for roles in (("gateway", "scheduler"), ("executor",)):
            group = [c for c in self.children if c.role in roles and c.proc.poll() is None]
            for c in group:
                c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
            for c in group:
                try:
                    c.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _say(f"the {c.name} did not stop within {GRACE_S:.0f}s; killing it")
                    c.proc.kill()
                    c.proc.wait()
        if self.redis is not None:
            self.redis.stop()


def _urls(host: str, port: int) -> tuple[str, str]:
    """(health URL to poll, base URL to print)."""
    local = host in ("0.0.0.0", "::", "")
    probe = "127.0.0.1" if local else host
    shown = "localhost" if local else host
    if ":" in probe:
        probe = f"[{probe}]"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{probe}:{port}/health", f"http://{shown}:{port}/v1"


def serve(args: argparse.Namespace, config: EngineConfig) -> int:
    from services.executor.loader import ModelSourceError, resolve_model

    # Resolve (and convert) once here, so the progress bar shows once and children reuse the folder.
    try:
        resolved = resolve_model(config.model, config.load_format, config.download_dir)
    except ModelSourceError as e:
        _say(f"error: {e}")
        return 2
    child_config = dataclasses.replace(
        config,
        model=str(resolved.path),
        served_model_name=config.model_name,
        load_format="dummy" if resolved.load_format == "dummy" else "auto",
    )
    engine_argv = engine_args_to_argv(child_config)
    health_url, base_url = _urls(args.host, args.port)

    sup = Supervisor()
    previous = {s: signal.signal(s, sup.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.redis_url:
            url = args.redis_url
        else:
            try:
                sup.redis = start_private_redis()
            except RedisNotFoundError as e:
                _say(f"error: {e}")
                return 2
            url = sup.redis.url
        common = ["--redis-url", url, "--redis-namespace", args.redis_namespace]
        if args.otlp_traces_endpoint:
            common += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
        engine = ["--engine-id", args.engine_id]
        for rank in range(config.tensor_parallel_size):
            name = "executor" if config.tensor_parallel_size == 1 else f"executor (rank {rank})"
            sup.spawn(name, "executor", ["executor", *engine, "--tp-rank", str(rank), *common, *engine_argv])
        sup.spawn("scheduler", "scheduler", ["scheduler", *engine, *common, *engine_argv])
        # The API key goes by environment, not argv, so `ps` does not show it.
        sup.spawn("gateway", "gateway",
                  ["gateway", "--host", args.host, "--port", str(args.port), *engine_argv, *common],
                  extra_env={"FOLIO_API_KEY": args.api_key} if args.api_key else None)

        rc = sup.wait_ready(health_url)
        if rc is None:
            print(f"folio is ready: {base_url}", flush=True)
            rc = sup.watch()
        return rc
    finally:
        sup.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)

