"""`folio serve`: the whole system in one command, as child processes.

    folio serve ─┬─ redis-server (private, unix socket)     unless --redis-url
                 ├─ engine e0 ─┬─ folio scheduler            one engine per --data-parallel-size
                 │             └─ folio executor --tp-rank r  one per rank
                 ├─ engine e1 ...
                 └─ folio gateway --host --port

The children are the same entry points compose and k8s run. Each child gets its own
session (a terminal's Ctrl-C reaches only this supervisor, which then stops them in
order: gateway and schedulers first, so each scheduler can tell its executors to shut
down, then executors, then Redis) and dies with the supervisor if it is killed.

A child that dies before the server is ready stops everything (a bad model or flag would
only die again). Once ready, a dead child is reported and restarted, as a restart policy
would: a scheduler or the gateway alone; an executor rank together with the other ranks
of its engine (they formed one torch.distributed group, which cannot take in a new
member: all of them rendezvous afresh). The engine's requests are resumed meanwhile (see
services/scheduler/service.py). A unit that dies more than MAX_RESTARTS times within
RESTART_WINDOW_S is crash-looping: then everything stops with a non-zero exit. The
private Redis is restarted the same way (on the same socket, empty); the services
reconnect to it on their own (shared/bus.py).

The Redis URL reaches the children by environment (FOLIO_REDIS_URL), not argv: it may
hold a password, and argv is world-readable in `ps`.
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
MAX_RESTARTS = 5
RESTART_WINDOW_S = 120.0
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
    unit: str  # children restarted together: "gateway", "scheduler e0", "executors e0"
    argv: list[str]
    extra_env: dict[str, str] | None
    proc: subprocess.Popen


class Supervisor:
    def __init__(self, shutdown_timeout_s: float = 30.0) -> None:
        # How long a gateway and then a scheduler may drain on SIGTERM (their --shutdown-timeout,
        # which they got with the engine flags) before GRACE_S more and a SIGKILL.
        self.shutdown_timeout_s = shutdown_timeout_s
        self.children: list[Child] = []
        self.redis: PrivateRedis | None = None
        self.env: dict[str, str] = {}  # for every child (FOLIO_REDIS_URL)
        self.stop_requested = False
        self._signals = 0
        self._restarts: dict[str, list[float]] = {}

    def on_signal(self, signum: int, _frame) -> None:
        self._signals += 1
        self.stop_requested = True
        if self._signals > 1:  # second Ctrl-C: do not wait for a graceful stop
            for c in self.children:
                if c.proc.poll() is None:
                    c.proc.kill()

    def spawn(self, name: str, role: str, unit: str, argv: list[str],
              extra_env: dict[str, str] | None = None) -> None:
        self.children.append(Child(name, role, unit, argv, extra_env, self._start(argv, extra_env)))

    def _start(self, argv: list[str], extra_env: dict[str, str] | None) -> subprocess.Popen:
        env = {**os.environ, **self.env, **(extra_env or {})}
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return subprocess.Popen([sys.executable, "-m", "services.cli", *argv], env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)

    def dead_child(self) -> Child | None:
        """A dead child; one killed by a signal first. When one rank is killed, its peers
        fail their next collective and exit too, often before this loop looks: the log must
        name the cause (the killed one), not a peer that exited because of it."""
        dead = [c for c in self.children if c.proc.poll() is not None]
        return min(dead, key=lambda c: c.proc.returncode >= 0) if dead else None

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
            if self.redis is not None and self.redis.process.poll() is not None:
                if not self.restart_redis():
                    return 1
            if (c := self.dead_child()) is not None:
                if not self.restart(c):
                    return 1
            time.sleep(0.2)
        return 0

    def _may_restart(self, unit: str, name: str, rc: int) -> bool:
        """Count a death of `unit`; False (after saying so) if it is crash-looping."""
        now = time.monotonic()
        recent = [t for t in self._restarts.get(unit, []) if now - t < RESTART_WINDOW_S]
        if len(recent) >= MAX_RESTARTS:
            _say(f"the {name} {_describe_exit(rc)}, its {len(recent)}th time "
                 f"within {RESTART_WINDOW_S:.0f}s; stopping")
            return False
        self._restarts[unit] = [*recent, now]
        _say(f"the {name} {_describe_exit(rc)}; restarting {unit}")
        return True

    def restart_redis(self) -> bool:
        """Start the private Redis again (empty, same socket); False if crash-looping or it
        does not come up."""
        assert self.redis is not None
        if not self._may_restart("redis", "redis-server", self.redis.process.returncode):
            return False
        try:
            self.redis.restart()
        except (RuntimeError, OSError) as e:
            _say(f"error: could not restart redis-server: {e}")
            return False
        return True

    def restart(self, dead: Child) -> bool:
        """Restart the dead child's unit; False if it is crash-looping."""
        if not self._may_restart(dead.unit, dead.name, dead.proc.returncode):
            return False
        unit = [c for c in self.children if c.unit == dead.unit]
        _terminate([c for c in unit if c.proc.poll() is None], grace_s=2.0)
        for c in unit:
            c.proc = self._start(c.argv, c.extra_env)
        return True

    def stop(self) -> None:
        # Front to back: the gateway drains first (its in-flight requests still need the
        # engines, and requests it queued still get claimed), then the schedulers (idle by
        # then; each sends its executors the shutdown plan), then the executors.
        drain_s = self.shutdown_timeout_s + GRACE_S
        for roles, grace_s in ((("gateway",), drain_s), (("scheduler",), drain_s), (("executor",), GRACE_S)):
            _terminate([c for c in self.children if c.role in roles and c.proc.poll() is None], grace_s)
        if self.redis is not None:
            self.redis.stop()


def _terminate(group: list[Child], grace_s: float) -> None:
    for c in group:
        c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for c in group:
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _say(f"the {c.name} did not stop within {grace_s:.0f}s; killing it")
            c.proc.kill()
            c.proc.wait()


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


def _resolve_once(config: EngineConfig) -> EngineConfig | None:
    """Resolve (and convert) the model once here, so the progress bar shows once and the
    children reuse the folder; None (after saying why) if it cannot be resolved."""
    from services.executor.loader import ModelSourceError, locate_model

    try:
        resolved = locate_model(config.model, config.load_format, config.download_dir)
    except ModelSourceError as e:
        _say(f"error: {e}")
        return None
    return dataclasses.replace(
        config,
        model=str(resolved.path),
        served_model_name=config.model_name,
        load_format="dummy" if resolved.load_format == "dummy" else "auto",
    )


def _common_argv(args: argparse.Namespace) -> list[str]:
    common = ["--redis-namespace", args.redis_namespace]
    if args.otlp_traces_endpoint:
        common += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
    return common


def spawn_engine(sup: Supervisor, engine_id: str, config: EngineConfig, common: list[str],
                 engine_argv: list[str], num_engines: int = 1, label: str = "") -> None:
    """One engine: its executor ranks (restarted together) and its scheduler."""
    tp = config.tensor_parallel_size
    # The executors share the cores: torch would start one thread per core in each.
    threads = {} if "OMP_NUM_THREADS" in os.environ else {
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // (num_engines * tp)))}
    engine = ["--engine-id", engine_id]
    for rank in range(tp):
        name = ("executor" if tp == 1 else f"executor (rank {rank})") + label
        sup.spawn(name, "executor", f"executors {engine_id}",
                  ["executor", *engine, "--tp-rank", str(rank), *common, *engine_argv], threads)
    sup.spawn("scheduler" + label, "scheduler", f"scheduler {engine_id}",
              ["scheduler", *engine, *common, *engine_argv])


def run_engine(args: argparse.Namespace, config: EngineConfig) -> int:
    """`folio engine`: one engine (a scheduler and its executor ranks) under this supervisor,
    the unit a container or pod runs to scale engines (compose --scale, k8s replicas)."""
    child_config = _resolve_once(config)
    if child_config is None:
        return 2
    sup = Supervisor(config.shutdown_timeout)
    previous = {s: signal.signal(s, sup.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sup.env["FOLIO_REDIS_URL"] = args.redis_url
        spawn_engine(sup, args.engine_id, config, _common_argv(args),
                     engine_args_to_argv(child_config))
        _say(f"engine {args.engine_id} started ({config.tensor_parallel_size} executor rank(s))")
        return sup.watch()
    finally:
        sup.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def serve(args: argparse.Namespace, config: EngineConfig) -> int:
    child_config = _resolve_once(config)
    if child_config is None:
        return 2
    engine_argv = engine_args_to_argv(child_config)
    health_url, base_url = _urls(args.host, args.port)

    sup = Supervisor(config.shutdown_timeout)
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
        sup.env["FOLIO_REDIS_URL"] = url
        common = _common_argv(args)
        dp = config.data_parallel_size
        for k in range(dp):
            engine_id = args.engine_id if dp == 1 else f"{args.engine_id}-{k}"
            spawn_engine(sup, engine_id, config, common, engine_argv, dp,
                         "" if dp == 1 else f" of engine {engine_id}")
        # The API key goes by environment, not argv, so `ps` does not show it.
        tool_parser = getattr(args, "tool_call_parser", None)  # checked by the CLI
        parser = ["--tool-call-parser", tool_parser] if tool_parser else []
        # The gateway's own limits (the engine flags above carry the queue bounds and timeouts).
        for flag in ("max_request_body_size", "engine_stall_timeout"):
            if getattr(args, flag, None) is not None:
                parser += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
        sup.spawn("gateway", "gateway", "gateway",
                  ["gateway", "--host", args.host, "--port", str(args.port), *engine_argv, *common, *parser],
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
